"""Comp-LoRA: a LoRA update confined to the complement of the weight's principal subspace.

The paper's abstract says the low-rank update is optimised "in the
complementary subspace" of the pretrained weight so that it does not disturb
the weight's most informative directions, and adds no parameters. No official
code exists and the paper body could not be read, so the formula is the
**UNVERIFIED** design of specs/adapters.md §12a, *hard projection*, chosen
here. Maths (Flax orientation, ``W: [in, out]``, ``y = x W``)::

    W = U Σ Vᵀ,   U_k: [in, k],  V_k: [out, k]    top-k singular vectors, frozen (comp_U, comp_V)
    P = I − U_k U_kᵀ   (on inputs),   Q = I − V_k V_kᵀ   (on outputs)
    ΔW = s · P A B Q = s · Ã B̃,   Ã = A − U_k (U_kᵀ A),   B̃ = B − (B V_k) V_kᵀ
    y  = x W + s · (x Ã) B̃,      W' = W + ΔW
    s  = α / r   (α / √r with ``use_rslora``)

``A = lora_A: [in, r]``, ``B = lora_B: [r, out]`` train exactly as in LoRA
(init as LoRA: ``A ~ U(±1/√in)``, ``B = 0``, so the model is unchanged at
init). Because the projectors sit inside the forward pass,
``U_kᵀ ΔW = 0`` and ``ΔW V_k = 0`` hold for any values of ``A`` and ``B``,
i.e. after any number of optimiser steps, and ``U_kᵀ W' V_k = Σ_k``: the
top-k singular directions and values are left as they were. In PyTorch's
``[out, in]`` layout this is ``ΔW = (I − U'_k U'_kᵀ) s B A (I − V'_k V'_kᵀ)``
with ``U'`` the left singular vectors of the ``[out, in]`` weight (= our
``V``) and ``V'`` its right ones (= our ``U``). No dense projector is formed:
the factored forward costs ``O((in + out) · k · r)`` extra.

Subspace size ``k``: ``top_k`` (an int; default ``None`` = the adapter rank
``r``, an UNVERIFIED choice) or ``energy`` (a fraction in (0, 1): the smallest
k whose singular values hold that share of ``Σ σ²``; needs concrete weights at
init). ``top_k=0`` is plain LoRA. ``k`` must be below ``min(in, out)``.

Trainable per target: ``r · (in + out)``; frozen buffers ``k · (in + out)``.

Example:
  >>> import jax, jax.numpy as jnp, lorajax
  >>> w = jax.random.normal(jax.random.key(0), (8, 6))
  >>> params = {"dense": {"kernel": w}}
  >>> spec = lorajax.Spec("comp_lora", rank=2, targets=["dense"], top_k=3)
  >>> adapters = lorajax.init(spec, params, jax.random.key(1))
  >>> a = adapters["dense"]["kernel"]
  >>> a["comp_U"].shape, a["comp_V"].shape, a["lora_A"].shape, a["lora_B"].shape
  ((8, 3), (6, 3), (8, 2), (2, 6))
  >>> a["lora_B"] = jnp.ones((2, 6))  # any trained values
  >>> d = lorajax.merge(spec, params, adapters)["dense"]["kernel"] - w
  >>> bool(jnp.abs(a["comp_U"].T @ d).max() < 1e-5), bool(jnp.abs(d @ a["comp_V"]).max() < 1e-5)
  (True, True)

References:
  "Comp-LoRA" (complementary-subspace low-rank adaptation for VLM few-shot
  classification), arXiv:2501.15040 (abstract only; no official code found).
  Design: specs/adapters.md §12a (hard projection). LoRA factors as PEFT
  ``src/peft/tuners/lora/layer.py``; not in PEFT.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from lorajax.variants import lora
from lorajax.variants.base import Target, Variant, additive

INIT_CHOICES = (True, False, "gaussian")


def validate(options: dict) -> None:
    top_k, energy = options["top_k"], options["energy"]
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k must be None (= the rank) or an int >= 0, got {top_k!r}")
    if energy is not None:
        if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0 < energy < 1:
            raise ValueError(f"energy must be None or a fraction in (0, 1), got {energy!r}")
        if top_k is not None:
            raise ValueError(f"give top_k or energy, not both (got top_k={top_k!r}, energy={energy!r})")
    if options["init_weights"] not in INIT_CHOICES:
        raise ValueError(f"init_weights must be one of {INIT_CHOICES}, got {options['init_weights']!r}")
    if options.get("dtype") is not None:
        jnp.dtype(options["dtype"])  # raises TypeError on an unknown dtype


def subspace_size(sv: jax.Array, t: Target) -> int:
    """``k`` from ``top_k`` / ``energy`` (default: the rank), given the singular values ``sv``."""
    energy = t.options.get("energy")
    if energy is None:
        top_k = t.options.get("top_k")
        return t.rank if top_k is None else top_k
    try:
        sv2 = np.asarray(sv, np.float64) ** 2
    except jax.errors.TracerArrayConversionError:
        raise ValueError(f"comp_lora energy={energy} needs concrete weights at init for {t.name!r}: "
                         "call lorajax.init outside jit, or set top_k") from None
    share = np.cumsum(sv2) / max(sv2.sum(), np.finfo(np.float64).tiny)
    return int(np.searchsorted(share, energy - 1e-12) + 1)


def init(key: jax.Array, w: jax.Array, t: Target) -> dict:
    """LoRA's ``lora_A: [in, r]``, ``lora_B: [r, out]`` plus frozen ``comp_U: [in, k]``, ``comp_V: [out, k]``."""
    dtype = lora.adapter_dtype(t, w)
    adapter = lora.init(key, w, t)
    u, sv, vt = jnp.linalg.svd(w.astype(dtype), full_matrices=False)
    k = subspace_size(sv, t)
    if k >= min(w.shape):
        raise ValueError(
            f"comp_lora: the principal subspace k={k} must be smaller than min(in, out) = {min(w.shape)} "
            f"for {t.name!r} (kernel viewed as {tuple(w.shape)}), or the update is zero; lower top_k / energy"
        )
    adapter["comp_U"] = u[:, :k]
    adapter["comp_V"] = vt[:k].T
    return adapter


def projected(w: jax.Array, adapter: dict) -> tuple[jax.Array, jax.Array]:
    """``(Ã, B̃) = (A − U_k (U_kᵀ A), B − (B V_k) V_kᵀ)``."""
    a, b = adapter["lora_A"], adapter["lora_B"]
    u, v = adapter["comp_U"], adapter["comp_V"]
    d_in, d_out = w.shape
    k = u.shape[1]
    if a.shape[0] != d_in or b.shape[1] != d_out or a.shape[1] != b.shape[0] or u.shape[0] != d_in \
            or v.shape != (d_out, k):
        raise ValueError(
            f"comp_lora needs lora_A: [in, r], lora_B: [r, out], comp_U: [in, k], comp_V: [out, k] for a weight "
            f"[in, out] = {w.shape}; got {a.shape}, {b.shape}, {u.shape}, {v.shape}"
        )
    return a - u @ (u.T @ a), b - (b @ v) @ v.T


def delta(w: jax.Array, adapter: dict, t: Target) -> jax.Array:
    """``s · Ã B̃ = s · (I − U_k U_kᵀ) A B (I − V_k V_kᵀ): [in, out]``."""
    a, b = projected(w, adapter)
    return lora.scaling(t) * (a @ b)


#: ``W + ΔW`` and its inverse, in the weight's dtype.
adapted, unadapted = additive(delta)


def apply(x: jax.Array, w: jax.Array, adapter: dict, t: Target) -> jax.Array:
    """``x W + s · (x Ã) B̃`` for ``x: [T, in]``; never forms ``ΔW`` or a projector."""
    a, b = projected(w, adapter)
    y = x @ w
    h = x.astype(a.dtype) @ a
    return y + (lora.scaling(t) * (h @ b)).astype(y.dtype)


VARIANT = Variant(
    name="comp_lora",
    init=init,
    adapted=adapted,
    apply=apply,
    unadapted=unadapted,
    frozen=frozenset({"comp_U", "comp_V"}),
    options={"top_k": None, "energy": None, "use_rslora": False, "init_weights": True, "dtype": None},
    validate=validate,
    doc=__doc__,
)
