"""LoRA-GA initialisation (specs/optim.md §5), checked in lorajax's Flax orientation.

Derivation. PEFT works on ``W = Kᵀ: [m=out, n=in]`` and ``G = ∂L/∂W = G_Kᵀ``
with ``G = U S Vᵀ``. Default "ArB2r": ``A = V_1ᵀ`` (triplets 0..r-1),
``B = c · U_2 S_2`` (triplets r..2r-1), ``c = m^{1/4}/√γ`` ("stable"), and
``W_res = W - s B A``. lorajax stores ``lora_A = Aᵀ = V_1: [in, r]`` and
``lora_B = Bᵀ = c S_2 U_2ᵀ: [r, out]``. Hence (all sign-independent):

* ``lora_Aᵀ lora_A = I_r``, ``lora_A lora_Aᵀ = V_1 V_1ᵀ``,
* ``lora_B lora_Bᵀ = c² S_2²``, ``lora_Bᵀ lora_B = c² U_2 S_2² U_2ᵀ``,
* ``K_res + s · lora_A lora_B = K`` (function unchanged),
* first SGD step on A and B: ``ΔW = -η s² (B Bᵀ G + G Aᵀ A) + O(η²)`` with
  ``B Bᵀ G + G Aᵀ A = c² U_2 S_2³ V_2ᵀ + U_1 S_1 V_1ᵀ``;
  with the authors' unscaled factors (``source="official"``, "unit")
  ``B = U_2`` and the sum is ``trunc_2r(G)``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax

R, ALPHA = 2, 6.0  # s = 3


def _params(dtype=jnp.float32):
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    return {
        "a": {"kernel": jax.random.normal(k1, (10, 7), dtype), "bias": jnp.ones((7,), dtype)},
        "b": {"kernel": jax.random.normal(k2, (7, 12), dtype)},
        "c": {"kernel": jax.random.normal(k3, (7, 5), dtype)},  # not targeted
    }


def _grads(seed=1):
    """Gradients with well-separated singular values (so that float32 SVDs are accurate)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in (("a", (10, 7)), ("b", (7, 12))):
        k = min(shape)
        u = np.linalg.qr(rng.standard_normal((shape[0], k)))[0]
        v = np.linalg.qr(rng.standard_normal((shape[1], k)))[0]
        out[name] = {"kernel": jnp.asarray((u * 0.6 ** np.arange(k)[None, :]) @ v.T, jnp.float32)}
    return out


def _spec(**kw):
    return lorajax.Spec("lora", rank=kw.pop("rank", R), alpha=kw.pop("alpha", ALPHA), targets=["a", "b"], **kw)


def _s(spec):
    return spec.alpha / (math.sqrt(spec.rank) if spec.options["use_rslora"] else spec.rank)


def _svd(g_k):
    """Torch-orientation SVD of G = G_Kᵀ in float64."""
    u, sv, vh = np.linalg.svd(np.asarray(g_k, np.float64).T, full_matrices=False)
    return u, sv, vh.T


def _factors(adapters, name):
    ad = adapters[name]["kernel"]
    return np.asarray(ad["lora_A"], np.float64), np.asarray(ad["lora_B"], np.float64)


@pytest.mark.parametrize("kw", [{}, {"direction": "A2rBr"}, {"scale": "weight_svd"}, {"scale": "gd_scale"},
                                {"source": "official", "scale": "weightS"}, {"direction": "random"}])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_function_unchanged_at_init(kw, use_rslora):
    params, spec = _params(), _spec(use_rslora=use_rslora)
    adapters, residual = lorajax.inits.lora_ga(spec, params, _grads(), **kw)
    merged = lorajax.merge(spec, residual, adapters)
    for name in ("a", "b", "c"):
        np.testing.assert_allclose(np.asarray(merged[name]["kernel"]), np.asarray(params[name]["kernel"]),
                                   atol=1e-5, err_msg=name)
    assert residual["c"]["kernel"] is params["c"]["kernel"] and residual["a"]["bias"] is params["a"]["bias"]
    assert set(adapters) == {"a", "b"}


@pytest.mark.parametrize("gamma", [16, 64])
def test_default_factors(gamma):
    params, spec, grads = _params(), _spec(), _grads()
    adapters, residual = lorajax.inits.lora_ga(spec, params, grads, stable_gamma=gamma)
    for name in ("a", "b"):
        u, sv, v = _svd(grads[name]["kernel"])
        m = params[name]["kernel"].shape[1]  # out
        c = m ** 0.25 / math.sqrt(gamma)
        a, b = _factors(adapters, name)
        u2, s2 = u[:, R:2 * R], sv[R:2 * R]
        np.testing.assert_allclose(a.T @ a, np.eye(R), atol=1e-5)
        np.testing.assert_allclose(a @ a.T, v[:, :R] @ v[:, :R].T, atol=1e-5)
        np.testing.assert_allclose(b @ b.T, c ** 2 * np.diag(s2 ** 2), atol=1e-5)
        np.testing.assert_allclose(b.T @ b, c ** 2 * (u2 * s2 ** 2) @ u2.T, atol=1e-5)
        k = np.asarray(params[name]["kernel"], np.float64)
        np.testing.assert_allclose(np.asarray(residual[name]["kernel"]), k - _s(spec) * a @ b, atol=1e-5)


@pytest.mark.parametrize("source,scale", [("peft", "unit"), ("peft", "stable"), ("official", "unit"),
                                          ("official", "stable")])
def test_first_step_direction(source, scale):
    """``B Bᵀ G + G Aᵀ A`` (PyTorch orientation) in closed form."""
    params, spec, grads = _params(), _spec(), _grads()
    adapters, _ = lorajax.inits.lora_ga(spec, params, grads, source=source, scale=scale)
    for name in ("a", "b"):
        g_k = np.asarray(grads[name]["kernel"], np.float64)
        g = g_k.T
        u, sv, v = _svd(g_k)
        m = g.shape[0]
        c = m ** 0.25 / 4.0 if scale == "stable" else 1.0
        a_k, b_k = _factors(adapters, name)
        a, b = a_k.T, b_k.T  # [r, in], [out, r]
        got = b @ b.T @ g + g @ a.T @ a
        one = (u[:, :R] * sv[:R]) @ v[:, :R].T
        if source == "peft":   # B carries S_2 and only B is scaled
            want = c ** 2 * (u[:, R:2 * R] * sv[R:2 * R] ** 3) @ v[:, R:2 * R].T + one
        else:                  # unscaled singular vectors, both scaled by c
            want = c ** 2 * ((u[:, :2 * R] * sv[:2 * R]) @ v[:, :2 * R].T)
            np.testing.assert_allclose(a @ a.T, c ** 2 * np.eye(R), atol=1e-5)
            np.testing.assert_allclose(b.T @ b, c ** 2 * np.eye(R), atol=1e-5)
        np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max(), err_msg=name)


def test_one_sgd_step_follows_the_closed_form():
    """With the linear loss <G_K, K>, estimate_gradients gives G and one SGD step on A, B gives
    ``ΔK = -η s² (B Bᵀ G + G Aᵀ A)ᵀ + O(η²)``."""
    params, spec, target = _params(), _spec(), _grads()
    loss = lambda p, _: sum(jnp.sum(p[n]["kernel"] * target[n]["kernel"]) for n in ("a", "b"))
    grads = lorajax.inits.estimate_gradients(spec, loss, params, [None, None])
    np.testing.assert_allclose(np.asarray(grads["a"]["kernel"]), np.asarray(target["a"]["kernel"]), atol=1e-7)
    adapters, residual = lorajax.inits.lora_ga(spec, params, grads, scale="unit")
    g_ad = jax.grad(lambda ad: loss(lorajax.merge(spec, residual, ad), None))(adapters)
    eta, s = 1e-3, _s(spec)
    stepped = jax.tree_util.tree_map(lambda p, d: p - eta * d, adapters, g_ad)
    before = lorajax.merge(spec, residual, adapters)
    after = lorajax.merge(spec, residual, stepped)
    for name in ("a", "b"):
        a_k, b_k = _factors(adapters, name)
        g = np.asarray(target[name]["kernel"], np.float64).T
        closed = -eta * s ** 2 * (b_k.T @ b_k @ g + g @ a_k @ a_k.T)
        delta = np.asarray(after[name]["kernel"], np.float64) - np.asarray(before[name]["kernel"], np.float64)
        np.testing.assert_allclose(delta, closed.T, atol=2e-3 * np.abs(closed).max(), err_msg=name)


@pytest.mark.parametrize("direction,idx_a,idx_b", [
    ("ArB2r", [0, 1], [2, 3]), ("A2rBr", [2, 3], [0, 1]), ("ArBr", [1, 3], [0, 2])])
def test_directions_pick_the_triplets(direction, idx_a, idx_b):
    params, spec, grads = _params(), _spec(), _grads()
    adapters, _ = lorajax.inits.lora_ga(spec, params, grads, direction=direction, scale="unit")
    for name in ("a", "b"):
        u, sv, v = _svd(grads[name]["kernel"])
        a, b = _factors(adapters, name)
        np.testing.assert_allclose(a @ a.T, v[:, idx_a] @ v[:, idx_a].T, atol=1e-5)
        np.testing.assert_allclose(b.T @ b, (u[:, idx_b] * sv[idx_b] ** 2) @ u[:, idx_b].T, atol=1e-5)


def test_random_direction_uses_one_index_set_for_a_and_b():
    params, spec, grads = _params(), _spec(), _grads()
    seen = set()
    for seed in range(6):
        adapters, _ = lorajax.inits.lora_ga(spec, params, grads, jax.random.key(seed), direction="random",
                                            scale="unit")
        u, sv, v = _svd(grads["a"]["kernel"])
        a, b = _factors(adapters, "a")
        # B A = Σ_{i∈I} u_i σ_i v_iᵀ: its singular values are σ_I, a subset of the top 2r
        got = np.linalg.svd(b.T @ a.T, compute_uv=False)[:R]
        idx = tuple(sorted(int(np.argmin(np.abs(sv[:2 * R] - x))) for x in got))
        np.testing.assert_allclose(b.T @ a.T, (u[:, idx] * sv[list(idx)]) @ v[:, idx].T, atol=1e-5)
        seen.add(idx)
    assert len(seen) > 1
    again, _ = lorajax.inits.lora_ga(spec, params, grads, jax.random.key(5), direction="random", scale="unit")
    np.testing.assert_array_equal(_factors(again, "a")[0], a)


def test_scales():
    params, spec, grads = _params(), _spec(), _grads()
    unit, _ = lorajax.inits.lora_ga(spec, params, grads, scale="unit")
    gd, _ = lorajax.inits.lora_ga(spec, params, grads, scale="gd_scale")
    wsvd, _ = lorajax.inits.lora_ga(spec, params, grads, scale="weight_svd", niter=None)
    s = _s(spec)
    for name in ("a", "b"):
        a_u, b_u = _factors(unit, name)
        a_g, b_g = _factors(gd, name)
        np.testing.assert_allclose(a_g, a_u / s, atol=1e-6)
        np.testing.assert_allclose(b_g, b_u / s, atol=1e-6)
        # weight_svd: B's first column (row here) gets the norm σ₁(W)
        a_w, b_w = _factors(wsvd, name)
        sigma1 = np.linalg.svd(np.asarray(params[name]["kernel"], np.float64), compute_uv=False)[0]
        np.testing.assert_allclose(np.linalg.norm(b_w[0]), sigma1, rtol=1e-5)
        np.testing.assert_allclose(a_w, a_u, atol=1e-6)


def test_randomized_equals_exact_when_the_sketch_spans_the_range():
    params, spec, grads = _params(), _spec(), _grads()  # q = min(4r, m, n) = min(8, 7) = 7 = full
    exact, res_e = lorajax.inits.lora_ga(spec, params, grads, niter=None)
    approx, res_a = lorajax.inits.lora_ga(spec, params, grads, jax.random.key(3))
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5),
                           (exact, res_e), (approx, res_a))


def test_nd_kernel_and_variables_dict():
    k = jax.random.normal(jax.random.key(1), (2, 3, 8))  # [heads, head_dim, d] viewed as [6, 8]
    g = jax.random.normal(jax.random.key(2), (2, 3, 8))
    variables = {"params": {"o": {"kernel": k}}}
    spec = lorajax.Spec("lora", rank=2, alpha=2.0, targets=["o"], in_axes={"o": 2})
    adapters, residual = lorajax.inits.lora_ga(spec, variables, {"o": {"kernel": g}}, niter=None)
    ad = adapters["params"]["o"]["kernel"]
    assert ad["lora_A"].shape == (6, 2) and ad["lora_B"].shape == (2, 8)
    assert residual["params"]["o"]["kernel"].shape == (2, 3, 8)
    np.testing.assert_allclose(np.asarray(lorajax.merge(spec, residual, adapters)["params"]["o"]["kernel"]),
                               np.asarray(k), atol=1e-5)
    _, _, v = _svd(g.reshape(6, 8))
    np.testing.assert_allclose(np.asarray(ad["lora_A"] @ ad["lora_A"].T), v[:, :2] @ v[:, :2].T, atol=1e-5)


def test_bf16_weights():
    params, spec = _params(jnp.bfloat16), _spec()
    adapters, residual = lorajax.inits.lora_ga(spec, params, _grads())
    ad = adapters["a"]["kernel"]
    assert residual["a"]["kernel"].dtype == jnp.bfloat16 and ad["lora_A"].dtype == jnp.float32
    # PEFT rounds A and B to the base dtype before the shift
    for x in (ad["lora_A"], ad["lora_B"]):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(x.astype(jnp.bfloat16).astype(jnp.float32)))
    k = np.asarray(params["a"]["kernel"].astype(jnp.float32))
    recon = np.asarray(lorajax.merge(spec, residual, adapters)["a"]["kernel"].astype(jnp.float32))
    np.testing.assert_allclose(recon, k, atol=0.02 * np.abs(k).max())


def test_params_not_mutated():
    params, grads = _params(), _grads()
    before = jax.tree_util.tree_map(np.asarray, (params, grads))
    lorajax.inits.lora_ga(_spec(), params, grads)
    jax.tree_util.tree_map(np.testing.assert_array_equal, (params, grads), before)


@pytest.mark.parametrize("kw,match", [
    ({"direction": "BrA2r"}, "direction"), ({"scale": "gd"}, "scale"), ({"scale": "weight_svd", "source": "official"},
                                                                         "scale"),
    ({"stable_gamma": 0}, "stable_gamma"), ({"source": "paper"}, "source"), ({"niter": -1}, "niter")])
def test_bad_options(kw, match):
    with pytest.raises(ValueError, match=match):
        lorajax.inits.lora_ga(_spec(), _params(), _grads(), **kw)


def test_errors_name_the_target():
    with pytest.raises(ValueError, match=r"2r = 8 .* 'a'"):
        lorajax.inits.lora_ga(_spec(rank=4), _params(), _grads())  # min(10, 7) = 7
    grads = _grads()
    del grads["b"]
    with pytest.raises(ValueError, match="b/kernel"):
        lorajax.inits.lora_ga(_spec(), _params(), grads)
    grads = _grads()
    grads["a"]["kernel"] = grads["a"]["kernel"].T
    with pytest.raises(ValueError, match=r"a/kernel has shape \(7, 10\)"):
        lorajax.inits.lora_ga(_spec(), _params(), grads)
    with pytest.raises(ValueError, match="dora"):
        lorajax.inits.lora_ga(lorajax.Spec("dora", rank=R, targets=["a", "b"]), _params(), _grads())
