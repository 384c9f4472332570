"""PaCA: partial connection adaptation, training ``r`` input rows of the kernel itself.

PaCA picks ``r`` input features ``idx`` of a weight and trains those rows of
the kernel directly; there is no separate low-rank update. Maths (Flax
orientation, kernel ``W: [in, out]``; PyTorch's columns ``W_pt[:, idx]`` of
``[out, in]`` are the rows ``W[idx, :]`` here)::

    idx = paca_indices: [r]     (frozen) distinct input features
    w   = paca_w: [r, out]      trainable, init W[idx, :] / s,   s = α / r
    W'  = W with rows idx replaced by s · w
    y   = x W' = x W + x[:, idx] (s · w − W[idx, :])

At init ``s · w = W[idx, :]``, so the model is unchanged (bit-exact when ``s``
is a power of two, else to rounding). The factored forward is the last line:
``x W`` with the frozen kernel plus an ``[T, r] @ [r, out]`` correction, so the
gradient of ``w``, ``s · x[:, idx]ᵀ G``, needs only the ``T · r`` values
``x[:, idx]`` as a residual, never the full ``x`` (PaCA's activation-memory
saving), and no masked copy of ``W`` is formed. The spec's form
``x W_masked + x[:, idx] (s·w)`` (rows idx of ``W`` zeroed) is the same
function; the form used here is an exact identity at init and keeps ``W``
itself as the only full-size operand.

Selection (``selection``): ``"random"`` (default; the official
``randperm(in)[:r]``, drawn here from the init key), ``"norm_top"`` /
``"norm_bottom"``: the ``r`` input features whose kernel rows have the largest /
smallest L2 norm (the official code's commented alternatives, ``topk`` /
``argsort`` of ``W_pt.norm(dim=0)``). The indices are stored sorted. JAX's RNG is
not PyTorch's: to reproduce an official run, import its ``paca_indices``.

Merged: ``W'`` above (the rows are replaced, so merging needs no delta).
There is no unmerge: the original rows ``W[idx]`` are not kept.

Trainable per target: ``r · out`` (plus ``r`` frozen indices). ``r ≤ min(in, out)``
is enforced like LoRA's rank (PaCA itself needs only ``r ≤ in``).

Example:
  >>> import jax, jax.numpy as jnp, lorajax
  >>> params = {"dense": {"kernel": jnp.arange(24.0).reshape(6, 4)}}
  >>> spec = lorajax.Spec("paca", rank=2, alpha=4, targets=["dense"])
  >>> a = lorajax.init(spec, params, jax.random.key(0))["dense"]["kernel"]
  >>> a["paca_w"].shape, a["paca_indices"].shape
  ((2, 4), (2,))
  >>> bool(jnp.all(2.0 * a["paca_w"] == params["dense"]["kernel"][a["paca_indices"]]))
  True

References:
  Woo et al., "PaCA: Partial Connection Adaptation for Efficient Fine-Tuning",
  ICLR 2025, OpenReview iYkhxre0In. Official code WooSunghyeon/paca
  ``peft/src/peft/tuners/paca/layer.py`` (``PacaLayer.update_layer``,
  ``paca_init``, ``Linear.merge``, ``pacalinear`` forward/backward). Not in
  upstream PEFT.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lorajax.variants import lora, options
from lorajax.variants.base import EVAL, Context, Target, Variant
from lorajax.variants.base import scaling as base_scaling
from lorajax.variants.options import checks, option

SELECTIONS = ("random", "norm_top", "norm_bottom")


@dataclasses.dataclass(frozen=True)
class Options(options.Options):
    #: which ``r`` input features: ``"random"`` (official ``randperm``), ``"norm_top"`` / ``"norm_bottom"``
    #: (largest / smallest kernel-row L2 norm)
    selection: str = option("random", checks.one_of(*SELECTIONS))
    #: adapter dtype; None: float32, or the weight's dtype if wider
    dtype: str | None = option(None, checks.dtype)


def scaling(t: Target) -> float:
    """``α / r``."""
    return base_scaling(t.alpha, t.rank)


def select_indices(key: jax.Array, w: jax.Array, r: int, selection: str = "random") -> jax.Array:
    """``r`` distinct input features of ``w: [in, out]``, sorted, as int32."""
    d_in = w.shape[0]
    if selection == "random":
        idx = jax.random.permutation(key, d_in)[:r]
    else:
        norms = jnp.linalg.norm(w.astype(jnp.float32), axis=1)
        order = jnp.argsort(-norms if selection == "norm_top" else norms, stable=True)
        idx = order[:r]
    return jnp.sort(idx).astype(jnp.int32)


def init(key: jax.Array, w: jax.Array, t: Target) -> dict:
    """``{"paca_w": [r, out] = W[idx] / s, "paca_indices": [r]}``."""
    d_in = w.shape[0]
    if t.rank > d_in:
        raise ValueError(f"{t.name}: PaCA rank {t.rank} is larger than the {d_in} input features")
    idx = select_indices(key, w, t.rank, t.options.selection)
    dtype = lora.adapter_dtype(t, w)
    return {"paca_w": w[idx].astype(dtype) / scaling(t), "paca_indices": idx}


def _rows(w: jax.Array, adapter: dict, t: Target) -> tuple[jax.Array, jax.Array]:
    idx, p = adapter["paca_indices"], adapter["paca_w"]
    if idx.shape != (p.shape[0],) or p.shape[1] != w.shape[1]:
        raise ValueError(f"{t.name}: paca_w {p.shape} and paca_indices {idx.shape} do not fit weight {w.shape}")
    return idx, scaling(t) * p


def adapted(w: jax.Array, adapter: dict, t: Target, ctx: Context = EVAL) -> jax.Array:
    """``W`` with rows ``idx`` replaced by ``s · w``, in the weight's dtype."""
    idx, rows = _rows(w, adapter, t)
    return w.at[idx].set(rows.astype(w.dtype))


def apply(x: jax.Array, w: jax.Array, adapter: dict, t: Target, ctx: Context = EVAL) -> jax.Array:
    """``x W + x[:, idx] (s · w − W[idx])`` for ``x: [T, in]``; saves only ``x[:, idx]``."""
    idx, rows = _rows(w, adapter, t)
    y = x @ w
    correction = rows - w[idx].astype(rows.dtype)
    return y + (x[:, idx].astype(rows.dtype) @ correction).astype(y.dtype)


def trainable_count(targets: list[Target]) -> int:
    """``Σ r · out`` (the trained rows)."""
    return sum(t.rank * t.matrix_shape[1] for t in targets)


# No `Factors`: rows of W are replaced, there is no s·A·B term.
VARIANT = Variant(
    name="paca",
    init=init,
    adapted=adapted,
    apply=apply,
    options=Options,
    buffers=("paca_indices",),
    trainable_count=trainable_count,
    doc=__doc__,
)
