"""OLoRA: LoRA's A, B from the thin QR factorisation of the weight; the rest stays in the base.

Maths (PyTorch orientation, ``W = Kᵀ: [out, in]``; QR in float32)::

    W = Q R,   Q: [out, k] orthonormal columns,  R: [k, in] upper-trapezoidal
    B = Q[:, :r] : [out, r],   A = R[:r] : [r, in]      (no rescaling by s)
    W_res = W - s · B A

so ``W_res + s·B A == W`` (s = α/r or α/√r). The QR must be of ``W``, not of
the Flax kernel ``K = Wᵀ``. In lorajax ``lora_A = Aᵀ: [in, r]``,
``lora_B = Bᵀ: [r, out]``. QR is unique up to the signs of Q's columns (and
R's rows); compare ``B A`` across libraries.

Example:
  >>> import jax, jax.numpy as jnp, lorajax
  >>> params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (6, 4))}}
  >>> spec = lorajax.Spec("lora", rank=2, alpha=2, targets=["dense"])
  >>> adapters, residual = lorajax.inits.olora(spec, params)
  >>> b = adapters["dense"]["kernel"]["lora_B"]           # [r, out] = Q_rᵀ
  >>> bool(jnp.allclose(b @ b.T, jnp.eye(2), atol=1e-5))
  True

References:
  Büyükakyüz, "OLoRA: Orthonormal Low-Rank Adaptation of Large Language
  Models", arXiv:2406.01775; official code keeees/OLoRA. PEFT:
  ``src/peft/tuners/lora/layer.py`` (``LoraLayer.olora_init``).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from lorajax.inits._common import init_with_residual
from lorajax.spec import Spec
from lorajax.variants.lora import scaling

__all__ = ["olora"]


def olora(spec: Spec, params: Any) -> tuple[dict, Any]:
    """OLoRA adapters and the residual params ``(adapters, new_params)``."""

    def make(k, t):
        w = k.T  # [out, in]
        q, r_mat = jnp.linalg.qr(w)
        b, a = q[:, : t.rank], r_mat[: t.rank]
        w_res = w - scaling(t) * (b @ a)
        return {"lora_A": a.T, "lora_B": b.T}, w_res.T

    return init_with_residual(spec, params, make, "OLoRA")
