"""LoRA-SB initialisation of the LoRA-XS architecture (specs/optim.md §6.2, §6.4), Flax orientation.

Derivation. ``D = -η sign(Ḡ_K)``: ``[in, out]`` with SVD ``U S Vᵀ``.
``lora_A = U_r``, ``lora_R = S_r / s``, ``lora_B = V_rᵀ``, so

* ``lora_Aᵀ lora_A = I_r`` and ``lora_B lora_Bᵀ = I_r``,
* ``s · lora_A lora_R lora_B = trunc_r(D)`` with the Eckart–Young error
  ``‖D - trunc_r(D)‖_F² = Σ_{i>r} σ_i²``,
* the LoRA-XS forward ``x K + s ((x A) R) B`` differentiates to
  ``∂L/∂R = s Aᵀ G_K Bᵀ``, so a step on R moves K by ``-η s² A Aᵀ G_K Bᵀ B``,
* the base is not shifted: ``merge(params, adapters) = K + trunc_r(D)``.
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax

sb_module = importlib.import_module("lorajax.inits.lora_sb")  # the module, not the function
R = 3


def _params(dtype=jnp.float32):
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    return {
        "a": {"kernel": jax.random.normal(k1, (10, 7), dtype), "bias": jnp.ones((7,), dtype)},
        "b": {"kernel": jax.random.normal(k2, (7, 12), dtype)},
        "c": {"kernel": jax.random.normal(k3, (7, 5), dtype)},  # not targeted
    }


def _grads(seed=1):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"a": {"kernel": jax.random.normal(k1, (10, 7))}, "b": {"kernel": jax.random.normal(k2, (7, 12))}}


def _spec(alpha=R, **kw):
    return lorajax.Spec("lora_xs", rank=R, alpha=alpha, targets=["a", "b"], **kw)


def _np(ad):
    return {k: np.asarray(v, np.float64) for k, v in ad.items()}


@pytest.mark.parametrize("alpha", [R, 2 * R])
def test_factors_and_truncated_update(alpha):
    params, grads, lr = _params(), _grads(), 2e-3
    spec = _spec(alpha)
    s = alpha / R
    adapters = lorajax.inits.lora_sb(spec, params, grads, lr=lr)
    for name in ("a", "b"):
        ad = _np(adapters[name]["kernel"])
        d = -lr * np.sign(np.asarray(grads[name]["kernel"], np.float64))
        u, sv, vh = np.linalg.svd(d, full_matrices=False)
        np.testing.assert_allclose(ad["lora_A"].T @ ad["lora_A"], np.eye(R), atol=1e-5)
        np.testing.assert_allclose(ad["lora_B"] @ ad["lora_B"].T, np.eye(R), atol=1e-5)
        np.testing.assert_allclose(ad["lora_R"], np.diag(sv[:R]) / s, rtol=1e-5, atol=1e-12)
        approx = s * ad["lora_A"] @ ad["lora_R"] @ ad["lora_B"]
        np.testing.assert_allclose(approx, (u[:, :R] * sv[:R]) @ vh[:R], atol=1e-5 * lr)
        np.testing.assert_allclose(np.sum((d - approx) ** 2), np.sum(sv[R:] ** 2), rtol=1e-4)


def test_base_not_shifted_and_unmerge_gives_the_identity_start():
    params, grads, lr = _params(), _grads(), 1e-2
    spec = _spec()
    adapters = lorajax.inits.lora_sb(spec, params, grads, lr=lr)
    merged = lorajax.merge(spec, params, adapters)
    for name in ("a", "b"):
        ad = _np(adapters[name]["kernel"])
        k = np.asarray(params[name]["kernel"], np.float64)
        np.testing.assert_allclose(np.asarray(merged[name]["kernel"]), k + ad["lora_A"] @ ad["lora_R"] @ ad["lora_B"],
                                   atol=1e-6)
    np.testing.assert_array_equal(np.asarray(merged["c"]["kernel"]), np.asarray(params["c"]["kernel"]))
    residual = lorajax.unmerge(spec, params, adapters)
    back = lorajax.merge(spec, residual, adapters)
    for name in ("a", "b", "c"):
        np.testing.assert_allclose(np.asarray(back[name]["kernel"]), np.asarray(params[name]["kernel"]), atol=1e-6)


def test_step_on_r_is_the_two_sided_projection():
    """Autodiff through lorajax.adapt (factored LoRA-XS) vs the closed form, on a linear model."""
    params, lr, eta = _params(), 1e-2, 0.3
    s = 2.0
    x = jax.random.normal(jax.random.key(4), (5, 10))
    y = jax.random.normal(jax.random.key(5), (5, 7))

    def model(p, inp):
        return inp @ p["a"]["kernel"] + p["a"]["bias"][None, :]

    def loss_fn(p, batch):
        return jnp.mean((model(p, batch[0]) - batch[1]) ** 2)

    spec_a = lorajax.Spec("lora_xs", rank=R, alpha=2 * R, targets=["a"])
    grads = lorajax.inits.estimate_gradients(spec_a, loss_fn, params, [(x, y)])
    adapters = lorajax.inits.lora_sb(spec_a, params, grads, lr=lr)
    fwd = lorajax.adapt(model, spec_a, mode="merged")  # a plain function: the factored mode needs linen layers
    trainable, frozen = lorajax.partition(spec_a, adapters)
    g_r = jax.grad(lambda tr: jnp.mean((fwd(params, lorajax.combine(tr, frozen), x) - y) ** 2))(trainable)
    ad = _np(adapters["a"]["kernel"])
    g_k = np.asarray(jax.grad(loss_fn)(lorajax.merge(spec_a, params, adapters), (x, y))["a"]["kernel"], np.float64)
    want = s * ad["lora_A"].T @ g_k @ ad["lora_B"].T
    np.testing.assert_allclose(np.asarray(g_r["a"]["kernel"]["lora_R"]), want, rtol=1e-4, atol=1e-7)
    assert g_r["a"]["kernel"]["lora_A"] is None and g_r["a"]["kernel"]["lora_B"] is None  # frozen
    # the weight moves by -η s² A Aᵀ G Bᵀ B
    new_r = ad["lora_R"] - eta * want
    dk = s * ad["lora_A"] @ (new_r - ad["lora_R"]) @ ad["lora_B"]
    pa, pb = ad["lora_A"] @ ad["lora_A"].T, ad["lora_B"].T @ ad["lora_B"]
    np.testing.assert_allclose(dk, -eta * s ** 2 * pa @ g_k @ pb, atol=1e-7)


def test_same_structure_as_lora_xs_init():
    params = _params()
    spec = _spec()
    ours = lorajax.inits.lora_sb(spec, params, _grads(), lr=1e-3)
    ref = lorajax.init(spec, params, jax.random.key(0))
    assert jax.tree_util.tree_structure(ours) == jax.tree_util.tree_structure(ref)
    jax.tree_util.tree_map(lambda a, b: (a.shape, a.dtype) == (b.shape, b.dtype) or pytest.fail(f"{a} {b}"),
                           ours, ref)


def test_lr_scales_only_r_and_sign_only_depends_on_the_gradient_sign():
    params, grads = _params(), _grads()
    a1 = lorajax.inits.lora_sb(_spec(), params, grads, lr=1e-3)
    a2 = lorajax.inits.lora_sb(_spec(), params, jax.tree_util.tree_map(lambda g: 7.0 * g, grads), lr=3e-3)
    for name in ("a", "b"):
        x1, x2 = _np(a1[name]["kernel"]), _np(a2[name]["kernel"])
        np.testing.assert_allclose(x2["lora_R"], 3 * x1["lora_R"], rtol=1e-5, atol=1e-12)
        # same D up to the factor 3: same singular vectors (to float32 SVD accuracy; a ±1 matrix's
        # singular values are close together, so the vectors are only good to ~1e-5)
        np.testing.assert_allclose(x2["lora_A"], x1["lora_A"], atol=1e-4)
        np.testing.assert_allclose(x2["lora_B"], x1["lora_B"], atol=1e-4)


def test_randomized_svd_is_near_optimal():
    params, grads, lr = _params(), _grads(), 1.0
    exact = lorajax.inits.lora_sb(_spec(), params, grads, lr=lr)
    approx = lorajax.inits.lora_sb(_spec(), params, grads, lr=lr, niter=10, key=jax.random.key(1))
    for name in ("a", "b"):
        d = -np.sign(np.asarray(grads[name]["kernel"], np.float64))
        err = {}
        for label, tree in (("exact", exact), ("approx", approx)):
            ad = _np(tree[name]["kernel"])
            np.testing.assert_allclose(ad["lora_A"].T @ ad["lora_A"], np.eye(R), atol=1e-5)
            err[label] = np.linalg.norm(d - ad["lora_A"] @ ad["lora_R"] @ ad["lora_B"])
        assert err["exact"] <= err["approx"] * (1 + 1e-6) and err["approx"] <= 1.02 * err["exact"], err


def test_dtypes():
    params = _params(jnp.bfloat16)
    ad = lorajax.inits.lora_sb(_spec(), params, _grads(), lr=1e-3)["a"]["kernel"]
    assert all(v.dtype == jnp.float32 for v in ad.values())
    ad = lorajax.inits.lora_sb(_spec(dtype="bfloat16"), params, _grads(), lr=1e-3)["a"]["kernel"]
    assert all(v.dtype == jnp.bfloat16 for v in ad.values())


def test_warmup_first_lr():
    assert sb_module.warmup_first_lr(1e-4, 0.02, 1000) == pytest.approx(1e-4 / 20)
    with pytest.raises(ValueError, match="warmup_ratio"):
        sb_module.warmup_first_lr(1e-4, 0.0, 1000)


def test_errors():
    with pytest.raises(ValueError, match="lora_xs"):
        lorajax.inits.lora_sb(lorajax.Spec("lora", rank=R, targets=["a"]), _params(), _grads(), lr=1e-3)
    with pytest.raises(ValueError, match="lr"):
        lorajax.inits.lora_sb(_spec(), _params(), _grads(), lr=0.0)
    with pytest.raises(ValueError, match="niter"):
        lorajax.inits.lora_sb(_spec(), _params(), _grads(), lr=1e-3, niter=-2)
    grads = _grads()
    del grads["a"]
    with pytest.raises(ValueError, match="a/kernel"):
        lorajax.inits.lora_sb(_spec(), _params(), grads, lr=1e-3)
