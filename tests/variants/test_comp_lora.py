"""Comp-LoRA (hard projection, the UNVERIFIED design of specs/adapters.md §12a).

Reference equations (Flax orientation ``W: [in, out]``)::

    W = U Σ Vᵀ,  U_k: [in, k],  V_k: [out, k]    (frozen comp_U, comp_V; k = top_k, default the rank)
    ΔW = s · (I − U_k U_kᵀ) A B (I − V_k V_kᵀ),  s = α / r
    W' = W + ΔW,   y = x W + b + x ΔW
    ⇒ U_kᵀ ΔW = 0, ΔW V_k = 0 for any A, B;  U_kᵀ W' V_k = Σ_k
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lorajax

D_IN, D_OUT, R, K, ALPHA = 10, 8, 3, 2, 6.0
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
    kw.setdefault("top_k", K)
    return lorajax.Spec("comp_lora", targets=["q", "v"], **kw)


def _randomize(spec, adapters, seed=1):
    trainable, frozen = lorajax.partition(spec, adapters)
    leaves, treedef = jax.tree_util.tree_flatten(trainable)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return lorajax.combine(jax.tree_util.tree_unflatten(treedef, leaves), frozen)


def _f64(x):
    return np.asarray(x, np.float64)


def _assert_in_complement(params, merged, adapters, tol=1e-5):
    for name in ("q", "v"):
        leaf = adapters[name]["kernel"]
        u, v = _f64(leaf["comp_U"]), _f64(leaf["comp_V"])
        d = _f64(merged[name]["kernel"]) - _f64(params[name]["kernel"])
        scale = np.abs(d).max()
        assert scale > 1e-3, f"{name}: the update is (nearly) zero, the check would be vacuous"
        np.testing.assert_allclose(u.T @ d, 0.0, atol=tol * max(scale, 1.0), err_msg=f"{name}: U_kᵀ ΔW")
        np.testing.assert_allclose(d @ v, 0.0, atol=tol * max(scale, 1.0), err_msg=f"{name}: ΔW V_k")


def test_buffers_are_the_top_k_singular_vectors():
    params = _params()
    ad = lorajax.init(_spec(), params, jax.random.key(0))
    for name in ("q", "v"):
        w = _f64(params[name]["kernel"])
        leaf = ad[name]["kernel"]
        u, v = _f64(leaf["comp_U"]), _f64(leaf["comp_V"])
        assert u.shape == (w.shape[0], K) and v.shape == (w.shape[1], K)
        assert leaf["lora_A"].shape == (w.shape[0], R) and leaf["lora_B"].shape == (R, w.shape[1])
        np.testing.assert_array_equal(np.asarray(leaf["lora_B"]), 0.0)
        uu, sv, vt = np.linalg.svd(w, full_matrices=False)
        # compare projectors: singular vectors are defined up to sign
        np.testing.assert_allclose(u @ u.T, uu[:, :K] @ uu[:, :K].T, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(v @ v.T, vt[:K].T @ vt[:K], atol=1e-5, err_msg=name)
        np.testing.assert_allclose(u.T @ u, np.eye(K), atol=1e-5)


def test_default_subspace_size_is_the_rank():
    params = _params()
    ad = lorajax.init(lorajax.Spec("comp_lora", rank=R, targets=["q"]), params, jax.random.key(0))
    assert ad["q"]["kernel"]["comp_U"].shape == (D_IN, R) and ad["q"]["kernel"]["comp_V"].shape == (D_OUT, R)


def test_update_is_in_the_complement_for_random_factors():
    params = _params()
    spec = _spec()
    ad = _randomize(spec, lorajax.init(spec, params, jax.random.key(0)))
    _assert_in_complement(params, lorajax.merge(spec, params, ad), ad)


def test_update_stays_in_the_complement_after_optimizer_steps():
    params = _params()
    spec = _spec()
    ad0 = lorajax.init(spec, params, jax.random.key(0))
    trainable, frozen = lorajax.partition(spec, ad0)
    x = jax.random.normal(jax.random.key(1), (6, D_IN))
    target = jax.random.normal(jax.random.key(2), (6, D_IN))
    fwd = lorajax.adapt(lambda p, xx: (xx @ p["q"]["kernel"]) @ p["v"]["kernel"], spec, mode="merged")

    def loss(tr):
        return jnp.mean((fwd(params, lorajax.combine(tr, frozen), x) - target) ** 2)

    opt = optax.adam(0.05)
    state = opt.init(trainable)
    for _ in range(5):
        updates, state = opt.update(jax.grad(loss)(trainable), state, trainable)
        trainable = optax.apply_updates(trainable, updates)
    ad = lorajax.combine(trainable, frozen)
    assert loss(trainable) < loss(lorajax.partition(spec, ad0)[0])
    _assert_in_complement(params, lorajax.merge(spec, params, ad), ad)


def test_top_singular_directions_and_values_are_kept():
    params = _params()
    spec = _spec()
    ad = _randomize(spec, lorajax.init(spec, params, jax.random.key(0)))
    merged = lorajax.merge(spec, params, ad)
    for name in ("q", "v"):
        leaf = ad[name]["kernel"]
        u, v = _f64(leaf["comp_U"]), _f64(leaf["comp_V"])
        sv = np.linalg.svd(_f64(params[name]["kernel"]), compute_uv=False)
        np.testing.assert_allclose(u.T @ _f64(merged[name]["kernel"]) @ v, np.diag(sv[:K]), atol=1e-4, err_msg=name)


def test_merged_weight_equation_with_dense_projectors():
    params = _params()
    spec = _spec()
    ad = _randomize(spec, lorajax.init(spec, params, jax.random.key(0)))
    merged = lorajax.merge(spec, params, ad)
    for name in ("q", "v"):
        leaf = ad[name]["kernel"]
        w = _f64(params[name]["kernel"])
        u, v = _f64(leaf["comp_U"]), _f64(leaf["comp_V"])
        p_in, p_out = np.eye(w.shape[0]) - u @ u.T, np.eye(w.shape[1]) - v @ v.T
        want = w + S * p_in @ _f64(leaf["lora_A"]) @ _f64(leaf["lora_B"]) @ p_out
        np.testing.assert_allclose(np.asarray(merged[name]["kernel"]), want, rtol=1e-5, atol=1e-5, err_msg=name)


def test_factored_forward_equation():
    model = nn.Dense(D_OUT, name="dense")
    x = jax.random.normal(jax.random.key(3), (5, D_IN))
    variables = model.init(jax.random.key(0), x)
    spec = lorajax.Spec("comp_lora", rank=R, alpha=ALPHA, targets=".*", top_k=K)
    ad = _randomize(spec, lorajax.init(spec, variables, jax.random.key(0)))
    y = lorajax.adapt(model.apply, spec, mode="factored")(variables, ad, x)
    p, leaf = variables["params"], ad["params"]["kernel"]
    u, v = _f64(leaf["comp_U"]), _f64(leaf["comp_V"])
    delta = S * (np.eye(D_IN) - u @ u.T) @ _f64(leaf["lora_A"]) @ _f64(leaf["lora_B"]) @ (np.eye(D_OUT) - v @ v.T)
    want = _f64(x) @ (_f64(p["kernel"]) + delta) + _f64(p["bias"])[None, :]
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)


def test_gradients_live_in_the_complement():
    params = _params()
    spec = _spec()
    ad = _randomize(spec, lorajax.init(spec, params, jax.random.key(0)))
    trainable, frozen = lorajax.partition(spec, ad)
    x = jax.random.normal(jax.random.key(1), (6, D_IN))
    fwd = lorajax.adapt(lambda p, xx: (xx @ p["q"]["kernel"]) @ p["v"]["kernel"], spec, mode="merged")
    grads = jax.grad(lambda tr: jnp.sum(jnp.sin(fwd(params, lorajax.combine(tr, frozen), x))))(trainable)
    for name in ("q", "v"):
        g, leaf = grads[name]["kernel"], ad[name]["kernel"]
        assert {k for k, x in g.items() if x is not None} == {"lora_A", "lora_B"}
        tol = 1e-5 * max(1.0, *(float(np.abs(np.asarray(g[k])).max()) for k in ("lora_A", "lora_B")))
        np.testing.assert_allclose(_f64(leaf["comp_U"]).T @ _f64(g["lora_A"]), 0.0, atol=tol)
        np.testing.assert_allclose(_f64(g["lora_B"]) @ _f64(leaf["comp_V"]), 0.0, atol=tol)
        assert np.abs(np.asarray(g["lora_A"])).max() > 1e-3


def test_top_k_zero_is_lora():
    params = _params()
    comp = _spec(top_k=0)
    plain = lorajax.Spec("lora", rank=R, alpha=ALPHA, targets=["q", "v"])
    ad_c = _randomize(comp, lorajax.init(comp, params, jax.random.key(0)))
    ad_l = lorajax.init(plain, params, jax.random.key(0))
    for name in ("q", "v"):
        assert ad_c[name]["kernel"]["comp_U"].shape == (params[name]["kernel"].shape[0], 0)
        for k in ("lora_A", "lora_B"):
            ad_l[name]["kernel"][k] = ad_c[name]["kernel"][k]
    m_c, m_l = lorajax.merge(comp, params, ad_c), lorajax.merge(plain, params, ad_l)
    for name in ("q", "v"):
        np.testing.assert_allclose(np.asarray(m_c[name]["kernel"]), np.asarray(m_l[name]["kernel"]), rtol=1e-6,
                                   atol=1e-6)


@pytest.mark.xla_optimized  # exact-share boundary / bit equality with bitsandbytes
def test_energy_picks_the_smallest_k_holding_the_share():
    # kernel with singular values 4, 2, 1, 1 (energy 16, 4, 1, 1 of 22)
    q1, _ = np.linalg.qr(np.asarray(jax.random.normal(jax.random.key(0), (D_IN, 4))))
    q2, _ = np.linalg.qr(np.asarray(jax.random.normal(jax.random.key(1), (D_OUT, 4))))
    w = jnp.asarray((q1 * np.array([4.0, 2.0, 1.0, 1.0])[None, :]) @ q2.T, jnp.float32)
    params = {"d": {"kernel": w}}
    for energy, k in ((0.5, 1), (16 / 22, 1), (0.75, 2), (0.9, 2), (0.95, 3)):
        spec = lorajax.Spec("comp_lora", rank=2, targets=["d"], energy=energy)
        ad = lorajax.init(spec, params, jax.random.key(0))
        assert ad["d"]["kernel"]["comp_U"].shape == (D_IN, k), energy


def test_counts():
    params = _params()
    spec = _spec()
    ad = lorajax.init(spec, params, jax.random.key(0))
    mask = lorajax.trainable_mask(spec, ad)
    assert mask["q"]["kernel"] == {"lora_A": True, "lora_B": True, "comp_U": False, "comp_V": False}
    counts = lorajax.count_params(spec, params, ad)
    assert counts["trainable"] == 2 * R * (D_IN + D_OUT)
    assert counts["frozen_adapter"] == 2 * K * (D_IN + D_OUT)


def test_unmerge_roundtrip_and_bf16():
    params = _params()
    spec = _spec()
    ad = _randomize(spec, lorajax.init(spec, params, jax.random.key(0)))
    back = lorajax.unmerge(spec, lorajax.merge(spec, params, ad), ad)
    for name in ("q", "v"):
        np.testing.assert_allclose(np.asarray(back[name]["kernel"]), np.asarray(params[name]["kernel"]),
                                   rtol=1e-5, atol=1e-5)
    p16 = _params(jnp.bfloat16)
    ad16 = lorajax.init(spec, p16, jax.random.key(0))
    assert ad16["q"]["kernel"]["comp_U"].dtype == jnp.float32
    assert lorajax.merge(spec, p16, ad16)["q"]["kernel"].dtype == jnp.bfloat16


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(top_k=-1), "top_k"),
        (dict(top_k=True), "top_k"),
        (dict(top_k=1.5), "top_k"),
        (dict(top_k=None, energy=1.5), "energy"),
        (dict(top_k=None, energy=0.0), "energy"),
        (dict(top_k=2, energy=0.9), "not both"),
        (dict(init_weights="pissa"), "init_weights"),
    ],
)
def test_bad_options_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _spec(**kwargs)


def test_subspace_too_large_names_the_target():
    # q is [10, 8]: k = 8 leaves no complement on the output side
    with pytest.raises(ValueError, match=r"min\(in, out\) = 8 for 'q'"):
        lorajax.init(_spec(top_k=8), _params(), jax.random.key(0))


def test_mismatched_buffers_name_the_path():
    params = _params()
    spec = _spec()
    ad = lorajax.init(spec, params, jax.random.key(0))
    ad["v"]["kernel"]["comp_V"] = jnp.zeros((D_IN + 1, K))
    with pytest.raises(ValueError, match=r"v/kernel.*comp_V: \[out, k\]"):
        lorajax.merge(spec, params, ad)


@pytest.mark.parametrize("kw", [{}, {"rank_pattern": {"v": 2}, "top_k": None, "energy": 0.5}])
def test_trainable_count_formula(kw):
    """The declared ``trainable_count`` is ``Σ r · (in + out)``, as counted on the adapters."""
    params = _params()
    spec = _spec(**kw)
    ad = lorajax.init(spec, params, jax.random.key(0))
    ts = lorajax.select(spec, params)
    want = lorajax.count_params(spec, params, ad)["trainable"]
    assert lorajax.registry.get("comp_lora").trainable_count(ts) == want
    assert want == sum(t.rank * sum(t.matrix_shape) for t in ts)


def test_update_depends_on_the_factors_only_through_their_product():
    """The declared `Factors` (exact=False): ``(A T, T⁻¹ B)`` gives the same adapted weight."""
    v = lorajax.registry.get("comp_lora")
    assert v.factors.a == "lora_A" and v.factors.b == "lora_B" and not v.factors.exact
    params = _params()
    spec = _spec()
    ad = _randomize(spec, lorajax.init(spec, params, jax.random.key(0)))
    t = next(t for t in lorajax.select(spec, params) if t.name == "q")
    assert v.factors.scale(t) == S
    m = jax.random.normal(jax.random.key(9), (R, R)) + 3 * jnp.eye(R)
    leaf = ad["q"]["kernel"]
    moved = {**leaf, "lora_A": leaf["lora_A"] @ m, "lora_B": jnp.linalg.solve(m, leaf["lora_B"])}
    w = params["q"]["kernel"]
    np.testing.assert_allclose(np.asarray(v.adapted(w, moved, t)), np.asarray(v.adapted(w, leaf, t)),
                               rtol=1e-4, atol=1e-4)
