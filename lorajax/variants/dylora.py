"""DyLoRA: one LoRA adapter trained for every rank ``b ≤ r`` at once (nested ranks).

Maths (Flax orientation, kernel ``W: [in, out]``, ``A = lora_A: [in, r]``,
``B = lora_B: [r, out]``; ``A[:, :b]`` are the first ``b`` columns of ``A``,
``B[:b]`` the first ``b`` rows of ``B``)::

    y  = x W + (α / b) · (x A[:, :b]) B[:b]
    W' = W + (α / b) · A[:, :b] B[:b]

The official code scales both truncated factors by ``√(r/b)`` on top of LoRA's
``α/r``; the product scale is ``(α/r)·(r/b) = α/b``. At ``b = r`` this is plain
LoRA with ``s = α/r``.

* Training (``ctx["train"]``, the caller passes ``adapter_rng=`` and
  ``adapter_train=True`` to `lorajax.adapt`'s function): ``b`` is sampled
  uniformly from ``{1, …, r}`` (``randint(0, r) + 1``, the official training
  callback) from the context key. ``freeze_lower_ranks=True`` (default; the
  official callback always calls ``set_rank(..., frozen=True)``): the first
  ``b − 1`` columns of ``A`` and rows of ``B`` enter the forward under
  ``stop_gradient``, so only column ``b − 1`` of ``A`` and row ``b − 1`` of ``B``
  (0-based) get a gradient. ``False``: all of the first ``b`` columns/rows get
  one. The gradient is masked, not the update: an optimiser with momentum or
  weight decay still moves the other rows (as the official AdamW does).
  ``b`` is a traced value: the factors are masked, not sliced, so one compiled
  step serves every ``b``.
* Evaluation (the default context, and `lorajax.merge`): ``b = eval_rank``
  (default ``None``: ``b = r``). `lorajax.truncate` returns the rank-``b``
  adapter itself (``A[:, :b]``, ``B[:b]``, spec rank ``b``).

Sampling scope: the paper and the official code draw one ``b`` per step for the
whole model. This variant draws ``b`` from ``ctx["step_rng"]`` (the un-folded
``adapter_rng`` that `lorajax.adapt` and `lorajax.merge` pass to every
target), so every layer with the same ``r`` gets the same ``b``; a context
without it falls back to the per-target ``ctx["rng"]`` (one ``b`` per layer).

Init as LoRA: ``A ~ U(±1/√in)`` (kaiming-uniform, a=√5, on ``[r, in]``),
``B = 0``, so the model is unchanged at init for every ``b``.

Trainable per target: ``r · (in + out)`` (as LoRA at rank ``r``).

Example:
  >>> import jax, jax.numpy as jnp, lorajax
  >>> params = {"dense": {"kernel": jnp.ones((6, 4))}}
  >>> spec = lorajax.Spec("dylora", rank=4, alpha=8, targets=["dense"], eval_rank=2)
  >>> adapters = lorajax.init(spec, params, jax.random.key(0))
  >>> adapters["dense"]["kernel"]["lora_A"].shape
  (6, 4)
  >>> from lorajax.rank_tools import truncate
  >>> spec2, small = truncate(spec, adapters, 2)
  >>> spec2.rank, small["dense"]["kernel"]["lora_B"].shape
  (2, (2, 4))

References:
  Valipour et al., "DyLoRA: Parameter-Efficient Tuning of Pre-trained Models
  using Dynamic Search-Free Low-Rank Adaptation", EACL 2023, arXiv:2210.07558.
  Official code huawei-noah/Efficient-NLP ``DyLoRA/loralib/DyLoRA.py``
  (``dynamic.forward``: truncation, ``√(r/b)`` scale, ``frozen``),
  ``DyLoRA/loralib/layers.py`` (``Linear``) and
  ``DyLoRA/examples/NLU/examples/text-classification/run_glue.py``
  (``callback_step``: ``torch.randint(0, r)``, ``frozen=True``; evaluation loop
  over ranks). Not in PEFT.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from lorajax.variants import lora, options
from lorajax.variants.base import EVAL, Context, Target, Variant, down_project
from lorajax.variants.options import checks, option


@dataclasses.dataclass(frozen=True)
class Options(options.Options):
    #: the rank ``b`` used in evaluation and merging; None: the full rank ``r``
    eval_rank: int | None = option(None, checks.optional(checks.positive_int))
    #: train only component ``b − 1`` (the official callback); False: all of the first ``b``
    freeze_lower_ranks: bool = option(True, checks.boolean)
    #: adapter dtype; None: float32, or the weight's dtype if wider
    dtype: str | None = option(None, checks.dtype)


def init(key: jax.Array, w: jax.Array, t: Target) -> dict:
    """``{"lora_A": [in, r], "lora_B": [r, out]}`` as LoRA (``B = 0``)."""
    return lora.init(key, w, t)


def sample_rank(key: jax.Array, r: int) -> jax.Array:
    """``b ~ U{1, …, r}`` as a traced int32 scalar."""
    return jax.random.randint(key, (), 0, r) + 1


def _factors(adapter: dict, t: Target, ctx: Context) -> tuple[jax.Array, jax.Array, jax.Array | float]:
    """``(A_b, B_b, α/b)`` for this call: sliced at eval, masked in training."""
    a, b_mat = adapter["lora_A"], adapter["lora_B"]
    r = a.shape[1]
    if not ctx.train:
        b = t.options.eval_rank or r
        if b > r:
            raise ValueError(f"{t.name}: eval_rank={b} is larger than the adapter's rank {r}")
        return a[:, :b], b_mat[:b], t.alpha / b
    key = ctx.step_rng if ctx.step_rng is not None else ctx.rng
    if key is None:
        raise ValueError(f"{t.name}: DyLoRA samples its rank in training; pass adapter_rng= with adapter_train=True")
    b = sample_rank(key, r)
    j = jnp.arange(r)
    keep = j < b
    if t.options.freeze_lower_ranks:
        live = j == b - 1
        a = jnp.where(live[None, :], a, jax.lax.stop_gradient(a))
        b_mat = jnp.where(live[:, None], b_mat, jax.lax.stop_gradient(b_mat))
    a = jnp.where(keep[None, :], a, jnp.zeros((), a.dtype))
    b_mat = jnp.where(keep[:, None], b_mat, jnp.zeros((), b_mat.dtype))
    return a, b_mat, t.alpha / b.astype(a.dtype)


def delta(adapter: dict, t: Target, ctx: Context = EVAL) -> jax.Array:
    """``(α/b) · A[:, :b] B[:b]: [in, out]``."""
    a, b_mat, scale = _factors(adapter, t, ctx)
    return scale * (a @ b_mat)


def adapted(w: jax.Array, adapter: dict, t: Target, ctx: Context = EVAL) -> jax.Array:
    """``W + (α/b) · A[:, :b] B[:b]`` in the weight's dtype."""
    d = delta(adapter, t, ctx)
    return (w.astype(d.dtype) + d).astype(w.dtype)


def unadapted(w: jax.Array, adapter: dict, t: Target, ctx: Context = EVAL) -> jax.Array:
    """Inverse of `adapted` for the same ``b``."""
    d = delta(adapter, t, ctx)
    return (w.astype(d.dtype) - d).astype(w.dtype)


def apply(x: jax.Array, w: jax.Array, adapter: dict, t: Target, ctx: Context = EVAL) -> jax.Array:
    """``x W + (α/b) · (x A[:, :b]) B[:b]`` for ``x: [T, in]``."""
    a, b_mat, scale = _factors(adapter, t, ctx)
    y = x @ w
    h = down_project(x.astype(a.dtype), a)
    return y + (scale * (h @ b_mat)).astype(y.dtype)


def truncate(spec: Any, ranks: dict[str, int], rank: int) -> Any:
    """The first ``b`` components are the rank-``b`` DyLoRA (its scale ``α/b`` needs no new α)."""
    return spec.replace(rank=rank, rank_pattern={}, eval_rank=None)


VARIANT = Variant(
    name="dylora",
    init=init,
    adapted=adapted,
    apply=apply,
    unadapted=unadapted,
    options=Options,
    truncate=truncate,
    trainable_count=lora.trainable_count,
    doc=__doc__,
)
