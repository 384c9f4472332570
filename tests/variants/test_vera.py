"""VeRA: what is unique to the variant (the shared checks live in tests/test_conformance.py).

Reference equations (specs/adapters.md §1e, Flax orientation ``W: [in, out]``)::

    A_sh: [in_max, r] ~ U(±√(6/in_max)),   B_sh: [r, out_max] ~ U(±√(6/r))   (frozen, shared)
    W' = W + (A_sh[:in] ⊙ d) B_sh[:, :out] ⊙ b
    y  = x W + b_bias + (((x A) ⊙ d) B) ⊙ b
    d = vera_lambda_d: [r] = d_initial,  b = vera_lambda_b: [out] = 0 at init
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax

R = 4


def _params(dtype=jnp.float32):
    # in_max comes from "v" (10), out_max from "q" (9): slicing is exercised on both axes
    kq, kv = jax.random.split(jax.random.key(0))
    return {
        "q": {"kernel": jax.random.normal(kq, (6, 9), dtype)},
        "v": {"kernel": jax.random.normal(kv, (10, 4), dtype)},
    }


def _spec(**kw):
    kw.setdefault("rank", R)
    return lorajax.Spec("vera", targets=["q", "v"], **kw)


def _randomize(adapters, key=1):
    out = jax.tree_util.tree_map(lambda x: x, adapters)
    keys = iter(jax.random.split(jax.random.key(key), 4))
    for name in ("q", "v"):
        leaf = out[name]["kernel"]
        leaf["vera_lambda_d"] = jax.random.normal(next(keys), leaf["vera_lambda_d"].shape)
        leaf["vera_lambda_b"] = jax.random.normal(next(keys), leaf["vera_lambda_b"].shape)
    return out


def test_shared_projection_shapes_and_bounds():
    ad = lorajax.init(_spec(), _params(), jax.random.key(0))
    a_sh, b_sh = ad["_shared"]["vera_A"], ad["_shared"]["vera_B"]
    assert a_sh.shape == (10, R) and b_sh.shape == (R, 9)
    assert np.abs(np.asarray(a_sh)).max() <= math.sqrt(6 / 10)
    assert np.abs(np.asarray(b_sh)).max() <= math.sqrt(6 / R)


def test_projection_bounds_are_filled():
    """Kaiming-uniform with gain √2 on each matrix's own fan-in: U(±√(6/in_max)), U(±√(6/r))."""
    params = {"a": {"kernel": jnp.zeros((400, 300))}, "b": {"kernel": jnp.zeros((200, 500))}}
    r = 16
    ad = lorajax.init(lorajax.Spec("vera", rank=r, targets=["a", "b"]), params, jax.random.key(0))
    a_sh, b_sh = np.asarray(ad["_shared"]["vera_A"]), np.asarray(ad["_shared"]["vera_B"])
    assert a_sh.shape == (400, r) and b_sh.shape == (r, 500)
    for x, bound in ((a_sh, math.sqrt(6 / 400)), (b_sh, math.sqrt(6 / r))):
        assert np.abs(x).max() <= bound
        assert np.abs(x).max() > 0.95 * bound
        np.testing.assert_allclose(x.std(), bound / math.sqrt(3), rtol=0.05)


def test_lambda_init():
    ad = lorajax.init(_spec(d_initial=0.3), _params(), jax.random.key(0))
    for name, d_out in (("q", 9), ("v", 4)):
        leaf = ad[name]["kernel"]
        assert set(leaf) == {"vera_lambda_d", "vera_lambda_b"}
        assert leaf["vera_lambda_d"].shape == (R,) and leaf["vera_lambda_b"].shape == (d_out,)
        np.testing.assert_allclose(np.asarray(leaf["vera_lambda_d"]), 0.3)
        np.testing.assert_array_equal(np.asarray(leaf["vera_lambda_b"]), 0.0)


def test_projections_come_from_projection_prng_key():
    p = _params()
    a = lorajax.init(_spec(), p, jax.random.key(0))["_shared"]
    b = lorajax.init(_spec(), p, jax.random.key(123))["_shared"]  # other init key, same projections
    c = lorajax.init(_spec(projection_prng_key=0), p, jax.random.key(5))["_shared"]
    d = lorajax.init(_spec(projection_prng_key=1), p, jax.random.key(0))["_shared"]
    for k in ("vera_A", "vera_B"):
        np.testing.assert_array_equal(a[k], b[k])
        np.testing.assert_array_equal(a[k], c[k])
        assert not np.array_equal(a[k], d[k])


def test_merged_weight_equation():
    params = _params()
    spec = _spec()
    ad = _randomize(lorajax.init(spec, params, jax.random.key(0)))
    merged = lorajax.merge(spec, params, ad)
    a_sh = np.asarray(ad["_shared"]["vera_A"], np.float64)
    b_sh = np.asarray(ad["_shared"]["vera_B"], np.float64)
    for name in ("q", "v"):
        w = np.asarray(params[name]["kernel"], np.float64)
        d_in, d_out = w.shape
        d = np.asarray(ad[name]["kernel"]["vera_lambda_d"], np.float64)
        b = np.asarray(ad[name]["kernel"]["vera_lambda_b"], np.float64)
        want = w + ((a_sh[:d_in] * d[None, :]) @ b_sh[:, :d_out]) * b[None, :]
        np.testing.assert_allclose(np.asarray(merged[name]["kernel"]), want, rtol=1e-5, atol=1e-5, err_msg=name)


def test_factored_forward_equation():
    model = nn.Dense(7, name="dense")
    x = jax.random.normal(jax.random.key(3), (5, 11))
    variables = model.init(jax.random.key(0), x)
    spec = lorajax.Spec("vera", rank=R, targets=".*")
    ad = lorajax.init(spec, variables, jax.random.key(0))
    leaf = ad["params"]["kernel"]
    leaf["vera_lambda_d"] = jax.random.normal(jax.random.key(8), (R,))
    leaf["vera_lambda_b"] = jax.random.normal(jax.random.key(9), (7,))
    y = lorajax.adapt(model.apply, spec, mode="factored")(variables, ad, x)

    p = variables["params"]
    a, b = ad["_shared"]["vera_A"], ad["_shared"]["vera_B"]
    want = x @ p["kernel"] + p["bias"][None, :]
    want = want + (((x @ a) * leaf["vera_lambda_d"][None, :]) @ b) * leaf["vera_lambda_b"][None, :]
    np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_rank_may_exceed_min_in_out():
    params = _params()
    spec = _spec(rank=16)  # > min(6, 9) and > min(10, 4)
    ad = _randomize(lorajax.init(spec, params, jax.random.key(0)))
    assert ad["_shared"]["vera_A"].shape == (10, 16) and ad["_shared"]["vera_B"].shape == (16, 9)
    merged = lorajax.merge(spec, params, ad)
    w = params["v"]["kernel"]
    leaf = ad["v"]["kernel"]
    want = w + ((ad["_shared"]["vera_A"][:10] * leaf["vera_lambda_d"][None, :]) @ ad["_shared"]["vera_B"][:, :4]) \
        * leaf["vera_lambda_b"][None, :]
    np.testing.assert_allclose(np.asarray(merged["v"]["kernel"]), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_mixed_ranks_raise():
    with pytest.raises(ValueError, match="rank"):
        lorajax.init(_spec(rank_pattern={"v": 2}), _params(), jax.random.key(0))


def test_projections_are_frozen_and_get_no_gradient():
    params = _params()
    spec = _spec()
    ad = _randomize(lorajax.init(spec, params, jax.random.key(0)))
    mask = lorajax.trainable_mask(spec, ad)
    assert mask["_shared"] == {"vera_A": False, "vera_B": False}
    assert all(jax.tree_util.tree_leaves({k: v for k, v in mask.items() if k != "_shared"}))
    trainable, frozen = lorajax.partition(spec, ad)
    counts = lorajax.count_params(spec, params, ad)
    assert counts["trainable"] == (R + 9) + (R + 4)
    assert counts["frozen_adapter"] == 10 * R + R * 9

    x = jax.random.normal(jax.random.key(4), (3, 6))

    def loss(tr):
        merged = lorajax.merge(spec, params, lorajax.combine(tr, frozen))
        return jnp.sum(x @ merged["q"]["kernel"])

    grads = jax.grad(loss)(trainable)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(trainable)
    names = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(grads)[0]}
    assert not any("vera_A" in n or "vera_B" in n for n in names)


def test_unmerge_roundtrip():
    params = _params()
    spec = _spec()
    ad = _randomize(lorajax.init(spec, params, jax.random.key(0)))
    back = lorajax.unmerge(spec, lorajax.merge(spec, params, ad), ad)
    for name in ("q", "v"):
        np.testing.assert_allclose(np.asarray(back[name]["kernel"]), np.asarray(params[name]["kernel"]),
                                   rtol=1e-5, atol=1e-5)


def test_bf16_weights_keep_dtype():
    params = _params(jnp.bfloat16)
    spec = _spec()
    ad = _randomize(lorajax.init(spec, params, jax.random.key(0)))
    assert ad["_shared"]["vera_A"].dtype == jnp.float32
    merged = lorajax.merge(spec, params, ad)
    assert merged["q"]["kernel"].dtype == jnp.bfloat16


def test_bad_projection_key_rejected():
    with pytest.raises(ValueError, match="projection_prng_key"):
        _spec(projection_prng_key="0")


@pytest.mark.parametrize("rank", [2, 16])
def test_trainable_count_is_r_plus_out(rank):
    params, spec = _params(), _spec(rank=rank)
    ad = lorajax.init(spec, params, jax.random.key(0))
    targets = lorajax.select(spec, params)
    want = lorajax.count_params(spec, params, ad)["trainable"]
    assert lorajax.registry.get("vera").trainable_count(targets) == want == (rank + 9) + (rank + 4)


def test_options_are_typed():
    spec = _spec(d_initial=0.5)
    assert spec.options.d_initial == 0.5 and spec.options.projection_prng_key == 0
    with pytest.raises(ValueError, match="d_initial"):
        _spec(d_initial=float("nan"))
