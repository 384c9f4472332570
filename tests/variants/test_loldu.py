"""LoLDU: what is unique to the variant (the shared checks live in tests/test_conformance.py).

Reference equations (specs/adapters.md §6; PyTorch orientation ``W = Kᵀ: [out, in]``)::

    W = P L diag(D) Ũ                         (partial-pivot LU of W, D = diag(U), Ũ = U / D)
    W_res = W − σ₀ P L_r diag(D_r) Ũ_r         (official frozen residual, σ₀ = α / r)
    W' = W_res + σ P L_r diag(z) Ũ_r           (official; z = D_r at init)
       = W + P L_r diag(σ z − σ₀ D_r) Ũ_r      (lorajax: additive, d0 = D_r frozen)

The comparison with numbers from the official code is tests/variants/test_loldu_fixture.py.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax
from lorajax.variants import loldu

R, ALPHA = 3, 2.0
SHAPES = {"wide": (9, 5), "tall": (4, 7)}  # kernel [in, out]: out < in and out > in


def _params(dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(0), len(SHAPES))
    return {n: {"kernel": jax.random.normal(k, s, dtype)} for (n, s), k in zip(SHAPES.items(), keys)}


def _spec(**kw):
    kw.setdefault("rank", R)
    kw.setdefault("alpha", ALPHA)
    return lorajax.Spec("loldu", targets=list(SHAPES), **kw)


def _official(w_t, perm, l_r, u_r, d_r, z, sigma, sigma0):
    """The official merged weight [out, in] from its own formula (float64)."""
    p = np.eye(len(perm))[perm]  # P[i, perm[i]] = 1
    res = w_t - sigma0 * p @ l_r @ np.diag(d_r) @ u_r
    return res + sigma * p @ l_r @ np.diag(z) @ u_r


def _f64(x):
    return np.asarray(x, np.float64)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_ldu_reconstructs_the_transposed_kernel(name):
    """P L diag(D) Ũ == W = Kᵀ, L unit lower, Ũ unit upper (f32: rtol 1e-5)."""
    w = _params()[name]["kernel"]
    perm, l_mat, d, u = (np.asarray(a) for a in loldu.ldu(w))
    d_out, d_in = w.shape[1], w.shape[0]
    k = min(d_in, d_out)
    assert l_mat.shape == (d_out, k) and u.shape == (k, d_in) and d.shape == (k,) and perm.shape == (d_out,)
    assert sorted(perm.tolist()) == list(range(d_out))
    np.testing.assert_allclose(np.triu(l_mat, 1), 0.0)
    np.testing.assert_allclose(np.diagonal(l_mat), 1.0)
    np.testing.assert_allclose(np.tril(u, -1), 0.0, atol=0)
    np.testing.assert_allclose(np.diagonal(u), 1.0, rtol=1e-6)
    assert np.abs(l_mat).max() <= 1.0 + 1e-6  # partial pivoting
    np.testing.assert_allclose(l_mat[perm] @ np.diag(d) @ u, np.asarray(w).T, rtol=1e-5, atol=1e-5)


def test_ldu_float64_reconstruction():
    """The same identity to 1e-10 in float64 (spec's CHECKED bullet)."""
    with jax.enable_x64(True):
        w = jax.random.normal(jax.random.key(3), (9, 6), jnp.float64)
        perm, l_mat, d, u = (np.asarray(a) for a in loldu.ldu(w, jnp.float64))
        np.testing.assert_allclose(l_mat[perm] @ np.diag(d) @ u, np.asarray(w).T, rtol=1e-10, atol=1e-12)


def test_ldu_matches_scipy_convention():
    """Same P, L, U as jax.scipy.linalg.lu on W = Kᵀ (W = P L U)."""
    w = _params()["wide"]["kernel"]
    perm, l_mat, d, u = loldu.ldu(w)
    p_ref, l_ref, u_ref = jax.scipy.linalg.lu(w.T)
    np.testing.assert_array_equal(np.argmax(np.asarray(p_ref), axis=1), np.asarray(perm))
    np.testing.assert_allclose(np.asarray(l_mat), np.asarray(l_ref), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(d)[:, None] * np.asarray(u), np.asarray(u_ref), rtol=1e-6, atol=1e-6)


def test_adapter_layout_and_identity():
    params = _params()
    spec = _spec()
    ad = lorajax.init(spec, params, jax.random.key(0))
    for name, (d_in, d_out) in SHAPES.items():
        leaf = ad[name]["kernel"]
        assert set(leaf) == {"loldu_z", "loldu_d0", "loldu_U", "loldu_L", "loldu_perm"}
        assert leaf["loldu_U"].shape == (d_in, R) and leaf["loldu_L"].shape == (R, d_out)
        assert leaf["loldu_perm"].shape == (d_out,) and leaf["loldu_perm"].dtype == jnp.int32
        np.testing.assert_array_equal(leaf["loldu_z"], leaf["loldu_d0"])  # init_method="lu"
        # distinct buffers: a train step that donates the trainable z must not free the frozen d0
        assert leaf["loldu_z"].unsafe_buffer_pointer() != leaf["loldu_d0"].unsafe_buffer_pointer()
        perm, l_mat, d, u = loldu.ldu(params[name]["kernel"])
        np.testing.assert_array_equal(leaf["loldu_d0"], d[:R])
        np.testing.assert_array_equal(leaf["loldu_L"], l_mat[:, :R].T)
        np.testing.assert_array_equal(leaf["loldu_U"], u[:R].T)
    merged = lorajax.merge(spec, params, ad)
    for name in SHAPES:  # W' = W exactly: the base is not shifted
        np.testing.assert_array_equal(merged[name]["kernel"], params[name]["kernel"])


def _perturb(ad, key=1, scale=0.5):
    out = jax.tree_util.tree_map(lambda x: x, ad)
    for i, name in enumerate(SHAPES):
        leaf = out[name]["kernel"]
        leaf["loldu_z"] = leaf["loldu_z"] + scale * jax.random.normal(jax.random.key(key + i), (R,))
    return out


@pytest.mark.parametrize("train_sigma", [False, True])
def test_additive_form_equals_official_form(train_sigma):
    """W + P L_r diag(σ z − σ₀ D_r) Ũ_r == W_res + σ P L_r diag(z) Ũ_r for random z (and σ ≠ σ₀)."""
    params = _params()
    spec = _spec(train_sigma=train_sigma)
    ad = _perturb(lorajax.init(spec, params, jax.random.key(0)))
    sigma = spec.alpha / spec.rank
    if train_sigma:
        for name in SHAPES:
            np.testing.assert_allclose(ad[name]["kernel"]["loldu_sigma"], sigma)
            ad[name]["kernel"]["loldu_sigma"] = jnp.asarray(1.7, jnp.float32)
        sigma = 1.7
    merged = lorajax.merge(spec, params, ad)
    for name in SHAPES:
        leaf = ad[name]["kernel"]
        want = _official(_f64(params[name]["kernel"]).T, np.asarray(leaf["loldu_perm"]), _f64(leaf["loldu_L"]).T,
                         _f64(leaf["loldu_U"]).T, _f64(leaf["loldu_d0"]), _f64(leaf["loldu_z"]), sigma,
                         spec.alpha / spec.rank)
        np.testing.assert_allclose(np.asarray(merged[name]["kernel"]), want.T, rtol=1e-5, atol=1e-5, err_msg=name)


def test_one_entry_of_z_is_a_rank_one_update():
    """z = D_r + δ e_j  ⇒  W' − W = σ δ · (P L)[:, j] Ũ[j]  (PyTorch orientation)."""
    params = _params()
    spec = _spec()
    ad = lorajax.init(spec, params, jax.random.key(0))
    sigma, delta, j = ALPHA / R, 0.37, 1
    for name in SHAPES:
        leaf = dict(ad[name]["kernel"])
        leaf["loldu_z"] = leaf["loldu_z"].at[j].add(delta)
        w = params[name]["kernel"]
        t = lorajax.select(spec, params)[sorted(SHAPES).index(name)]
        got = _f64(loldu.adapted(w, leaf, t)) - _f64(w)
        perm, l_mat, _, u = loldu.ldu(w)
        col = _f64(l_mat)[np.asarray(perm), j]  # (P L)[:, j]: [out]
        want = sigma * delta * np.outer(col, _f64(u)[j])  # [out, in]
        np.testing.assert_allclose(got, want.T, rtol=1e-4, atol=1e-6, err_msg=name)
        assert np.linalg.matrix_rank(got, tol=1e-5) == 1


def test_factored_forward_equation():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(6, name="dense")(x)

    model = Net()
    x = jax.random.normal(jax.random.key(3), (5, 11))
    variables = model.init(jax.random.key(0), x)
    spec = lorajax.Spec("loldu", rank=R, alpha=ALPHA, targets=["dense"])
    ad = lorajax.init(spec, variables, jax.random.key(0))
    leaf = ad["params"]["dense"]["kernel"]
    leaf["loldu_z"] = leaf["loldu_z"] + jax.random.normal(jax.random.key(8), (R,))
    y = lorajax.adapt(model.apply, spec, mode="factored")(variables, ad, x)
    p = variables["params"]["dense"]
    k, u, l_mat = _f64(p["kernel"]), _f64(leaf["loldu_U"]), _f64(leaf["loldu_L"])
    c = ALPHA / R * (_f64(leaf["loldu_z"]) - _f64(leaf["loldu_d0"]))
    want = _f64(x) @ k + _f64(p["bias"])[None, :] + ((_f64(x) @ u) * c[None, :]) @ l_mat[:, np.asarray(leaf["loldu_perm"])]
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("train_sigma,count", [(False, R), (True, R + 1)])
def test_trainable_count(train_sigma, count):
    params = _params()
    spec = _spec(train_sigma=train_sigma)
    ad = lorajax.init(spec, params, jax.random.key(0))
    n = lorajax.count_params(spec, params, ad)
    assert n["trainable"] == len(SHAPES) * count
    trainable, _ = lorajax.partition(spec, ad)
    leaves = jax.tree_util.tree_leaves(trainable["wide"])
    assert sum(x.size for x in leaves) == count
    assert loldu.VARIANT.trainable_count(lorajax.select(spec, params)) == n["trainable"]


def test_gradient_reaches_only_z_and_sigma():
    params = _params()
    spec = _spec(train_sigma=True)
    ad = _perturb(lorajax.init(spec, params, jax.random.key(0)))
    trainable, frozen = lorajax.partition(spec, ad)
    x = jax.random.normal(jax.random.key(5), (4, 9))

    def loss(tr):
        full = lorajax.combine(tr, frozen)
        return jnp.sum(jnp.tanh(x @ lorajax.merge(spec, params, full)["wide"]["kernel"]))

    g = jax.grad(loss)(trainable)
    assert set(k for k, v in g["wide"]["kernel"].items() if v is not None) == {"loldu_z", "loldu_sigma"}
    assert float(jnp.abs(g["wide"]["kernel"]["loldu_z"]).max()) > 0


@pytest.mark.parametrize("method", ["zeros", "ones", "constant", "uniform", "normal", "s_uniform", "s_normal"])
def test_other_init_methods_change_z_not_the_residual(method):
    """As officially: z is re-drawn, the residual still uses D_r, so W' = W_res + σ P L diag(z) Ũ ≠ W."""
    params = _params()
    spec = _spec(init_method=method, rank=4)
    ad = lorajax.init(spec, params, jax.random.key(0))
    leaf = ad["wide"]["kernel"]
    z, d = np.asarray(leaf["loldu_z"]), np.asarray(leaf["loldu_d0"])
    m = d.mean()
    if method == "zeros":
        np.testing.assert_array_equal(z, 0.0)
    elif method == "ones":
        np.testing.assert_array_equal(z, 1.0)
    elif method == "constant":
        np.testing.assert_allclose(z, m, rtol=1e-6)
    elif method == "uniform":
        assert np.all(np.abs(z) <= abs(m) / 2 + 1e-7)
    elif method == "s_uniform":
        assert np.all(np.abs(z) <= 1.0)
    assert not np.array_equal(z, d)
    merged = lorajax.merge(spec, params, ad)
    want = _official(_f64(params["wide"]["kernel"]).T, np.asarray(leaf["loldu_perm"]), _f64(leaf["loldu_L"]).T,
                     _f64(leaf["loldu_U"]).T, _f64(d), _f64(z), 0.5, 0.5)
    np.testing.assert_allclose(np.asarray(merged["wide"]["kernel"]), want.T, rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.asarray(merged["wide"]["kernel"]), np.asarray(params["wide"]["kernel"]))


def test_normal_init_needs_rank_two():
    params = {"wide": {"kernel": _params()["wide"]["kernel"]}}
    spec = lorajax.Spec("loldu", rank=1, targets=["wide"], init_method="normal")
    with pytest.raises(ValueError, match="'wide'.*rank >= 2"):
        lorajax.init(spec, params, jax.random.key(0))


def test_zero_pivot_raises_naming_the_module():
    """A kernel whose W = Kᵀ has two proportional columns: the second pivot is exactly 0."""
    col = np.array([1.0, 2.0, -4.0, 0.5], np.float32)  # powers of two: the elimination is exact
    w_t = np.stack([col, 2.0 * col, [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]], axis=1)  # [out=4, in=4]
    params = {"blk": {"proj": {"kernel": jnp.asarray(w_t.T)}}}
    with pytest.raises(ValueError, match=r"'blk\.proj'.*D\[1\].*rank <= 1"):
        lorajax.init(lorajax.Spec("loldu", rank=2, targets=["proj"]), params, jax.random.key(0))
    # rank 1 uses only the first pivot: fine
    ad = lorajax.init(lorajax.Spec("loldu", rank=1, targets=["proj"]), params, jax.random.key(0))
    assert np.isfinite(np.asarray(ad["blk"]["proj"]["kernel"]["loldu_U"])).all()


def test_bad_options_raise():
    with pytest.raises(ValueError, match="train_sigma must be a bool"):
        _spec(train_sigma="yes")
    with pytest.raises(ValueError, match="init_method must be one of"):
        _spec(init_method="kaiming")
    with pytest.raises(TypeError, match="unknown option"):
        _spec(sigma=1.0)


def test_factors_must_fit_the_weight():
    params = _params()
    spec = _spec()
    ad = lorajax.init(spec, params, jax.random.key(0))
    ad["wide"]["kernel"], ad["tall"]["kernel"] = ad["tall"]["kernel"], ad["wide"]["kernel"]
    with pytest.raises(ValueError, match="do not fit the weight"):
        lorajax.merge(spec, params, ad)


def test_bf16_weight_keeps_float32_factors():
    params = _params(jnp.bfloat16)
    spec = _spec()
    ad = lorajax.init(spec, params, jax.random.key(0))
    assert ad["wide"]["kernel"]["loldu_z"].dtype == jnp.float32
    merged = lorajax.merge(spec, params, _perturb(ad))
    assert merged["wide"]["kernel"].dtype == jnp.bfloat16


def test_from_ldu_accepts_a_permutation_matrix():
    w = _params()["tall"]["kernel"]
    perm, l_mat, d, u = loldu.ldu(w)
    p_mat = np.eye(len(perm))[np.asarray(perm)]
    a = loldu.from_ldu(p_mat, l_mat[:, :R], u[:R], d[:R])
    b = loldu.from_ldu(perm, l_mat[:, :R], u[:R], d[:R])
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
