"""OLoRA initialisation (specs/adapters.md §1d), checked in lorajax's Flax orientation.

Derivation. The paper works on ``W = Kᵀ: [out, in]`` with the thin QR
``W = Q R`` (``Q: [out, k]`` orthonormal columns, ``R: [k, in]``
upper-trapezoidal), ``B = Q_r = Q[:, :r]``, ``A = R_r = R[:r]`` (not rescaled
by ``s``). lorajax stores ``lora_B = Q_rᵀ: [r, out]`` and
``lora_A = R_rᵀ: [in, r]``. Hence

* ``lora_B lora_Bᵀ = Q_rᵀ Q_r = I_r`` (for any α),
* ``lora_Aᵀ = R_r`` is upper-trapezoidal,
* ``K_res + s · lora_A lora_B = K``,
* because R is upper-triangular, the first r columns of W are
  ``W[:, :r] = Q_r R_r[:, :r]``, i.e. ``lora_A[:r] @ lora_B == K[:r]``: this
  holds for the QR of W but not for a QR of K, and is sign-independent.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax

R, ALPHA = 3, 6.0  # s = 2


def _params(dtype=jnp.float32):
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    return {
        "a": {"kernel": jax.random.normal(k1, (10, 7), dtype), "bias": jax.random.normal(k2, (7,), dtype)},
        "b": {"kernel": jax.random.normal(k3, (7, 12), dtype)},
    }


def _spec(**kw):
    return lorajax.Spec("lora", rank=kw.pop("rank", R), alpha=kw.pop("alpha", ALPHA), targets=["a", "b"], **kw)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_qr_identities(use_rslora):
    params = _params()
    spec = _spec(use_rslora=use_rslora)
    s = ALPHA / math.sqrt(R) if use_rslora else ALPHA / R
    adapters, new_params = lorajax.inits.olora(spec, params)
    for name in ("a", "b"):
        k = np.asarray(params[name]["kernel"], np.float64)
        a = np.asarray(adapters[name]["kernel"]["lora_A"], np.float64)
        b = np.asarray(adapters[name]["kernel"]["lora_B"], np.float64)
        assert a.shape == (k.shape[0], R) and b.shape == (R, k.shape[1])
        # orthonormal rows of lora_B (= columns of Q_r), not rescaled by s
        np.testing.assert_allclose(b @ b.T, np.eye(R), atol=1e-5, err_msg=name)
        # lora_Aᵀ = R_r is upper-trapezoidal
        np.testing.assert_array_equal(np.tril(a.T, -1), 0.0, err_msg=name)
        # residual identity
        k_res = np.asarray(new_params[name]["kernel"], np.float64)
        np.testing.assert_allclose(k_res + s * a @ b, k, atol=1e-5, err_msg=name)
        # QR of W = Kᵀ, not of K: W[:, :r] = Q_r R_r[:, :r]
        np.testing.assert_allclose(a[:R] @ b, k[:R], atol=1e-5, err_msg=name)
        # and it is numpy's QR of W up to the signs of Q's columns
        q, r_mat = np.linalg.qr(k.T)
        np.testing.assert_allclose(np.abs(b), np.abs(q[:, :R].T), atol=1e-5, err_msg=name)
        np.testing.assert_allclose(np.abs(a.T), np.abs(r_mat[:R]), atol=1e-5, err_msg=name)


def test_merge_gives_back_the_original_model():
    params = _params()
    spec = _spec()
    adapters, new_params = lorajax.inits.olora(spec, params)
    merged = lorajax.merge(spec, new_params, adapters)
    for name in ("a", "b"):
        np.testing.assert_allclose(np.asarray(merged[name]["kernel"]), np.asarray(params[name]["kernel"]),
                                   atol=1e-5)
    assert new_params["a"]["bias"] is params["a"]["bias"]


def test_params_not_mutated():
    params = _params()
    before = jax.tree_util.tree_map(np.asarray, params)
    structure = jax.tree_util.tree_structure(params)
    lorajax.inits.olora(_spec(), params)
    assert jax.tree_util.tree_structure(params) == structure
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, before)


def test_bf16_weights_keep_their_dtype():
    params = _params(jnp.bfloat16)
    adapters, new_params = lorajax.inits.olora(_spec(), params)
    assert new_params["a"]["kernel"].dtype == jnp.bfloat16
    assert new_params["b"]["kernel"].dtype == jnp.bfloat16
    assert new_params["a"]["bias"].dtype == jnp.bfloat16
    b = adapters["a"]["kernel"]["lora_B"]
    assert b.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(b @ b.T), np.eye(R), atol=1e-5)


def test_wrong_variant_raises():
    with pytest.raises(ValueError, match="vera"):
        lorajax.inits.olora(lorajax.Spec("vera", rank=R, targets=["a", "b"]), _params())


def test_rank_too_large_raises():
    with pytest.raises(ValueError, match="'a'"):
        lorajax.inits.olora(_spec(rank=8), _params())
