"""DoRA: what is unique to the variant (the shared checks live in tests/test_conformance.py).

Reference equations (specs/adapters.md §1b, Flax orientation ``W: [in, out]``)::

    V  = W + s · A B
    n  = ‖V‖₂ over axis 0 (one value per output feature), detached
    W' = V · m / n,         y = (x W + s (x A) B) · m / n + b
    magnitude m initialised to ‖W‖₂ over axis 0 (B = 0 at init)
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax

D_IN, D_OUT, R, ALPHA = 9, 6, 3, 4.0


def _kernel(key=0, shape=(D_IN, D_OUT), dtype=jnp.float32):
    return jax.random.normal(jax.random.key(key), shape, dtype)


def _random_adapter(key):
    ka, kb, km = jax.random.split(jax.random.key(key), 3)
    return {
        "lora_A": jax.random.normal(ka, (D_IN, R)),
        "lora_B": jax.random.normal(kb, (R, D_OUT)),
        "magnitude": 1.0 + jax.random.uniform(km, (D_OUT,)),
    }


def _col_norm(v):
    return jnp.sqrt(jnp.sum(v * v, axis=0))


def _ref_adapted(w, ad, s, detach=True):
    v = w + s * (ad["lora_A"] @ ad["lora_B"])
    n = _col_norm(v)
    if detach:
        n = jax.lax.stop_gradient(n)
    return v * (ad["magnitude"] / n)[None, :]


def test_magnitude_init_is_column_norm_of_kernel():
    w = _kernel()
    spec = lorajax.Spec("dora", rank=R, targets=["dense"])
    ad = lorajax.init(spec, {"dense": {"kernel": w}}, jax.random.key(1))["dense"]["kernel"]
    want = np.linalg.norm(np.asarray(w, np.float64), axis=0)  # [out]: one per output feature
    assert ad["magnitude"].shape == (D_OUT,)
    np.testing.assert_allclose(np.asarray(ad["magnitude"]), want, rtol=1e-6)
    # not the row norms (a transposed implementation would give [in] values)
    assert ad["lora_A"].shape == (D_IN, R) and ad["lora_B"].shape == (R, D_OUT)
    np.testing.assert_array_equal(np.asarray(ad["lora_B"]), 0.0)
    assert np.abs(np.asarray(ad["lora_A"])).max() <= 1 / math.sqrt(D_IN)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_merged_weight_equation(use_rslora):
    w = _kernel()
    spec = lorajax.Spec("dora", rank=R, alpha=ALPHA, targets=["dense"], use_rslora=use_rslora)
    ad = _random_adapter(2)
    merged = lorajax.merge(spec, {"dense": {"kernel": w}}, {"dense": {"kernel": ad}})["dense"]["kernel"]

    s = ALPHA / math.sqrt(R) if use_rslora else ALPHA / R
    w64 = np.asarray(w, np.float64)
    v = w64 + s * np.asarray(ad["lora_A"], np.float64) @ np.asarray(ad["lora_B"], np.float64)
    want = v * (np.asarray(ad["magnitude"], np.float64) / np.linalg.norm(v, axis=0))[None, :]
    np.testing.assert_allclose(np.asarray(merged), want, rtol=1e-5, atol=1e-5)
    # the columns of W' have norm m
    np.testing.assert_allclose(np.linalg.norm(np.asarray(merged), axis=0), ad["magnitude"], rtol=1e-5)


def test_factored_forward_equation():
    model = nn.Dense(D_OUT, name="dense")
    x = jax.random.normal(jax.random.key(3), (5, D_IN))
    variables = model.init(jax.random.key(0), x)
    spec = lorajax.Spec("dora", rank=R, alpha=ALPHA, targets=".*")
    ad = _random_adapter(4)
    y = lorajax.adapt(model.apply, spec, mode="factored")(variables, {"params": {"kernel": ad}}, x)

    p = variables["params"]
    s = ALPHA / R
    n = _col_norm(p["kernel"] + s * ad["lora_A"] @ ad["lora_B"])
    # the bias is added after the magnitude scaling, not rescaled
    want = (x @ p["kernel"] + s * (x @ ad["lora_A"]) @ ad["lora_B"]) * (ad["magnitude"] / n)[None, :]
    want = want + p["bias"][None, :]
    np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["merge", "factored"])
def test_gradient_uses_detached_norm(mode):
    """Gradients wrt (A, B, m) through lorajax equal the hand formula with n under stop_gradient."""
    w = _kernel()
    x = jax.random.normal(jax.random.key(5), (7, D_IN))
    g = jax.random.normal(jax.random.key(6), (7, D_OUT))
    ad = _random_adapter(7)
    s = ALPHA / R

    if mode == "merge":
        spec = lorajax.Spec("dora", rank=R, alpha=ALPHA, targets=["dense"])

        def loss(a):
            wp = lorajax.merge(spec, {"dense": {"kernel": w}}, {"dense": {"kernel": a}})["dense"]["kernel"]
            return jnp.sum((x @ wp) * g)
    else:
        model = nn.Dense(D_OUT, use_bias=False)
        spec = lorajax.Spec("dora", rank=R, alpha=ALPHA, targets=".*")
        fwd = lorajax.adapt(model.apply, spec, mode="factored")

        def loss(a):
            return jnp.sum(fwd({"params": {"kernel": w}}, {"params": {"kernel": a}}, x) * g)

    got = jax.grad(loss)(ad)

    def ref_loss(a, detach=True):
        return jnp.sum((x @ _ref_adapted(w, a, s, detach)) * g)

    want = jax.grad(ref_loss)(ad)
    for k in ("lora_A", "lora_B", "magnitude"):
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=1e-4, atol=1e-5, err_msg=k)

    # closed form, n detached:  G_W' = xᵀ G,  c = m / n
    #   dm = Σ_i G_W' ⊙ V / n,   dB = s Aᵀ (G_W' ⊙ c),   dA = s (G_W' ⊙ c) Bᵀ
    v = w + s * ad["lora_A"] @ ad["lora_B"]
    n = _col_norm(v)
    gw = x.T @ g
    gv = gw * (ad["magnitude"] / n)[None, :]
    np.testing.assert_allclose(np.asarray(got["magnitude"]), np.asarray(jnp.sum(gw * v, axis=0) / n),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got["lora_B"]), np.asarray(s * ad["lora_A"].T @ gv), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got["lora_A"]), np.asarray(s * gv @ ad["lora_B"].T), rtol=1e-4, atol=1e-5)

    # and the test discriminates: with the norm NOT detached the gradients differ
    undetached = jax.grad(lambda a: ref_loss(a, detach=False))(ad)
    assert not np.allclose(np.asarray(undetached["lora_B"]), np.asarray(got["lora_B"]), rtol=1e-3, atol=1e-4)
    assert not np.allclose(np.asarray(undetached["lora_A"]), np.asarray(got["lora_A"]), rtol=1e-3, atol=1e-4)
    # (dm is the same either way: n does not depend on m)


def test_trainable_count_is_r_in_plus_out_plus_out():
    params = {"dense": {"kernel": _kernel()}}
    spec = lorajax.Spec("dora", rank=R, targets=["dense"])
    ad = lorajax.init(spec, params, jax.random.key(0))
    assert lorajax.count_params(spec, params, ad)["trainable"] == R * (D_IN + D_OUT) + D_OUT


def test_bf16_weight_keeps_dtype_and_magnitude_is_f32():
    w16 = _kernel(dtype=jnp.bfloat16)
    params = {"dense": {"kernel": w16}}
    spec = lorajax.Spec("dora", rank=R, targets=["dense"])
    ad = lorajax.init(spec, params, jax.random.key(0))
    m = ad["dense"]["kernel"]["magnitude"]
    assert m.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(m), np.linalg.norm(np.asarray(w16.astype(jnp.float32)), axis=0),
                               rtol=1e-5)
    merged = lorajax.merge(spec, params, ad)["dense"]["kernel"]
    assert merged.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(merged.astype(jnp.float32)), np.asarray(w16.astype(jnp.float32)))


def test_unmerge_not_implemented():
    params = {"dense": {"kernel": _kernel()}}
    spec = lorajax.Spec("dora", rank=R, targets=["dense"])
    ad = lorajax.init(spec, params, jax.random.key(0))
    with pytest.raises(NotImplementedError):
        lorajax.unmerge(spec, lorajax.merge(spec, params, ad), ad)
