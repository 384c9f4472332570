"""LoRA / rsLoRA: what is unique to the variant (the shared checks live in tests/test_conformance.py).

Reference equations (specs/adapters.md §1a, Flax orientation ``W: [in, out]``,
``lora_A: [in, r]``, ``lora_B: [r, out]``)::

    W' = W + s · A B,    y = x W + b + s · (x A) B,    s = α/r  (α/√r with use_rslora)
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax

D_IN, D_OUT, R, ALPHA = 7, 5, 3, 6.0


def _params(key=0, d_in=D_IN, d_out=D_OUT, dtype=jnp.float32):
    k1, k2 = jax.random.split(jax.random.key(key))
    return {
        "dense": {
            "kernel": jax.random.normal(k1, (d_in, d_out), dtype),
            "bias": jax.random.normal(k2, (d_out,), dtype),
        }
    }


def _random_adapter(key, d_in=D_IN, d_out=D_OUT, r=R):
    ka, kb = jax.random.split(jax.random.key(key))
    return {"lora_A": jax.random.normal(ka, (d_in, r)), "lora_B": jax.random.normal(kb, (r, d_out))}


@pytest.mark.parametrize("use_rslora", [False, True])
def test_merged_weight_equation(use_rslora):
    params = _params()
    spec = lorajax.Spec("lora", rank=R, alpha=ALPHA, targets=["dense"], use_rslora=use_rslora)
    adapter = _random_adapter(1)
    merged = lorajax.merge(spec, params, {"dense": {"kernel": adapter}})

    w = np.asarray(params["dense"]["kernel"], np.float64)
    a, b = np.asarray(adapter["lora_A"], np.float64), np.asarray(adapter["lora_B"], np.float64)
    s = ALPHA / math.sqrt(R) if use_rslora else ALPHA / R
    np.testing.assert_allclose(np.asarray(merged["dense"]["kernel"]), w + s * a @ b, rtol=1e-5, atol=1e-5)
    # the bias is untouched
    np.testing.assert_array_equal(merged["dense"]["bias"], params["dense"]["bias"])


@pytest.mark.parametrize("use_rslora", [False, True])
def test_factored_forward_equation(use_rslora):
    model = nn.Dense(D_OUT, name="dense")
    x = jax.random.normal(jax.random.key(3), (4, D_IN))
    variables = model.init(jax.random.key(0), x)
    spec = lorajax.Spec("lora", rank=R, alpha=ALPHA, targets=".*", use_rslora=use_rslora)
    adapters = {"params": {"kernel": _random_adapter(2)}}
    y = lorajax.adapt(model.apply, spec, mode="factored")(variables, adapters, x)

    p = variables["params"]
    s = ALPHA / math.sqrt(R) if use_rslora else ALPHA / R
    a, b = adapters["params"]["kernel"]["lora_A"], adapters["params"]["kernel"]["lora_B"]
    want = x @ p["kernel"] + p["bias"][None, :] + s * ((x @ a) @ b)
    np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_rslora_differs_from_lora_by_sqrt_r():
    params = _params()
    adapters = {"dense": {"kernel": _random_adapter(1)}}
    w = params["dense"]["kernel"]
    d_plain = lorajax.merge(lorajax.Spec("lora", rank=R, alpha=ALPHA, targets=["dense"]), params, adapters)
    d_rs = lorajax.merge(lorajax.Spec("lora", rank=R, alpha=ALPHA, targets=["dense"], use_rslora=True),
                         params, adapters)
    ratio = (d_rs["dense"]["kernel"] - w) / (d_plain["dense"]["kernel"] - w)
    np.testing.assert_allclose(np.asarray(ratio), math.sqrt(R), rtol=1e-3)


def test_gradient_hand_formula():
    """dL/dA = s xᵀ G Bᵀ,  dL/dB = s (x A)ᵀ G  for L = sum(G ⊙ y)."""
    model = nn.Dense(D_OUT, name="dense")
    x = jax.random.normal(jax.random.key(3), (6, D_IN))
    g = jax.random.normal(jax.random.key(4), (6, D_OUT))
    variables = model.init(jax.random.key(0), x)
    spec = lorajax.Spec("lora", rank=R, alpha=ALPHA, targets=".*")
    adapter = _random_adapter(2)
    fwd = lorajax.adapt(model.apply, spec, mode="factored")
    grads = jax.grad(lambda ad: jnp.sum(fwd(variables, {"params": {"kernel": ad}}, x) * g))(adapter)
    s = ALPHA / R
    a, b = adapter["lora_A"], adapter["lora_B"]
    np.testing.assert_allclose(np.asarray(grads["lora_A"]), np.asarray(s * x.T @ g @ b.T), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(grads["lora_B"]), np.asarray(s * (x @ a).T @ g), rtol=1e-5, atol=1e-5)


def test_default_init_statistics():
    d_in, d_out, r = 256, 24, 16
    params = _params(d_in=d_in, d_out=d_out)
    spec = lorajax.Spec("lora", rank=r, targets=["dense"])
    ad = lorajax.init(spec, params, jax.random.key(0))["dense"]["kernel"]
    a, b = np.asarray(ad["lora_A"]), np.asarray(ad["lora_B"])
    assert a.shape == (d_in, r) and b.shape == (r, d_out)
    assert a.dtype == np.float32 and b.dtype == np.float32
    bound = 1.0 / math.sqrt(d_in)
    assert np.abs(a).max() <= bound
    # U(-bound, bound): fills the range, mean 0, std bound/√3
    assert np.abs(a).max() > 0.95 * bound
    assert abs(a.mean()) < 0.05 * bound
    np.testing.assert_allclose(a.std(), bound / math.sqrt(3), rtol=0.05)
    np.testing.assert_array_equal(b, 0.0)


def test_gaussian_init_statistics():
    d_in, r = 512, 8
    params = _params(d_in=d_in, d_out=10)
    spec = lorajax.Spec("lora", rank=r, targets=["dense"], init_weights="gaussian")
    ad = lorajax.init(spec, params, jax.random.key(0))["dense"]["kernel"]
    a = np.asarray(ad["lora_A"])
    assert abs(a.mean()) < 0.05 / r
    np.testing.assert_allclose(a.std(), 1.0 / r, rtol=0.05)
    np.testing.assert_array_equal(np.asarray(ad["lora_B"]), 0.0)


def test_init_weights_false_gives_nonzero_b():
    spec = lorajax.Spec("lora", rank=R, targets=["dense"], init_weights=False)
    ad = lorajax.init(spec, _params(), jax.random.key(0))["dense"]["kernel"]
    b = np.asarray(ad["lora_B"])
    assert np.abs(b).max() > 0
    assert np.abs(b).max() <= 1.0 / math.sqrt(R)


@pytest.mark.parametrize("mode", ["pissa", "pissa_niter_4", "olora"])
def test_data_aware_init_weights_point_to_inits(mode):
    spec = lorajax.Spec("lora", rank=R, targets=["dense"], init_weights=mode)
    with pytest.raises(ValueError, match="lorajax.inits"):
        lorajax.init(spec, _params(), jax.random.key(0))


def test_bad_init_weights_rejected_at_spec():
    with pytest.raises(ValueError, match="init_weights"):
        lorajax.Spec("lora", rank=R, init_weights="kaiming")


def test_init_is_deterministic_and_per_target():
    """Same key -> same adapters; adding a target does not change another target's init."""
    params = {"a": {"kernel": jnp.ones((6, 4))}, "b": {"kernel": jnp.ones((4, 6))}}
    one = lorajax.init(lorajax.Spec("lora", rank=2, targets=["a"], init_weights=False), params, 5)
    again = lorajax.init(lorajax.Spec("lora", rank=2, targets=["a"], init_weights=False), params, 5)
    both = lorajax.init(lorajax.Spec("lora", rank=2, targets=["a", "b"], init_weights=False), params, 5)
    other = lorajax.init(lorajax.Spec("lora", rank=2, targets=["a"], init_weights=False), params, 6)
    for k in ("lora_A", "lora_B"):
        np.testing.assert_array_equal(one["a"]["kernel"][k], again["a"]["kernel"][k])
        np.testing.assert_array_equal(one["a"]["kernel"][k], both["a"]["kernel"][k])
        assert not np.array_equal(one["a"]["kernel"][k], other["a"]["kernel"][k])
    assert not np.array_equal(both["a"]["kernel"]["lora_A"][:4], both["b"]["kernel"]["lora_A"])


def test_bf16_weight_f32_adapters_and_dtype_option():
    params = _params(dtype=jnp.bfloat16)
    spec = lorajax.Spec("lora", rank=R, targets=["dense"], init_weights=False)
    ad = lorajax.init(spec, params, jax.random.key(0))
    assert ad["dense"]["kernel"]["lora_A"].dtype == jnp.float32
    merged = lorajax.merge(spec, params, ad)
    assert merged["dense"]["kernel"].dtype == jnp.bfloat16

    spec16 = lorajax.Spec("lora", rank=R, targets=["dense"], dtype="bfloat16")
    ad16 = lorajax.init(spec16, _params(), jax.random.key(0))
    assert ad16["dense"]["kernel"]["lora_A"].dtype == jnp.bfloat16
    assert ad16["dense"]["kernel"]["lora_B"].dtype == jnp.bfloat16


def test_trainable_count_is_r_in_plus_out():
    spec = lorajax.Spec("lora", rank=R, targets=["dense"])
    ad = lorajax.init(spec, _params(), jax.random.key(0))
    counts = lorajax.count_params(spec, _params(), ad)
    assert counts["trainable"] == R * (D_IN + D_OUT)
    assert counts["frozen_adapter"] == 0


def test_merge_does_not_mutate():
    params = _params()
    before = jax.tree_util.tree_map(np.asarray, params)
    spec = lorajax.Spec("lora", rank=R, targets=["dense"])
    lorajax.merge(spec, params, {"dense": {"kernel": _random_adapter(1)}})
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, before)


def test_down_project_equals_the_plain_product_values_and_gradients():
    """`base.down_project` (x A with dA formed as (gᵀx)ᵀ behind a barrier): same values and gradients as x @ A,
    for 2-D and 3-D x, under vmap, and in bfloat16 (gradients in the inputs' dtypes)."""
    from lorajax.variants.base import down_project

    ks = jax.random.split(jax.random.key(0), 3)
    for shape in ((37, 12), (2, 5, 12)):
        x = jax.random.normal(ks[0], shape)
        a = jax.random.normal(ks[1], (12, 3))
        ct = jax.random.normal(ks[2], (*shape[:-1], 3))
        got = jax.grad(lambda x, a: jnp.sum(jnp.tanh(down_project(x, a)) * ct), (0, 1))(x, a)
        want = jax.grad(lambda x, a: jnp.sum(jnp.tanh(x @ a) * ct), (0, 1))(x, a)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    xs, as_ = jnp.stack([x, -x]), jnp.stack([a, 2 * a])
    np.testing.assert_allclose(jax.vmap(down_project)(xs, as_), jnp.einsum("nbti,nir->nbtr", xs, as_), atol=1e-5)
    xb, ab = x.astype(jnp.bfloat16), a.astype(jnp.bfloat16)
    gx, ga = jax.grad(lambda x, a: jnp.sum(down_project(x, a).astype(jnp.float32)), (0, 1))(xb, ab)
    assert gx.dtype == ga.dtype == jnp.bfloat16
