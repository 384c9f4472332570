"""PiSSA initialisation (specs/adapters.md §1c), checked in lorajax's Flax orientation.

Derivation. The paper works on ``W = Kᵀ: [out, in]`` with ``W = U S Vᵀ``,
``S̃ = S_r / s``, ``A = diag(√S̃) V_rᵀ: [r, in]``, ``B = U_r diag(√S̃): [out, r]``.
lorajax stores ``lora_A = Aᵀ = V_r diag(√S̃): [in, r]`` and
``lora_B = Bᵀ = diag(√S̃) U_rᵀ: [r, out]``. Hence

* ``lora_Aᵀ lora_A = diag(√S̃) V_rᵀ V_r diag(√S̃) = diag(S_r / s)``,
* ``lora_B lora_Bᵀ = diag(√S̃) U_rᵀ U_r diag(√S̃) = diag(S_r / s)``,
* ``s · lora_A lora_B = V_r diag(S_r) U_rᵀ = (U_r S_r V_rᵀ)ᵀ``: the rank-r
  truncated SVD of ``K = V S Uᵀ`` (K has the same singular values as W),
* ``K_res = K - s · lora_A lora_B`` has singular values ``S[r:]``.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax

R, ALPHA = 3, 6.0  # s = 2 (s != 1, so a missing 1/s shows)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _params(dtype=jnp.float32):
    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    return {
        "a": {"kernel": jax.random.normal(k1, (10, 7), dtype), "bias": jax.random.normal(k2, (7,), dtype)},
        "b": {"kernel": jax.random.normal(k3, (7, 12), dtype)},
        "c": {"kernel": jax.random.normal(k4, (7, 5), dtype)},  # not targeted
    }


def _spec(**kw):
    return lorajax.Spec("lora", rank=kw.pop("rank", R), alpha=kw.pop("alpha", ALPHA), targets=["a", "b"], **kw)


def _scaling(spec):
    return spec.alpha / (math.sqrt(spec.rank) if spec.options["use_rslora"] else spec.rank)


def _truncated_svd(k, r):
    u, s, vh = np.linalg.svd(np.asarray(k, np.float64), full_matrices=False)
    return (u[:, :r] * s[None, :r]) @ vh[:r], s


@pytest.mark.parametrize("use_rslora", [False, True])
def test_residual_and_truncated_svd(use_rslora):
    params = _params()
    spec = _spec(use_rslora=use_rslora)
    s = _scaling(spec)
    adapters, new_params = lorajax.inits.pissa(spec, params)
    for name in ("a", "b"):
        k = np.asarray(params[name]["kernel"], np.float64)
        ad = adapters[name]["kernel"]
        a, b = np.asarray(ad["lora_A"], np.float64), np.asarray(ad["lora_B"], np.float64)
        assert a.shape == (k.shape[0], R) and b.shape == (R, k.shape[1])
        k_res = np.asarray(new_params[name]["kernel"], np.float64)
        # W_res + s·A B == W
        np.testing.assert_allclose(k_res + s * a @ b, k, atol=1e-5, err_msg=name)
        # s·A B == rank-r truncated SVD of the kernel
        k_r, sv = _truncated_svd(k, R)
        np.testing.assert_allclose(s * a @ b, k_r, atol=1e-5, err_msg=name)
        # Aᵀ A == B Bᵀ == diag(S_r / s)
        np.testing.assert_allclose(a.T @ a, np.diag(sv[:R] / s), atol=1e-5, err_msg=name)
        np.testing.assert_allclose(b @ b.T, np.diag(sv[:R] / s), atol=1e-5, err_msg=name)
        # the residual holds the remaining singular values
        np.testing.assert_allclose(np.linalg.svd(k_res, compute_uv=False)[: len(sv) - R], sv[R:], atol=1e-5)


def test_merge_gives_back_the_original_model():
    params = _params()
    spec = _spec()
    adapters, new_params = lorajax.inits.pissa(spec, params)
    merged = lorajax.merge(spec, new_params, adapters)
    for name in ("a", "b", "c"):
        np.testing.assert_allclose(np.asarray(merged[name]["kernel"]), np.asarray(params[name]["kernel"]),
                                   atol=1e-5)
    # untouched leaves are passed through as they are
    assert new_params["c"]["kernel"] is params["c"]["kernel"]
    assert new_params["a"]["bias"] is params["a"]["bias"]
    assert set(adapters) == {"a", "b"}


def test_nd_kernel_with_in_axes():
    k = jax.random.normal(jax.random.key(1), (2, 3, 8))  # [heads, head_dim, d] viewed as [6, 8]
    params = {"o": {"kernel": k}}
    spec = lorajax.Spec("lora", rank=2, alpha=2.0, targets=["o"], in_axes={"o": 2})
    adapters, new_params = lorajax.inits.pissa(spec, params)
    ad = adapters["o"]["kernel"]
    assert ad["lora_A"].shape == (6, 2) and ad["lora_B"].shape == (2, 8)
    assert new_params["o"]["kernel"].shape == (2, 3, 8)
    k_r, _ = _truncated_svd(k.reshape(6, 8), 2)
    np.testing.assert_allclose(np.asarray(ad["lora_A"] @ ad["lora_B"]), k_r, atol=1e-5)
    np.testing.assert_allclose(np.asarray(new_params["o"]["kernel"]).reshape(6, 8) + k_r,
                               np.asarray(k).reshape(6, 8), atol=1e-5)


def _low_rank_plus_noise(key, shape=(40, 30), sv=(10.0, 8.0, 6.0), noise=1e-2):
    ku, kv, kn = jax.random.split(jax.random.key(key), 3)
    u = np.linalg.qr(np.asarray(jax.random.normal(ku, (shape[0], len(sv)))))[0]
    v = np.linalg.qr(np.asarray(jax.random.normal(kv, (shape[1], len(sv)))))[0]
    base = (u * np.asarray(sv)[None, :]) @ v.T
    return jnp.asarray(base + noise * np.asarray(jax.random.normal(kn, shape)), jnp.float32)


def test_randomized_close_to_exact():
    k = _low_rank_plus_noise(3)
    params = {"w": {"kernel": k}}
    spec = lorajax.Spec("lora", rank=3, alpha=3.0, targets=["w"])
    exact, _ = lorajax.inits.pissa(spec, params)
    approx, approx_params = lorajax.inits.pissa(spec, params, jax.random.key(7), niter=2)
    prod = lambda ad: np.asarray(ad["w"]["kernel"]["lora_A"] @ ad["w"]["kernel"]["lora_B"])
    np.testing.assert_allclose(prod(approx), prod(exact), atol=2e-3)
    # the residual identity is exact whatever the SVD's accuracy
    np.testing.assert_allclose(np.asarray(approx_params["w"]["kernel"]) + prod(approx), np.asarray(k), atol=1e-5)
    # same key -> same result
    again, _ = lorajax.inits.pissa(spec, params, jax.random.key(7), niter=2)
    np.testing.assert_array_equal(prod(again), prod(approx))


@pytest.mark.slow  # CI budget (15 min): `make test-all` runs it; two subprocesses
def test_randomized_is_reproducible_across_processes():
    code = textwrap.dedent("""
        import jax, numpy as np, lorajax
        k = jax.random.normal(jax.random.key(0), (12, 10))
        spec = lorajax.Spec("lora", rank=2, targets=["dense"])
        ad, _ = lorajax.inits.pissa(spec, {"dense": {"kernel": k}}, jax.random.key(1), niter=0)
        print(repr(np.asarray(ad["dense"]["kernel"]["lora_A"]).round(6).tolist()))
    """)
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "JAX_PLATFORMS": "cpu"}
    seed = os.environ.get("PYTHONHASHSEED")
    env["PYTHONHASHSEED"] = str(int(seed) + 1) if seed and seed.isdigit() else "12345"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)

    k = jax.random.normal(jax.random.key(0), (12, 10))
    spec = lorajax.Spec("lora", rank=2, targets=["dense"])
    ad, _ = lorajax.inits.pissa(spec, {"dense": {"kernel": k}}, jax.random.key(1), niter=0)
    here = np.asarray(ad["dense"]["kernel"]["lora_A"]).round(6).tolist()
    assert out.stdout.strip() == repr(here)


def test_bad_niter_rejected():
    with pytest.raises(ValueError, match="niter"):
        lorajax.inits.pissa(_spec(), _params(), niter=-1)


def test_params_not_mutated():
    params = _params()
    before = jax.tree_util.tree_map(np.asarray, params)
    structure = jax.tree_util.tree_structure(params)
    lorajax.inits.pissa(_spec(), params)
    lorajax.inits.pissa(_spec(), params, niter=1)
    assert jax.tree_util.tree_structure(params) == structure
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, before)


def test_bf16_weights_keep_their_dtype():
    params = _params(jnp.bfloat16)
    spec = _spec()
    adapters, new_params = lorajax.inits.pissa(spec, params)
    for name in ("a", "b", "c"):
        assert new_params[name]["kernel"].dtype == jnp.bfloat16
    assert new_params["a"]["bias"].dtype == jnp.bfloat16
    ad = adapters["a"]["kernel"]
    assert ad["lora_A"].dtype == jnp.float32 and ad["lora_B"].dtype == jnp.float32
    k = np.asarray(params["a"]["kernel"].astype(jnp.float32))
    recon = np.asarray(new_params["a"]["kernel"].astype(jnp.float32)) + _scaling(spec) * np.asarray(
        ad["lora_A"] @ ad["lora_B"])
    np.testing.assert_allclose(recon, k, atol=0.05 * np.abs(k).max())


def test_wrong_variant_raises():
    spec = lorajax.Spec("dora", rank=R, targets=["a", "b"])
    with pytest.raises(ValueError, match="dora"):
        lorajax.inits.pissa(spec, _params())


def test_non_float_weight_raises():
    params = {"a": {"kernel": jnp.ones((6, 4), jnp.int32)}}
    with pytest.raises(TypeError, match="int32"):
        lorajax.inits.pissa(lorajax.Spec("lora", rank=2, targets=["a"]), params)


def test_rank_too_large_raises():
    with pytest.raises(ValueError, match="'a'"):
        lorajax.inits.pissa(_spec(rank=8), _params())  # min(10, 7) = 7
