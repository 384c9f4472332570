"""MiSS (formerly Bone): matrix shard sharing — one small block shared by every input shard.

The input axis of the kernel is cut into shards of ``r`` rows; every shard
gets the same trainable update. Three modes (PEFT's ``init_weights``), in Flax
orientation (kernel ``W: [in, out]``, ``y = x W``; ``D = miss_block``)::

    default ("balance", init_weights=True), D: [r, out]
        ΔW[i, o] = D[i mod r, o]                 (ΔW = D tiled ⌈in/r⌉ times along rows, cut to in)
        y = x W + fold(x) D,   fold(x)_j = Σ_k x[k·r + j]   (x zero-padded to a multiple of r)
    "mini", D: [r, mini_r]  (out % mini_r == 0)
        D_full[j, o] = D[j, o mod mini_r]        (D tiled out/mini_r times along columns)
        then as default with D_full
    "bat" (block-affine), D: [out/r, r, r]  (in % r == 0 and out % r == 0)
        W_{p,q} = W[p·r:(p+1)·r, q·r:(q+1)·r]    (input block p, output block q)
        W'_{p,q} = W_{p,q} + D_qᵀ W_{p,q} + D_qᵀ
        (PEFT, torch layout: W'_{q,p} = W_{q,p} + W_{q,p} D_q + D_q; transposing a
        block gives the line above)

``miss_block`` is stored exactly as PEFT stores it in every mode (no transpose
at the interop boundary): in the default and mini modes PEFT already applies it
as ``fold(x) @ D``, i.e. with the output axis last. No α scaling (PEFT has none).

Init: ``D = 0`` in all three modes, so the model is unchanged at init.
``init_weights=False`` draws the default-mode ``D: [r, out]`` from PyTorch's
kaiming-uniform (a=√5) on that tensor, ``U(±1/√out)`` (not an identity; tests).

Forward: the default and mini modes are factored (``fold(x) @ D``: neither
``ΔW`` nor a weight-sized gradient is formed). ``"bat"`` depends on ``W``
itself and has no cheap factored form: like PEFT, it forms ``W'`` and its
gradient goes through the full ``[in, out]`` weight gradient.
Unmerge: default/mini subtract ``ΔW``; bat solves
``W_{p,q} = (I + D_qᵀ)⁻¹ (W'_{p,q} − D_qᵀ)`` (needs ``I + D_q`` invertible).

Rank: PEFT requires ``r ≤ in``. lorajax's generic check (``rank_limited``)
requires ``r ≤ min(in, out)``, which is stricter when ``out < r ≤ in``.
Dropout (option ``dropout``, PEFT's ``miss_dropout``): on the folded input ``x`` in training, default and
mini modes (``"bat"`` has none in PEFT either).

Trainable per target: ``r · out`` (default), ``r · mini_r`` (mini),
``(out/r) · r · r = out · r`` (bat).

Bone: PEFT's ``BoneConfig`` (removed in PEFT 2e49b6f6, Feb 2026; checkpoints
convert to MiSS by renaming ``bone_`` keys to ``miss_``) had the same two modes,
default and ``"bat"``, with the same maths in every PEFT release (0.14.0 on);
it had no ``"mini"`` and no dropout. The registry key ``"bone"`` is an alias of
this module. (Before the first release, PEFT's Bone briefly used the
block-affine formula as its default; no released version did.)

Example:
  >>> import jax, jax.numpy as jnp, lorajax
  >>> params = {"dense": {"kernel": jnp.ones((10, 6))}}
  >>> spec = lorajax.Spec("miss", rank=4, targets=["dense"])
  >>> ad = lorajax.init(spec, params, jax.random.key(0))
  >>> ad["dense"]["kernel"]["miss_block"].shape
  (4, 6)
  >>> lorajax.Spec("miss", rank=2, targets=["dense"], init_weights="bat").options["init_weights"]
  'bat'

References:
  Kang, "MiSS: Balancing LoRA Performance and Efficiency with Simple Shard
  Sharing" (earlier titles "Bone: Block-Affine Adaptation of Large Language
  Models", "DiSHA"), arXiv:2409.15371; official code JL-er/MiSS (``finetune.py``,
  which drives PEFT's implementation) and JL-er/Bone.
  PEFT: ``src/peft/tuners/miss/layer.py`` (``MissLinear.forward``,
  ``get_delta_weight`` (bat), ``get_delta_weight_miss``) and ``miss/config.py``;
  the removed ``src/peft/tuners/bone/layer.py``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from lorajax.variants import options
from lorajax.variants.base import EVAL, Context, PeftFormat, Target, Variant, dropout
from lorajax.variants.options import checks, option

MODES = (True, False, "bat", "mini")


def _check_mode(name: str, value: Any) -> None:
    if not any(value is m or (isinstance(value, str) and value == m) for m in MODES):
        raise ValueError(f"MiSS {name} must be one of {MODES}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Options(options.Options):
    #: the mode (PEFT's ``init_weights``): True (default, ``D: [r, out]`` = 0), ``"mini"`` (``D: [r, mini_r]``),
    #: ``"bat"`` (block-affine, ``D: [out/r, r, r]``), False (default mode, ``D ~ U(±1/√out)``; tests)
    init_weights: Any = option(True, _check_mode)
    #: columns of the mini block (``"mini"`` mode; ``out`` must be divisible by it)
    mini_r: int = option(1, checks.positive_int)
    #: adapter dtype; None: float32, or the weight's dtype if wider
    dtype: str | None = option(None, checks.dtype)
    #: PEFT's ``miss_dropout``: dropout on the adapter's input in training (`lorajax.variants.base.dropout`; factored
    #: mode, with ``adapter_rng`` and ``adapter_train=True``)
    dropout: float = option(0.0, checks.probability)


def _mode(t: Target):
    return t.options.init_weights


def _check(d_in: int, d_out: int, t: Target) -> None:
    r, mode = t.rank, _mode(t)
    where = f"MiSS target {t.name!r} (weight [in={d_in}, out={d_out}])"
    if r > d_in:
        raise ValueError(f"{where}: rank r={r} must be <= in={d_in}")
    if mode == "bat" and (d_in % r or d_out % r):
        raise ValueError(f"{where}: init_weights='bat' needs in and out divisible by r={r} ([r, r] blocks)")
    if mode == "mini" and d_out % t.options.mini_r:
        raise ValueError(f"{where}: init_weights='mini' needs out divisible by mini_r={t.options.mini_r}")


def init(key: jax.Array, w: jax.Array, t: Target) -> dict:
    """``{"miss_block": D}``: ``[r, out]``, ``[r, mini_r]`` (mini) or ``[out/r, r, r]`` (bat), zeros."""
    d_in, d_out = w.shape
    _check(d_in, d_out, t)
    r, mode = t.rank, _mode(t)
    dtype = jnp.dtype(t.options.dtype or jnp.promote_types(w.dtype, jnp.float32))
    if mode == "bat":
        return {"miss_block": jnp.zeros((d_out // r, r, r), dtype)}
    if mode == "mini":
        return {"miss_block": jnp.zeros((r, t.options.mini_r), dtype)}
    if mode is False:
        bound = 1.0 / math.sqrt(d_out)
        return {"miss_block": jax.random.uniform(key, (r, d_out), dtype, -bound, bound)}
    return {"miss_block": jnp.zeros((r, d_out), dtype)}


def _block(d: jax.Array, d_out: int, t: Target) -> jax.Array:
    """The ``[r, out]`` block shared by every input shard (mini: tiled along out)."""
    if _mode(t) == "mini":
        mini_r = d.shape[1]
        if d_out % mini_r:
            raise ValueError(f"out={d_out} is not divisible by mini_r={mini_r}")
        d = jnp.tile(d, (1, d_out // mini_r))
    if d.shape[1] != d_out:
        raise ValueError(f"miss_block {d.shape} does not fit out={d_out}")
    return d


def delta(w: jax.Array, adapter: dict, t: Target) -> jax.Array:
    """Default / mini ``ΔW: [in, out]`` with ``ΔW[i, o] = D[i mod r, o]``."""
    d_in, d_out = w.shape
    d = _block(adapter["miss_block"], d_out, t)
    r = d.shape[0]
    return jnp.tile(d, (-(-d_in // r), 1))[:d_in]


def _bat_blocks(w: jax.Array, r: int) -> jax.Array:
    """``[in, out] -> [in/r (p), r (b), out/r (q), r (a)]``."""
    d_in, d_out = w.shape
    return w.reshape(d_in // r, r, d_out // r, r)


def _bat_check(w: jax.Array, d: jax.Array) -> int:
    d_in, d_out = w.shape
    r = d.shape[-1]
    if d.ndim != 3 or d.shape[1] != r or d_in % r or d_out % r or d.shape[0] != d_out // r:
        raise ValueError(f"bat miss_block {d.shape} does not fit weight {w.shape} (expects [out/r, r, r])")
    return r


def _bat_adapted(w: jax.Array, d: jax.Array) -> jax.Array:
    """``W'_{p,q} = W_{p,q} + D_qᵀ W_{p,q} + D_qᵀ`` in ``d``'s dtype."""
    r = _bat_check(w, d)
    wb = _bat_blocks(w.astype(d.dtype), r)
    # (D_qᵀ W_{p,q})[b, a] = Σ_c D[q, c, b] W[p, c, q, a];  D_qᵀ[b, a] = D[q, a, b]
    out = wb + jnp.einsum("qcb,pcqa->pbqa", d, wb) + jnp.transpose(d, (2, 0, 1))[None]
    return out.reshape(w.shape)


def _bat_unadapted(w: jax.Array, d: jax.Array) -> jax.Array:
    """``W_{p,q} = (I + D_qᵀ)⁻¹ (W'_{p,q} − D_qᵀ)``."""
    r = _bat_check(w, d)
    wb = _bat_blocks(w.astype(d.dtype), r)
    rhs = wb - jnp.transpose(d, (2, 0, 1))[None]  # [p, b, q, a]
    lhs = jnp.eye(r, dtype=d.dtype)[None] + jnp.swapaxes(d, 1, 2)  # [q, r, r] = I + D_qᵀ
    rhs_q = jnp.transpose(rhs, (2, 1, 0, 3)).reshape(d.shape[0], r, -1)  # [q, b, p·a]
    sol = jnp.linalg.solve(lhs, rhs_q).reshape(d.shape[0], r, wb.shape[0], r)  # [q, b, p, a]
    return jnp.transpose(sol, (2, 1, 0, 3)).reshape(w.shape)


def adapted(w: jax.Array, adapter: dict, t: Target, ctx: Context = EVAL) -> jax.Array:
    """``W + ΔW`` (default / mini) or the block-affine ``W'`` (bat), in ``w``'s dtype."""
    d = adapter["miss_block"]
    if _mode(t) == "bat":
        return _bat_adapted(w, d).astype(w.dtype)
    return (w.astype(d.dtype) + delta(w, adapter, t)).astype(w.dtype)


def unadapted(w: jax.Array, adapter: dict, t: Target, ctx: Context = EVAL) -> jax.Array:
    """Inverse of `adapted`."""
    d = adapter["miss_block"]
    if _mode(t) == "bat":
        return _bat_unadapted(w, d).astype(w.dtype)
    return (w.astype(d.dtype) - delta(w, adapter, t)).astype(w.dtype)


def fold(x: jax.Array, r: int) -> jax.Array:
    """``[T, in] -> [T, r]``: zero-pad ``in`` to a multiple of ``r`` and sum the shards."""
    n_tok, d_in = x.shape
    n = -(-d_in // r)
    if n * r != d_in:
        x = jnp.pad(x, ((0, 0), (0, n * r - d_in)))
    return x.reshape(n_tok, n, r).sum(axis=1)


def apply(x: jax.Array, w: jax.Array, adapter: dict, t: Target, ctx: Context = EVAL) -> jax.Array:
    """``x W + fold(x) D`` for ``x: [T, in]`` (bat: ``x W'``, formed as PEFT does)."""
    if _mode(t) == "bat":
        return x @ adapted(w, adapter, t)
    d = _block(adapter["miss_block"], w.shape[1], t)
    y = x @ w
    return y + (fold(dropout(x, t, ctx).astype(d.dtype), d.shape[0]) @ d).astype(y.dtype)


def trainable_count(targets: list[Target]) -> int:
    """``Σ r · out`` (default and bat) or ``Σ r · mini_r`` (mini)."""
    return sum(t.rank * (t.options.mini_r if _mode(t) == "mini" else t.matrix_shape[1]) for t in targets)


# ----------------------------------------------------------------------------- PEFT format (MissConfig, BoneConfig)


def peft_from_config(config: dict, common: dict, options: dict | None = None) -> Any:
    from lorajax.spec import Spec

    extra: dict[str, Any] = {}
    if config["peft_type"] == "MISS":
        extra["mini_r"] = int(config.get("mini_r", 1))
    elif config.get("mini_r") is not None:  # BoneConfig had no mini mode
        raise ValueError(f"unsupported PEFT field mini_r={config['mini_r']!r}: BONE has no mini mode")
    return Spec("miss", **common, init_weights=config.get("init_weights", True), **extra)


def peft_to_config(spec: Any, targets: list[Target]) -> dict:
    return {
        "peft_type": "MISS",
        "init_weights": spec.options.init_weights,
        "mini_r": spec.options.mini_r,
    }


VARIANT = Variant(
    name="miss",
    init=init,
    adapted=adapted,
    apply=apply,
    unadapted=unadapted,
    options=Options,
    peft=PeftFormat(
        ("MISS", "BONE"),
        fields=frozenset({"init_weights", "mini_r"}),
        dropout=("miss_dropout", "bone_dropout"),
        tensors=(("miss_block", "miss_block", None),),
        from_config=peft_from_config,
        to_config=peft_to_config,
    ),
    trainable_count=trainable_count,
    doc=__doc__,
)
