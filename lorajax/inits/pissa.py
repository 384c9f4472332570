"""PiSSA: principal singular values and vectors into LoRA's A, B; the rest stays in the base.

Maths (PyTorch orientation as in the paper, ``W = Kᵀ: [out, in]``)::

    W = U S Vᵀ                         (SVD in float32)
    S̃ = S[:r] / s                      (s = α/r, or α/√r with use_rslora)
    A = diag(√S̃) Vᵀ[:r]   : [r, in]     B = U[:, :r] diag(√S̃) : [out, r]
    W_res = W - s · B A = W - U_r diag(S_r) V_rᵀ

so ``W_res + s·B A == W`` and the model is unchanged at init. In lorajax's
Flax orientation ``lora_A = Aᵀ: [in, r]``, ``lora_B = Bᵀ: [r, out]``, and the
returned params hold ``K_res = W_resᵀ``. ``niter=K`` uses a randomized SVD with
K power iterations (PEFT's ``"pissa_niter_K"``; random, so it matches PEFT's
only up to the SVD's accuracy). Singular vectors are unique up to sign, so
compare ``B A`` (not A and B) across libraries.

Example:
  >>> import jax, jax.numpy as jnp, lorajax
  >>> params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (6, 4))}}
  >>> spec = lorajax.Spec("lora", rank=2, alpha=2, targets=["dense"])
  >>> adapters, residual = lorajax.inits.pissa(spec, params)
  >>> merged = lorajax.merge(spec, residual, adapters)
  >>> bool(jnp.allclose(merged["dense"]["kernel"], params["dense"]["kernel"], atol=1e-5))
  True

References:
  Meng, Wang, Zhang, "PiSSA: Principal Singular Values and Singular Vectors
  Adaptation of Large Language Models", NeurIPS 2024, arXiv:2404.02948;
  official code GraphPKU/PiSSA. PEFT: ``src/peft/tuners/lora/layer.py``
  (``LoraLayer.pissa_init``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from lorajax.adapters import target_key
from lorajax.inits._common import init_with_residual
from lorajax.spec import Spec
from lorajax.variants.lora import scaling

__all__ = ["pissa"]


def _randomized_svd(key: jax.Array, w: jax.Array, r: int, niter: int):
    """Top-r SVD of ``w: [m, n]`` by subspace iteration (Halko et al. 2011)."""
    q = jnp.linalg.qr(w @ jax.random.normal(key, (w.shape[1], r), w.dtype))[0]
    for _ in range(niter):
        q = jnp.linalg.qr(w.T @ q)[0]
        q = jnp.linalg.qr(w @ q)[0]
    u_small, s, vh = jnp.linalg.svd(q.T @ w, full_matrices=False)
    return q @ u_small, s, vh


def pissa(spec: Spec, params: Any, key: jax.Array | None = None, *, niter: int | None = None) -> tuple[dict, Any]:
    """PiSSA adapters and the residual params.

    Args:
      spec: a ``"lora"`` Spec (its ``init_weights`` option is ignored).
      params: the base params (not changed).
      key: PRNG key for the randomized SVD (only with ``niter``).
      niter: power iterations for a randomized SVD; None = full SVD.

    Returns:
      ``(adapters, new_params)`` where ``new_params`` holds the residual weights.
    """
    if niter is not None and (not isinstance(niter, int) or niter < 0):
        raise ValueError(f"niter must be a non-negative int or None, got {niter!r}")
    if niter is not None and key is None:
        key = jax.random.key(0)

    def make(k, t):
        w = k.T  # [out, in], the paper's and PEFT's orientation
        if niter is None:
            u, s, vh = jnp.linalg.svd(w, full_matrices=False)
        else:
            assert key is not None  # set above whenever niter is
            u, s, vh = _randomized_svd(target_key(key, t), w, t.rank, niter)
        sc = scaling(t)
        root = jnp.sqrt(s[: t.rank] / sc)
        a = root[:, None] * vh[: t.rank]  # [r, in]
        b = u[:, : t.rank] * root[None, :]  # [out, r]
        w_res = w - sc * (b @ a)
        return {"lora_A": a.T, "lora_B": b.T}, w_res.T

    return init_with_residual(spec, params, make, "PiSSA")
