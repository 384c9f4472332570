"""LoRA and rsLoRA: a trainable low-rank update beside a frozen weight.

Maths (Flax orientation, kernel ``W: [in, out]``, ``y = x W``)::

    y = x W + s · (x A) B,        W' = W + s · A B
    s = α / r          (LoRA)
    s = α / √r         (rsLoRA, ``use_rslora=True``)

PEFT stores ``lora_A.weight: [r, in]`` and ``lora_B.weight: [out, r]``; here
``lora_A = lora_A.weightᵀ: [in, r]`` and ``lora_B = lora_B.weightᵀ: [r, out]``.

Init (``init_weights``): ``True`` (default): ``A ~ U(-1/√in, 1/√in)`` (PyTorch's
kaiming-uniform with a=√5 on ``[r, in]``), ``B = 0``, so the model is unchanged
at init. ``"gaussian"``: ``A ~ N(0, 1/r²)``, ``B = 0``. ``False``: A and B both
random (not an identity; for tests). ``"pissa"`` / ``"pissa_niter_K"`` /
``"olora"`` change the base weight: build them with `lorajax.inits.pissa` /
`lorajax.inits.olora`, which return the new base explicitly.

Embedding tables (``W: [num_embeddings, features]``, targeted by name) are
initialised the other way round, as PEFT's ``Embedding`` layer (and loralib's)
does: ``A = 0`` and ``B ~ N(0, 1)`` for ``True`` and ``"gaussian"``; ``False``:
both ``N(0, 1)``. A conv kernel viewed as ``[prod(kernel_size)·in, out]`` gets
the linear init, which is PEFT's conv ``lora_A`` init (fan-in ``prod(k)·in``).
`lorajax.layer_kinds` has the embedding and conv forwards and PEFT layouts.

Trainable per target: ``r · (in + out)``.

Example:
  >>> import jax, jax.numpy as jnp, lorajax
  >>> params = {"dense": {"kernel": jnp.ones((6, 4)), "bias": jnp.zeros(4)}}
  >>> spec = lorajax.Spec("lora", rank=2, alpha=4, targets=["dense"])
  >>> adapters = lorajax.init(spec, params, jax.random.key(0))
  >>> adapters["dense"]["kernel"]["lora_A"].shape, adapters["dense"]["kernel"]["lora_B"].shape
  ((6, 2), (2, 4))

References:
  Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022,
  arXiv:2106.09685; official code microsoft/LoRA ``loralib/layers.py``.
  Kalajdzievski, "A Rank Stabilization Scaling Factor for Fine-Tuning with
  LoRA" (rsLoRA), arXiv:2312.03732.
  PEFT: ``src/peft/tuners/lora/layer.py`` (``Linear.forward``,
  ``get_delta_weight``, ``reset_lora_parameters``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp

from lorajax.selection import is_embedding
from lorajax.variants import options
from lorajax.variants.base import EVAL, Context, Factors, PeftFormat, Target, Variant, additive, down_project, dropout
from lorajax.variants.base import scaling as base_scaling
from lorajax.variants.options import checks, option

INIT_CHOICES = (True, False, "gaussian", "pissa", "olora")


def _check_init(name: str, value: Any) -> None:
    ok = any(value == c and type(value) is type(c) for c in INIT_CHOICES) or (
        isinstance(value, str) and value.startswith("pissa_niter_")
    )
    if not ok:
        raise ValueError(f"{name} must be one of {INIT_CHOICES} or 'pissa_niter_K', got {value!r}")


@dataclasses.dataclass(frozen=True)
class Options(options.Options):
    #: scale ``α/√r`` (rsLoRA) instead of ``α/r``
    use_rslora: bool = option(False, checks.boolean)
    #: True: ``A ~ U(±1/√in)``, ``B = 0``; ``"gaussian"``: ``A ~ N(0, 1/r²)``; False: both random;
    #: ``"pissa"`` / ``"pissa_niter_K"`` / ``"olora"``: use `lorajax.inits` (they change the base)
    init_weights: Any = option(True, _check_init)
    #: adapter dtype; None: float32, or the weight's dtype if wider
    dtype: str | None = option(None, checks.dtype)
    #: PEFT's ``lora_dropout``: dropout on the adapter's input in training (`lorajax.variants.base.dropout`; factored
    #: mode, with ``adapter_rng`` and ``adapter_train=True``)
    dropout: float = option(0.0, checks.probability)


def scaling(t: Target) -> float:
    """``α / r``, or ``α / √r`` with ``use_rslora``."""
    return base_scaling(t.alpha, t.rank, t.options.get("use_rslora", False))


def adapter_dtype(t: Target, w: jax.Array):
    return jnp.dtype(t.options.get("dtype") or jnp.promote_types(w.dtype, jnp.float32))


def init(key: jax.Array, w: jax.Array, t: Target) -> dict:
    """``{"lora_A": [in, r], "lora_B": [r, out]}`` for ``w: [in, out]``."""
    d_in, d_out = w.shape
    dtype = adapter_dtype(t, w)
    mode = t.options.get("init_weights", True)
    if isinstance(mode, str) and mode != "gaussian":
        raise ValueError(
            f"init_weights={mode!r} changes the base weight: use lorajax.inits.{mode.split('_')[0]}"
            "(spec, params, key), which returns (adapters, new_params)"
        )
    key_a, key_b = jax.random.split(key)
    if is_embedding(t.keys):  # PEFT's Embedding: A = 0, B ~ N(0, 1) (random A too when init_weights=False)
        b = jax.random.normal(key_b, (t.rank, d_out), dtype)
        a = jnp.zeros((d_in, t.rank), dtype) if mode is not False else jax.random.normal(key_a, (d_in, t.rank), dtype)
        return {"lora_A": a, "lora_B": b}
    if mode == "gaussian":
        a = jax.random.normal(key_a, (d_in, t.rank), dtype) / t.rank
    else:
        bound = 1.0 / math.sqrt(d_in)
        a = jax.random.uniform(key_a, (d_in, t.rank), dtype, -bound, bound)
    if mode is False:
        bound_b = 1.0 / math.sqrt(t.rank)
        b = jax.random.uniform(key_b, (t.rank, d_out), dtype, -bound_b, bound_b)
    else:
        b = jnp.zeros((t.rank, d_out), dtype)
    return {"lora_A": a, "lora_B": b}


def delta(adapter: dict, t: Target) -> jax.Array:
    """``s · A B: [in, out]``."""
    return scaling(t) * (adapter["lora_A"] @ adapter["lora_B"])


#: ``W + s · A B`` and its inverse, in the weight's dtype.
adapted, unadapted = additive(lambda w, adapter, t: delta(adapter, t))


def low_rank(x: jax.Array, adapter: dict, t: Target) -> jax.Array:
    """``s · (x A) B: [T, out]`` for ``x: [T, in]``, in the adapter's dtype; never forms ``A B``.

    Computed as ``(x (s·A)) B``: the scale multiplies the small ``[in, r]`` factor instead of the ``[T, out]``
    product, which saves a full pass over the output in the forward and one over its gradient in the backward
    (in the benchmark's LoRA step, ``experiments/bench_lora_step.py``, 1.3% of the step).
    """
    a, b = adapter["lora_A"], adapter["lora_B"]
    return down_project(x.astype(a.dtype), a * jnp.asarray(scaling(t), a.dtype)) @ b


def apply(x: jax.Array, w: jax.Array, adapter: dict, t: Target, ctx: Context = EVAL) -> jax.Array:
    """``x W + s · (drop(x) A) B`` for ``x: [T, in]`` (``drop``: `dropout`, training only); never forms ``A B``."""
    y = x @ w
    return y + low_rank(dropout(x, t, ctx), adapter, t).astype(y.dtype)


def truncate(spec: Any, ranks: dict[str, int], rank: int) -> Any:
    """The spec of the adapters cut to their first ``rank`` components (``ranks``: module name -> old rank).

    ``s·A[:, :b] B[:b]`` keeps each component's scale when ``α`` shrinks with the
    rank: ``α_b = α · b/r`` (``α · √(b/r)`` with rsLoRA), per module.
    """
    from lorajax.targets import pattern_value

    rslora = spec.options.get("use_rslora", False)

    def ratio(r: int) -> float:
        return math.sqrt(rank / r) if rslora else rank / r

    new_alpha = {
        name: float(pattern_value(spec.alpha_pattern, name, spec.alpha)) * ratio(r) for name, r in ranks.items()
    }
    values = set(new_alpha.values())
    if len(values) == 1:
        return spec.replace(rank=rank, rank_pattern={}, alpha=values.pop(), alpha_pattern={})
    # most specific names first: a pattern key also matches names that end with ".<key>"
    pattern = {re.escape(n): new_alpha[n] for n in sorted(new_alpha, key=lambda n: (-len(n), n))}
    return spec.replace(rank=rank, rank_pattern={}, alpha=spec.alpha * ratio(spec.rank), alpha_pattern=pattern)


def trainable_count(targets: list[Target]) -> int:
    """``Σ r · (in + out)``."""
    return sum(t.rank * sum(t.matrix_shape) for t in targets)


# ----------------------------------------------------------------------------- PEFT format (LoraConfig)


def peft_from_config(config: dict, common: dict, options: dict | None = None, *, variant: str = "lora") -> Any:
    """The Spec of a ``LoraConfig`` (``options``: `lorajax.peft`'s load options, not used by LoRA)."""
    from lorajax.spec import Spec

    return Spec(
        variant,
        alpha=float(config.get("lora_alpha", 8)),
        **common,
        rank_pattern=config.get("rank_pattern") or None,
        alpha_pattern=config.get("alpha_pattern") or None,
        use_rslora=bool(config.get("use_rslora", False)),
    )


def peft_to_config(spec: Any, targets: list[Target], *, use_dora: bool = False) -> dict:
    rank_pattern = {re.escape(t.name): t.rank for t in targets if t.rank != spec.rank}
    alpha_pattern = {re.escape(t.name): t.alpha for t in targets if t.alpha != spec.alpha}
    return {
        "peft_type": "LORA",
        "lora_alpha": spec.alpha,
        "use_rslora": bool(spec.options["use_rslora"]),
        "use_dora": use_dora,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "init_lora_weights": True,
        "exclude_modules": None,
    }


PEFT_FIELDS = frozenset({"lora_alpha", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern"})
PEFT_TENSORS = (("lora_A", "lora_A.weight", "T"), ("lora_B", "lora_B.weight", "T"))

VARIANT = Variant(
    name="lora",
    init=init,
    adapted=adapted,
    apply=apply,
    unadapted=unadapted,
    options=Options,
    factors=Factors("lora_A", "lora_B", scale=scaling, exact=True),
    truncate=truncate,
    peft=PeftFormat(
        ("LORA",),
        fields=PEFT_FIELDS,
        tensors=PEFT_TENSORS,
        dropout=("lora_dropout",),
        accepts=lambda config: not config.get("use_dora"),
        from_config=peft_from_config,
        to_config=peft_to_config,
    ),
    trainable_count=trainable_count,
    doc=__doc__,
)
