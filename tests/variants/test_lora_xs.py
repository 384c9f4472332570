"""LoRA-XS: what is unique to the variant (the shared checks live in tests/test_conformance.py).

Reference equations (specs/optim.md §6.1, arXiv:2405.17604, Flax orientation ``W: [in, out]``)::

    W = U Σ Vᵀ,   A = U_r Σ_r: [in, r],   B = V_rᵀ: [r, out]    (frozen; A B = trunc_r(W))
    W' = W + s · A R B,   y = x W + b + s · ((x A) R) B,   s = α / r
    R: [r, r] ~ N(0, σ²), σ = r_init_std = 1e-5 (official code); the only trainable leaf
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lorajax
from lorajax import registry

D_IN, D_OUT, R, ALPHA = 9, 7, 3, 6.0
S = ALPHA / R


def _params(dtype=jnp.float32):
    kq, kv = jax.random.split(jax.random.key(0))
    return {
        "q": {"kernel": jax.random.normal(kq, (D_IN, D_OUT), dtype)},
        "v": {"kernel": jax.random.normal(kv, (D_OUT, D_IN), dtype)},
    }


def _spec(**kw):
    kw.setdefault("rank", R)
    kw.setdefault("alpha", ALPHA)
    return lorajax.Spec("lora_xs", targets=["q", "v"], **kw)


def _randomize(adapters, key=1):
    out = jax.tree_util.tree_map(lambda x: x, adapters)
    keys = iter(jax.random.split(jax.random.key(key), 2))
    for name in ("q", "v"):
        out[name]["kernel"]["lora_R"] = jax.random.normal(next(keys), (R, R))
    return out


def _f64(x):
    return np.asarray(x, np.float64)


def test_frozen_factors_are_the_truncated_svd():
    params = _params()
    ad = lorajax.init(_spec(), params, jax.random.key(0))
    for name in ("q", "v"):
        w = _f64(params[name]["kernel"])
        leaf = ad[name]["kernel"]
        a, b = _f64(leaf["lora_A"]), _f64(leaf["lora_B"])
        assert a.shape == (w.shape[0], R) and b.shape == (R, w.shape[1]) and leaf["lora_R"].shape == (R, R)
        u, sv, vt = np.linalg.svd(w, full_matrices=False)
        trunc = (u[:, :R] * sv[None, :R]) @ vt[:R]
        np.testing.assert_allclose(a @ b, trunc, rtol=1e-5, atol=1e-5, err_msg=name)
        # B = V_rᵀ has orthonormal rows; A = U_r Σ_r has orthogonal columns of norms σ_1..σ_r
        np.testing.assert_allclose(b @ b.T, np.eye(R), atol=1e-5)
        np.testing.assert_allclose(a.T @ a, np.diag(sv[:R] ** 2), rtol=1e-5, atol=1e-4)
        # Eckart-Young: the residual holds exactly the discarded energy
        np.testing.assert_allclose(np.sum((w - a @ b) ** 2), np.sum(sv[R:] ** 2), rtol=1e-4)


def test_r_init_std_default_and_zero():
    w = jax.random.normal(jax.random.key(0), (64, 80))
    params = {"d": {"kernel": w}}
    spec = lorajax.Spec("lora_xs", rank=48, targets=["d"])
    assert spec.options["r_init_std"] == 1e-5
    core = np.asarray(lorajax.init(spec, params, jax.random.key(1))["d"]["kernel"]["lora_R"])
    assert core.shape == (48, 48)
    np.testing.assert_allclose(core.std(), 1e-5, rtol=0.05)
    assert abs(core.mean()) < 1e-6
    zero = lorajax.init(spec.replace(r_init_std=0.0), params, jax.random.key(1))["d"]["kernel"]["lora_R"]
    np.testing.assert_array_equal(np.asarray(zero), 0.0)


def test_default_init_is_a_near_identity():
    """The official σ = 1e-5 changes the weight by O(σ · ‖W‖), not exactly zero."""
    params = _params()
    spec = _spec()
    merged = lorajax.merge(spec, params, lorajax.init(spec, params, jax.random.key(0)))
    for name in ("q", "v"):
        w = np.asarray(params[name]["kernel"])
        d = np.abs(np.asarray(merged[name]["kernel"]) - w).max()
        assert 0 < d < 1e-3 * np.abs(w).max(), (name, d)
    exact = _spec(r_init_std=0.0)
    merged = lorajax.merge(exact, params, lorajax.init(exact, params, jax.random.key(0)))
    for name in ("q", "v"):
        np.testing.assert_array_equal(np.asarray(merged[name]["kernel"]), np.asarray(params[name]["kernel"]))


def test_merged_weight_equation():
    params = _params()
    spec = _spec()
    ad = _randomize(lorajax.init(spec, params, jax.random.key(0)))
    merged = lorajax.merge(spec, params, ad)
    for name in ("q", "v"):
        leaf = ad[name]["kernel"]
        want = _f64(params[name]["kernel"]) + S * _f64(leaf["lora_A"]) @ _f64(leaf["lora_R"]) @ _f64(leaf["lora_B"])
        np.testing.assert_allclose(np.asarray(merged[name]["kernel"]), want, rtol=1e-5, atol=1e-5, err_msg=name)


def test_factored_forward_equation():
    model = nn.Dense(D_OUT, name="dense")
    x = jax.random.normal(jax.random.key(3), (5, D_IN))
    variables = model.init(jax.random.key(0), x)
    spec = lorajax.Spec("lora_xs", rank=R, alpha=ALPHA, targets=".*")
    ad = lorajax.init(spec, variables, jax.random.key(0))
    leaf = ad["params"]["kernel"]
    leaf["lora_R"] = jax.random.normal(jax.random.key(8), (R, R))
    y = lorajax.adapt(model.apply, spec, mode="factored")(variables, ad, x)
    p = variables["params"]
    want = _f64(x) @ _f64(p["kernel"]) + _f64(p["bias"])[None, :]
    want = want + S * ((_f64(x) @ _f64(leaf["lora_A"])) @ _f64(leaf["lora_R"])) @ _f64(leaf["lora_B"])
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)


def test_gradient_of_r_and_one_step_in_closed_form():
    """g_R = s Aᵀ G Bᵀ with G = xᵀ g, so an SGD step moves W' by −η s² A Aᵀ G Bᵀ B (optim.md §6.2)."""
    params = {"d": {"kernel": jax.random.normal(jax.random.key(0), (D_IN, D_OUT))}}
    spec = lorajax.Spec("lora_xs", rank=R, alpha=ALPHA, targets=["d"])
    ad = lorajax.init(spec, params, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (6, D_IN))
    g = jax.random.normal(jax.random.key(2), (6, D_OUT))
    fwd = lorajax.adapt(lambda p, xx: xx @ p["d"]["kernel"], spec, mode="merged")
    trainable, frozen = lorajax.partition(spec, ad)

    def loss(tr):
        return jnp.sum(fwd(params, lorajax.combine(tr, frozen), x) * g)

    grads = jax.grad(loss)(trainable)
    a, b = _f64(ad["d"]["kernel"]["lora_A"]), _f64(ad["d"]["kernel"]["lora_B"])
    big_g = _f64(x).T @ _f64(g)  # dL/dW': [in, out]
    np.testing.assert_allclose(np.asarray(grads["d"]["kernel"]["lora_R"]), S * a.T @ big_g @ b.T, rtol=1e-4, atol=1e-4)

    lr = 0.01
    opt = optax.sgd(lr)
    updates, _ = opt.update(grads, opt.init(trainable))
    stepped = lorajax.combine(optax.apply_updates(trainable, updates), frozen)
    before, after = (_f64(lorajax.merge(spec, params, a_)["d"]["kernel"]) for a_ in (ad, stepped))
    moved = after - before
    np.testing.assert_allclose(moved, -lr * S**2 * a @ a.T @ big_g @ b.T @ b, rtol=1e-3, atol=1e-5)


def test_only_r_trains():
    params = _params()
    spec = _spec()
    ad = lorajax.init(spec, params, jax.random.key(0))
    mask = lorajax.trainable_mask(spec, ad)
    for name in ("q", "v"):
        assert mask[name]["kernel"] == {"lora_A": False, "lora_B": False, "lora_R": True}
    counts = lorajax.count_params(spec, params, ad)
    assert counts["trainable"] == 2 * R * R
    assert counts["frozen_adapter"] == 2 * R * (D_IN + D_OUT)


def test_matches_the_official_torch_layer():
    """The official forward (PEFT lora.Linear + an r×r ``default_lora_latent_mapping``) with
    lora_A.weight = Aᵀ, latent.weight = Rᵀ, lora_B.weight = Bᵀ gives our outputs and ΔW."""
    torch = pytest.importorskip("torch")
    params = {"d": {"kernel": jax.random.normal(jax.random.key(0), (D_IN, D_OUT))}}
    spec = lorajax.Spec("lora_xs", rank=R, alpha=ALPHA, targets=["d"])
    ad = lorajax.init(spec, params, jax.random.key(0))
    leaf = ad["d"]["kernel"]
    leaf["lora_R"] = jax.random.normal(jax.random.key(5), (R, R))
    x = np.asarray(jax.random.normal(jax.random.key(1), (4, D_IN)))

    base = torch.nn.Linear(D_IN, D_OUT, bias=False)
    lora_a = torch.nn.Linear(D_IN, R, bias=False)
    latent = torch.nn.Linear(R, R, bias=False)
    lora_b = torch.nn.Linear(R, D_OUT, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.tensor(np.asarray(params["d"]["kernel"]).T))
        lora_a.weight.copy_(torch.tensor(np.asarray(leaf["lora_A"]).T))
        latent.weight.copy_(torch.tensor(np.asarray(leaf["lora_R"]).T))
        lora_b.weight.copy_(torch.tensor(np.asarray(leaf["lora_B"]).T))
        xt = torch.tensor(x)
        y_t = base(xt) + lora_b(latent(lora_a(xt))) * S
        delta_t = (lora_b.weight @ latent.weight @ lora_a.weight) * S  # [out, in]

    (t,) = lorajax.select(spec, params)
    y = registry.get("lora_xs").apply(jnp.asarray(x), params["d"]["kernel"], leaf, t)  # factored forward
    np.testing.assert_allclose(np.asarray(y), y_t.numpy(), rtol=1e-5, atol=1e-5)
    merged = np.asarray(lorajax.merge(spec, params, ad)["d"]["kernel"])
    np.testing.assert_allclose(merged - np.asarray(params["d"]["kernel"]), delta_t.numpy().T, rtol=1e-5, atol=1e-5)


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
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(ad))
    merged = lorajax.merge(spec, params, ad)
    assert merged["q"]["kernel"].dtype == jnp.bfloat16


@pytest.mark.parametrize("bad", [-1e-5, float("nan"), "1e-5", True])
def test_bad_r_init_std_rejected(bad):
    with pytest.raises(ValueError, match="r_init_std"):
        _spec(r_init_std=bad)


def test_mismatched_adapter_names_the_path_and_the_rule():
    params = _params()
    spec = _spec()
    ad = lorajax.init(spec, params, jax.random.key(0))
    ad["v"]["kernel"]["lora_R"] = jnp.zeros((R + 1, R + 1))
    with pytest.raises(ValueError, match=r"v/kernel.*lora_R: \[r, r\]"):
        lorajax.merge(spec, params, ad)


@pytest.mark.parametrize("kw", [{}, {"rank_pattern": {"v": 2}, "r_init_std": 0.0}])
def test_trainable_count_formula(kw):
    """The declared ``trainable_count`` is ``Σ r²``, as counted on the adapters."""
    params = _params()
    spec = _spec(**kw)
    ad = lorajax.init(spec, params, jax.random.key(0))
    ts = lorajax.select(spec, params)
    want = lorajax.count_params(spec, params, ad)["trainable"]
    assert registry.get("lora_xs").trainable_count(ts) == want
    assert want == sum(t.rank ** 2 for t in ts)
