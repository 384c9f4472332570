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
  Design: specs/adapters.md §12a (hard projection). Sources tried:
  ``docs/unverified.md``. LoRA factors as PEFT
  ``src/peft/tuners/lora/layer.py``; not in PEFT.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorajax.variants import lora, options
from lorajax.variants.base import EVAL, Context, Factors, Target, Variant, additive, down_project
from lorajax.variants.options import checks, option

INIT_CHOICES = (True, False, "gaussian")


def _check_energy(name: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1):
        raise ValueError(f"{name} must be None or a fraction in (0, 1), got {value!r}")


@dataclasses.dataclass(frozen=True)
class Options(options.Options):
    #: size ``k`` of the frozen principal subspace; None: the adapter rank ``r``; 0: plain LoRA
    top_k: int | None = option(None, checks.optional(checks.nonneg_int))
    #: instead of ``top_k``: the smallest ``k`` whose singular values hold this share of ``Σ σ²``
    #: (a fraction in (0, 1); needs concrete weights at init)
    energy: float | None = option(None, _check_energy)
    #: scale ``α/√r`` (rsLoRA) instead of ``α/r``
    use_rslora: bool = option(False, checks.boolean)
    #: LoRA's init of ``A``, ``B``: True (``B = 0``), ``"gaussian"`` or False (both random; for tests)
    init_weights: Any = option(True, checks.one_of(*INIT_CHOICES))
    #: adapter dtype; None: float32, or the weight's dtype if wider
    dtype: str | None = option(None, checks.dtype)

    def check(self) -> None:
        if self.top_k is not None and self.energy is not None:
            raise ValueError(f"give top_k or energy, not both (got top_k={self.top_k!r}, energy={self.energy!r})")


def subspace_size(sv: jax.Array, t: Target) -> int:
    """``k`` from ``top_k`` / ``energy`` (default: the rank), given the singular values ``sv``."""
    energy = t.options.energy
    if energy is None:
        top_k = t.options.top_k
        return t.rank if top_k is None else top_k
    try:
        sv2 = np.asarray(sv, np.float64) ** 2
    except jax.errors.TracerArrayConversionError:
        raise ValueError(
            f"comp_lora energy={energy} needs concrete weights at init for {t.name!r}: "
            "call lorajax.init outside jit, or set top_k"
        ) from None
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
    if (
        a.shape[0] != d_in
        or b.shape[1] != d_out
        or a.shape[1] != b.shape[0]
        or u.shape[0] != d_in
        or v.shape != (d_out, k)
    ):
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


def apply(x: jax.Array, w: jax.Array, adapter: dict, t: Target, ctx: Context = EVAL) -> jax.Array:
    """``x W + s · (x Ã) B̃`` for ``x: [T, in]``; never forms ``ΔW`` or a projector."""
    a, b = projected(w, adapter)
    y = x @ w
    h = down_project(x.astype(a.dtype), a)
    return y + (lora.scaling(t) * (h @ b)).astype(y.dtype)


VARIANT = Variant(
    name="comp_lora",
    init=init,
    adapted=adapted,
    apply=apply,
    unadapted=unadapted,
    options=Options,
    buffers=("comp_U", "comp_V"),
    # ΔW = P (s·A B) Q with fixed projectors: A, B enter only through s·A·B (other entries act on it)
    factors=Factors("lora_A", "lora_B", scale=lora.scaling, exact=False),
    trainable_count=lora.trainable_count,
    doc=__doc__,
)
