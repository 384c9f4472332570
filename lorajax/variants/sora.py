"""SoRA: sparse low-rank adaptation, LoRA with a trainable gate between A and B.

Maths (Flax orientation, kernel ``W: [in, out]``, ``A = lora_A: [in, r]``,
``g = gate: [r]``, ``B = lora_B: [r, out]``)::

    y  = x W + s · ((x A) ⊙ g) B
    W' = W + s · A diag(g) B,          s = α / r

The official module computes ``((x Aᵀ) ⊙ gate) Bᵀ · s`` with PyTorch's
``lora_A: [r, in]``, ``lora_B: [out, r]``, ``gate: [1, r]``; here
``lora_A = lora_A.weightᵀ``, ``lora_B = lora_B.weightᵀ`` and ``gate`` is the
``[r]`` vector.

Init (official ``LowRankLinear``): ``A ~ U(±1/√in)`` (kaiming-uniform, a=√5, on
``[r, in]``), ``B = 0``, ``g ~ N(0, 1)``, so the model is unchanged at init.

This module is only the parameterisation. SoRA trains the gate with its own
optimiser (an L1 penalty and a proximal soft-threshold step after each AdamW
step, specs/optim.md §8); that optimiser selects the leaves named ``gate``.
A gate entry that is exactly zero removes column ``i`` of ``A`` and row ``i`` of
``B`` from the update (pruning to a rank-``nnz(g)`` LoRA).

Trainable per target: ``r · (in + out) + r``.

Example:
  >>> import jax, jax.numpy as jnp, lorajax
  >>> params = {"dense": {"kernel": jnp.ones((6, 4))}}
  >>> spec = lorajax.Spec("sora", rank=2, alpha=4, targets=["dense"])
  >>> a = lorajax.init(spec, params, jax.random.key(0))["dense"]["kernel"]
  >>> a["lora_A"].shape, a["gate"].shape, a["lora_B"].shape
  ((6, 2), (2,), (2, 4))

References:
  Ding et al., "Sparse Low-rank Adaptation of Pre-trained Language Models",
  EMNLP 2023, arXiv:2311.11696. Official code TsinghuaC3I/SoRA ``src/lora.py``
  (``LowRankLinear``: init and forward), ``config/lora_config.json``; the gate
  optimiser in ``src/sparse_optimizer.py``, ``src/trainer.py``. Not in PEFT.
"""

from __future__ import annotations

import dataclasses

import jax

from lorajax.variants import lora, options
from lorajax.variants.base import EVAL, Context, Target, Variant, additive, down_project
from lorajax.variants.base import scaling as base_scaling
from lorajax.variants.options import checks, option


@dataclasses.dataclass(frozen=True)
class Options(options.Options):
    #: adapter dtype; None: float32, or the weight's dtype if wider
    dtype: str | None = option(None, checks.dtype)


def scaling(t: Target) -> float:
    """``α / r``."""
    return base_scaling(t.alpha, t.rank)


def init(key: jax.Array, w: jax.Array, t: Target) -> dict:
    """``{"lora_A": [in, r], "lora_B": [r, out] = 0, "gate": [r] ~ N(0, 1)}``."""
    key_ab, key_g = jax.random.split(key)
    adapter = lora.init(key_ab, w, t)
    adapter["gate"] = jax.random.normal(key_g, (t.rank,), adapter["lora_A"].dtype)
    return adapter


def delta(adapter: dict) -> jax.Array:
    """``A diag(g) B: [in, out]`` (without the scale)."""
    return (adapter["lora_A"] * adapter["gate"][None, :]) @ adapter["lora_B"]


#: ``W + s · A diag(g) B`` and its inverse, in the weight's dtype.
adapted, unadapted = additive(lambda w, adapter, t: scaling(t) * delta(adapter))


def apply(x: jax.Array, w: jax.Array, adapter: dict, t: Target, ctx: Context = EVAL) -> jax.Array:
    """``x W + s · ((x A) ⊙ g) B`` for ``x: [T, in]``; never forms ``A B``."""
    a, b = adapter["lora_A"], adapter["lora_B"]
    y = x @ w
    h = down_project(x.astype(a.dtype), a) * adapter["gate"][None, :]
    return y + (scaling(t) * (h @ b)).astype(y.dtype)


def trainable_count(targets: list[Target]) -> int:
    """``Σ r · (in + out) + r`` (``A``, ``B`` and the gate)."""
    return sum(t.rank * (sum(t.matrix_shape) + 1) for t in targets)


# No `Factors`: the gate sits between A and B (W' = W + s·A diag(g) B), so the update
# depends on A and B through A diag(g) B, not through s·A·B alone.
VARIANT = Variant(
    name="sora",
    init=init,
    adapted=adapted,
    apply=apply,
    unadapted=unadapted,
    options=Options,
    trainable_count=trainable_count,
    doc=__doc__,
)
