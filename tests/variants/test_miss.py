"""MiSS: what is unique to the variant (the shared checks live in tests/test_conformance.py).

Reference equations (specs/adapters.md §2, Flax orientation ``W: [in, out]``,
written here element by element, independently of the vectorised code)::

    default  D: [r, out]        W'[i, o] = W[i, o] + D[i mod r, o]
    mini     D: [r, mini_r]     W'[i, o] = W[i, o] + D[i mod r, o mod mini_r]
    bat      D: [out/r, r, r]   torch layout, blocks W_{q,p} = W_t[q·r:, p·r:]:
                                W'_{q,p} = W_{q,p} + W_{q,p} D_q + D_q
    factored y = x W + fold(x) D,  fold(x)_j = Σ_{i ≡ j (mod r)} x_i
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax
from lorajax import registry


def _params(d_in, d_out, seed=0, dtype=jnp.float32):
    return {"dense": {"kernel": jax.random.normal(jax.random.key(seed), (d_in, d_out), dtype)}}


def _spec(rank, **kw):
    return lorajax.Spec("miss", rank=rank, targets=["dense"], **kw)


def _random_block(adapters, seed=1):
    leaf = adapters["dense"]["kernel"]
    d = jax.random.normal(jax.random.key(seed), leaf["miss_block"].shape) * 0.3
    return {"dense": {"kernel": {"miss_block": d}}}


def _merged(spec, params, adapters):
    return np.asarray(lorajax.merge(spec, params, adapters)["dense"]["kernel"], np.float64)


@pytest.mark.parametrize("mode,shape", [(True, (4, 12)), ("mini", (4, 3)), ("bat", (3, 4, 4))])
def test_init_shapes_zeros_and_count(mode, shape):
    params = _params(8, 12)
    spec = _spec(4, init_weights=mode, mini_r=3)
    ad = lorajax.init(spec, params, jax.random.key(0))
    d = ad["dense"]["kernel"]["miss_block"]
    assert d.shape == shape and d.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(d), 0.0)
    # r·out (default), r·mini_r (mini), (out/r)·r·r = out·r (bat)
    assert lorajax.count_params(spec, params, ad)["trainable"] == {True: 4 * 12, "mini": 4 * 3, "bat": 12 * 4}[mode]
    assert registry.get("miss").trainable_count(lorajax.select(spec, params)) == d.size
    np.testing.assert_array_equal(_merged(spec, params, ad), np.asarray(params["dense"]["kernel"]))


def test_init_weights_false_is_kaiming_uniform():
    params = _params(8, 400)
    ad = lorajax.init(_spec(4, init_weights=False), params, jax.random.key(0))
    d = np.asarray(ad["dense"]["kernel"]["miss_block"])
    bound = 1 / math.sqrt(400)  # kaiming-uniform(a=√5) on [r, out]: fan-in = out
    assert d.shape == (4, 400)
    assert np.abs(d).max() <= bound and np.abs(d).max() > 0.95 * bound


@pytest.mark.parametrize("d_in,r", [(12, 4), (13, 4), (6, 4), (5, 5)])
def test_default_merged_weight_equation(d_in, r):
    params = _params(d_in, 7)
    spec = _spec(r)
    ad = _random_block(lorajax.init(spec, params, jax.random.key(0)))
    w = np.asarray(params["dense"]["kernel"], np.float64)
    d = np.asarray(ad["dense"]["kernel"]["miss_block"], np.float64)
    want = w.copy()
    for i in range(d_in):
        for o in range(7):
            want[i, o] += d[i % r, o]
    np.testing.assert_allclose(_merged(spec, params, ad), want, rtol=1e-6, atol=1e-6)


def test_mini_merged_weight_equation():
    params = _params(10, 12)
    spec = _spec(4, init_weights="mini", mini_r=3)
    ad = _random_block(lorajax.init(spec, params, jax.random.key(0)))
    w = np.asarray(params["dense"]["kernel"], np.float64)
    d = np.asarray(ad["dense"]["kernel"]["miss_block"], np.float64)
    want = w + np.array([[d[i % 4, o % 3] for o in range(12)] for i in range(10)])
    np.testing.assert_allclose(_merged(spec, params, ad), want, rtol=1e-6, atol=1e-6)


def test_bat_merged_weight_equation_in_torch_layout():
    r, d_in, d_out = 3, 6, 9
    params = _params(d_in, d_out)
    spec = _spec(r, init_weights="bat")
    ad = _random_block(lorajax.init(spec, params, jax.random.key(0)))
    wt = np.asarray(params["dense"]["kernel"], np.float64).T  # torch [out, in]
    d = np.asarray(ad["dense"]["kernel"]["miss_block"], np.float64)  # [out/r, r, r], PEFT's layout
    want_t = wt.copy()
    for q in range(d_out // r):
        for p in range(d_in // r):
            blk = wt[q * r:(q + 1) * r, p * r:(p + 1) * r]
            want_t[q * r:(q + 1) * r, p * r:(p + 1) * r] = blk + blk @ d[q] + d[q]
    np.testing.assert_allclose(_merged(spec, params, ad), want_t.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode,d_in,d_out,r", [(True, 13, 7, 4), ("mini", 10, 12, 4), ("bat", 8, 12, 4)])
def test_factored_forward_equation(mode, d_in, d_out, r):
    model = nn.Dense(d_out, name="dense")
    x = jax.random.normal(jax.random.key(3), (2, 5, d_in))
    variables = model.init(jax.random.key(0), x)
    spec = lorajax.Spec("miss", rank=r, targets=".*", init_weights=mode, mini_r=3)
    ad = lorajax.init(spec, variables, jax.random.key(0))
    d = jax.random.normal(jax.random.key(9), ad["params"]["kernel"]["miss_block"].shape)
    ad = {"params": {"kernel": {"miss_block": d}}}
    y = lorajax.adapt(model.apply, spec, mode="factored")(variables, ad, x)
    p = variables["params"]
    merged = lorajax.merge(spec, variables, ad)["params"]["kernel"]
    want = x @ merged + p["bias"][None, None, :]
    np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-5, atol=1e-5)
    if mode is True:  # the fold: shard sums of the zero-padded input, then @ D
        xn = np.asarray(x, np.float64).reshape(-1, d_in)
        fold = np.zeros((xn.shape[0], r))
        for i in range(d_in):
            fold[:, i % r] += xn[:, i]
        want2 = xn @ np.asarray(p["kernel"], np.float64) + fold @ np.asarray(d, np.float64) + np.asarray(p["bias"])
        np.testing.assert_allclose(np.asarray(y).reshape(-1, d_out), want2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", [True, "mini", "bat"])
def test_unmerge_roundtrip(mode):
    params = _params(8, 12)
    spec = _spec(4, init_weights=mode, mini_r=3)
    ad = _random_block(lorajax.init(spec, params, jax.random.key(0)))
    back = lorajax.unmerge(spec, lorajax.merge(spec, params, ad), ad)
    np.testing.assert_allclose(np.asarray(back["dense"]["kernel"]), np.asarray(params["dense"]["kernel"]),
                               rtol=1e-5, atol=1e-5)


def test_bat_gradient_matches_merged_formula():
    """bat's forward is x W' (as PEFT): its gradient is that of the block-affine W'."""
    params = _params(8, 12)
    spec = _spec(4, init_weights="bat")
    ad = _random_block(lorajax.init(spec, params, jax.random.key(0)))
    x = jax.random.normal(jax.random.key(5), (3, 8))
    w = params["dense"]["kernel"]

    def ref(d):  # torch-layout block formula, differentiated by JAX
        wt = w.T.reshape(3, 4, 2, 4).transpose(2, 0, 1, 3)  # [p, q, a, b]
        out = (wt + wt @ d[None] + d[None]).transpose(1, 2, 0, 3).reshape(12, 8)
        return jnp.sum(jnp.tanh(x @ out.T))

    def ours(d):
        y = lorajax.adapt(lambda p, xx: xx @ p["dense"]["kernel"], spec, mode="merged")(
            params, {"dense": {"kernel": {"miss_block": d}}}, x)
        return jnp.sum(jnp.tanh(y))

    d = ad["dense"]["kernel"]["miss_block"]
    np.testing.assert_allclose(ours(d), ref(d), rtol=1e-5)
    np.testing.assert_allclose(jax.grad(ours)(d), jax.grad(ref)(d), rtol=1e-5, atol=1e-5)


def test_bf16_weight_keeps_dtype_adapter_is_f32():
    params = _params(8, 12, dtype=jnp.bfloat16)
    spec = _spec(4)
    ad = _random_block(lorajax.init(spec, params, jax.random.key(0)))
    assert lorajax.init(spec, params, jax.random.key(0))["dense"]["kernel"]["miss_block"].dtype == jnp.float32
    assert lorajax.merge(spec, params, ad)["dense"]["kernel"].dtype == jnp.bfloat16


def test_options_validated():
    with pytest.raises(ValueError, match="init_weights"):
        _spec(4, init_weights="gaussian")
    with pytest.raises(ValueError, match="mini_r"):
        _spec(4, init_weights="mini", mini_r=0)
    with pytest.raises(TypeError, match="unknown option"):
        _spec(4, miss_dropout=0.1)


def test_shape_rules_name_the_target():
    params = {"blk": {"dense": {"kernel": jnp.zeros((10, 12))}}}
    with pytest.raises(ValueError, match=r"blk\.dense.*'bat' needs in and out divisible by r=4"):
        lorajax.init(lorajax.Spec("miss", rank=4, targets=["dense"], init_weights="bat"), params, 0)
    with pytest.raises(ValueError, match=r"blk\.dense.*out divisible by mini_r=5"):
        lorajax.init(lorajax.Spec("miss", rank=4, targets=["dense"], init_weights="mini", mini_r=5), params, 0)
    with pytest.raises(ValueError, match=r"blk\.dense"):
        lorajax.init(lorajax.Spec("miss", rank=11, targets=["dense"]), params, 0)


def test_bone_is_an_alias_of_miss():
    assert registry.get("bone") is registry.get("miss")
