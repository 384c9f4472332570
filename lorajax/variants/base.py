"""The variant contract: `Variant` (what a variant is and can do), `Target`, `Context`.

A variant works on one weight viewed as a matrix ``w: [in, out]`` (Flax
orientation; N-D kernels are reshaped by the caller). Its file defines pure
functions and ends with ``VARIANT = Variant(...)``; one line in
`lorajax.registry` registers it. The call protocol is the same for every
variant (``ctx`` is a `Context`):

* ``init(key, w, t) -> adapter``: a dict of arrays for one target.
* ``adapted(w, adapter, t, ctx) -> w'``: the merged weight, same shape and
  dtype. ``None`` for input-dependent variants (routing): they run only in
  the factored mode and cannot be merged.
* ``apply(x, w, adapter, t, ctx) -> y``: optional factored forward for 2-D
  ``x: [T, in]`` giving ``y: [T, out]`` without a bias and without forming the
  full-size update. Without it the factored mode uses ``x @ adapted(w)``.
  Statistics for a state update (how often a router picked each rank) are
  handed to ``ctx.sow(stats)``; they add up over calls and batches.
* ``unadapted(w', adapter, t, ctx) -> w``: optional inverse of ``adapted``.
* ``update(adapter, stats, t) -> dict``: optional; new values for buffers from
  the sown statistics (a routing bias); `lorajax.update_state` applies it.
* ``init_shared(key, targets) -> dict``: optional state shared by all targets
  (VeRA's random projections), stored once under ``adapters["_shared"]`` and
  passed to the per-target functions merged into ``adapter``.

What generic code needs to know is declared, never looked up by name:

* ``options``: the variant's `Options` dataclass (typed, documented, checked).
* ``buffers``: regexes (``re.fullmatch``) of adapter entry names that are never
  trained (per target or under ``_shared``); all other entries are trainable.
* ``factors``: a `Factors` record where the update holds an ``s·A·B`` term
  (LoRA+, LoRA-Pro, squeeze, multi-adapter, ESSA, the Pallas path use it).
* ``truncate``: nested ranks (DyLoRA, LoRA): the spec of the adapter cut to
  its first ``b`` components.
* ``peft``: a `PeftFormat` (PEFT's tensor names and config) or ``None``.
* ``trainable_count(targets) -> int``: the number of trained entries, by formula.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp

from lorajax.variants.options import NoOptions, Options

__all__ = [
    "Variant",
    "Target",
    "Context",
    "EVAL",
    "Factors",
    "PeftFormat",
    "SHARED_KEY",
    "scaling",
    "down_project",
    "additive",
    "balance_bias",
]

#: Key of model-level adapter state in an adapters tree.
SHARED_KEY = "_shared"


@dataclasses.dataclass(frozen=True)
class Target:
    """One adapted weight: where it is and its resolved hyper-parameters.

    Attributes:
      keys: path of the weight in the adapters tree (string keys, including a
        leading ``"params"`` when the tree is a Flax variables dict).
      name: dotted module name used for matching, e.g. ``"layers.0.q_proj"``.
      shape: the weight's own shape (possibly N-D).
      in_axes: number of leading axes of ``shape`` that are inputs.
      rank, alpha: resolved from the Spec and its rank/alpha patterns.
      options: the variant's options, defaults filled in.
    """

    keys: tuple
    name: str
    shape: tuple
    in_axes: int
    rank: int
    alpha: float
    options: Any  # the variant's `Options` (typed per variant)

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """``(in, out)`` of the weight viewed as a matrix."""
        return (math.prod(self.shape[: self.in_axes]), math.prod(self.shape[self.in_axes :]))

    def __hash__(self):  # options is a dict; hash by identity of the path
        return hash((self.keys, self.shape, self.rank, self.alpha))


def scaling(alpha: float, rank: int, rslora: bool = False) -> float:
    """LoRA's scale: ``α / r``, or ``α / √r`` with rsLoRA. The one place it is written."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


@dataclasses.dataclass(frozen=True)
class Context:
    """What a call of ``adapted`` / ``apply`` may use beyond the weight and adapter.

    Attributes:
      rng: a per-target PRNG key (``fold_in(adapter_rng, crc32(path))``) or None.
      step_rng: the caller's key itself, the same for every target (one draw
        per step, e.g. DyLoRA's sampled rank), or None.
      train: True in training (sampling, dropout), False in evaluation.
      sink: where `sow` sends statistics; None drops them.
    """

    rng: Any = None
    step_rng: Any = None
    train: bool = False
    sink: Callable[[dict], None] | None = dataclasses.field(default=None, compare=False, repr=False)

    def sow(self, stats: dict) -> None:
        """Hand statistics (a dict of arrays that add up over calls) to the caller, like linen's ``sow``."""
        if self.sink is not None:
            self.sink(stats)


#: The evaluation context: no randomness, no statistics (`lorajax.merge`'s default).
EVAL = Context()

#: folded into ``ctx.rng`` for the adapter-input dropout mask, so it is independent of a variant's own draws
DROPOUT_TAG = 0x64726F70


@jax.custom_vjp
def down_project(x_TxI: jax.Array, a_IxR: jax.Array) -> jax.Array:
    """``x A: [T, r]`` for ``x: [T, in]``, ``A: [in, r]`` (same dtype) — the first product of a factored
    low-rank forward — with a backward that forms ``dA`` as ``(gᵀ x)ᵀ``: ``[r, T] · [T, in]`` and then a
    small ``[r, in]`` transpose, behind an optimisation barrier so XLA does not fold the transpose back
    into a ``[in, T] · [T, r]`` product. Same values and gradients as ``x @ A``; on XLA:CPU at the
    benchmark's shapes (T = 2048, r = 16) the folded form ran at ~20 GFLOP/s and this one 2-3.3x faster
    (``experiments/bench_lora_step.py``)."""
    return x_TxI @ a_IxR


def _down_project_fwd(x_TxI, a_IxR):
    return x_TxI @ a_IxR, (x_TxI, a_IxR)


def _down_project_bwd(res, g_TxR):
    x_TxI, a_IxR = res
    x2 = x_TxI.reshape(-1, x_TxI.shape[-1])
    g2 = g_TxR.reshape(-1, g_TxR.shape[-1]).astype(x2.dtype)
    da_RxI = jax.lax.optimization_barrier(g2.T @ x2)
    dx = (g_TxR @ a_IxR.T.astype(g_TxR.dtype)).astype(x_TxI.dtype)
    return dx, da_RxI.T.astype(a_IxR.dtype)


down_project.defvjp(_down_project_fwd, _down_project_bwd)


def dropout(x: jax.Array, t: Any, ctx: Context) -> jax.Array:
    """PEFT's ``lora_dropout`` (``vera_dropout``, …) on the adapter's input ``x: [T, in]``, training only.

    ``x ⊙ m / (1 − p)`` with ``m ~ Bernoulli(1 − p)`` per element (as ``torch.nn.Dropout``), ``p =
    t.options["dropout"]``; the mask is `dropout_mask` of the target's key ``ctx.rng``. Identity when ``p = 0``
    or ``ctx.train`` is False. The base path ``x W`` always sees the clean ``x``.
    """
    p = float(t.options.get("dropout", 0.0))
    if p == 0.0 or not ctx.train:
        return x
    if ctx.rng is None:
        raise ValueError(
            f"{t.name}: dropout={p} in training needs a PRNG key: pass adapter_rng=<key> with adapter_train=True"
        )
    keep = dropout_mask(ctx.rng, p, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - p, x.dtype), jnp.zeros((), x.dtype))


def dropout_mask(rng: jax.Array, p: float, shape: tuple[int, ...]) -> jax.Array:
    """The keep mask ``[*shape]`` (bool, ``P(keep) = 1 − p``) that `dropout` draws from a target's key."""
    return jax.random.bernoulli(jax.random.fold_in(rng, DROPOUT_TAG), 1.0 - p, shape)


@dataclasses.dataclass(frozen=True)
class Factors:
    """Where a variant's update holds an ``s·A·B`` term, and what that term means.

    Attributes:
      a, b: adapter entry names of ``A: [in, r]`` and ``B: [r, out]``.
      scale: ``scale(t) -> s`` for a target.
      exact: True when the adapter is exactly ``{a, b}`` and ``W' = W + s·A·B``
        (plain LoRA algebra: what multi-adapter pools, ESSA, the Pallas kernel and
        LoRA-Pro's equations assume); False when other entries act on the result
        (DoRA's magnitude) but the update depends on ``A``, ``B`` only through
        ``s·A·B`` (so LoRA+ and LoRA-Squeeze still apply).
    """

    a: str = "lora_A"
    b: str = "lora_B"
    scale: Callable[["Target"], float] | None = None
    exact: bool = False


@dataclasses.dataclass(frozen=True)
class PeftFormat:
    """How a variant is stored in PEFT's adapter folder (``adapter_config.json`` + safetensors).

    Attributes:
      peft_types: the ``peft_type`` values this variant reads (``("MISS", "BONE")``).
      fields: config fields it reads beyond the selection ones (``r``, ``target_modules``, …).
      tensors: per-target tensors ``(entry, PEFT suffix, transform)``; the
        transform is ``"T"`` (2-D transpose), ``"swap"`` (reverse the rows) or None.
      shared: model-level tensors under ``base_model.``: ``(entry, PEFT name, transform)``.
      duplicates: shared entries PEFT also writes per module (dropped on load).
      dropout: the config fields holding the adapter-input dropout rate (``("miss_dropout", "bone_dropout")``):
        read into the ``dropout`` option, the first one written; the variant's `Options` declares ``dropout``.
      accepts: ``accepts(config) -> bool`` when two variants share a type
        (LoRA and DoRA: ``use_dora``); None accepts every config of the types.
      from_config: ``from_config(config, common, options) -> Spec`` where
        ``common`` has the selection keywords (rank, targets, exclude, layers)
        and ``options`` the loader's ``{"module_order", "tensor_names", "dtype"}``.
      to_config: ``to_config(spec, targets) -> dict`` of the type's fields.
      shared_fits: ``shared_fits(entry, array, like) -> bool`` for shared tensors
        that may be larger than needed (VeRA); None: shapes must be equal.
      load_extra / save_extra: hooks for formats that keep more than tensors
        per target (Uni-LoRA's indices): ``load_extra(spec, params, targets,
        tensors, template, options) -> adapters`` (``template()`` builds the
        initial adapters) replaces the generic loading;
        ``save_extra(spec, targets, index, shared) -> {name: array}``.
    """

    peft_types: tuple[str, ...]
    fields: frozenset = frozenset()
    tensors: tuple = ()
    shared: tuple = ()
    duplicates: tuple = ()
    dropout: tuple[str, ...] = ()
    accepts: Callable[[dict], bool] | None = None
    from_config: Callable | None = None
    to_config: Callable | None = None
    shared_fits: Callable | None = None
    load_extra: Callable | None = None
    save_extra: Callable | None = None


@dataclasses.dataclass(frozen=True)
class Variant:
    """A registered LoRA variant (see the module docstring for the contract)."""

    name: str
    init: Callable
    adapted: Callable | None
    apply: Callable | None = None
    unadapted: Callable | None = None
    init_shared: Callable | None = None
    update: Callable | None = None
    #: the `Options` dataclass
    options: type[Options] = NoOptions
    #: regexes of adapter entries that are buffers, never trained
    buffers: tuple = ()
    #: False where the rank may exceed min(in, out) (VeRA's shared projections).
    rank_limited: bool = True
    factors: Factors | None = None
    truncate: Callable | None = None
    peft: PeftFormat | None = None
    trainable_count: Callable | None = None
    doc: str = ""

    def __post_init__(self):
        if self.adapted is None and self.apply is None:
            raise ValueError(f"variant {self.name!r} needs adapted (mergeable) or apply (factored) or both")
        if not (isinstance(self.options, type) and issubclass(self.options, Options)):
            raise TypeError(f"variant {self.name!r}: options must be an Options dataclass, got {self.options!r}")
        if isinstance(self.buffers, str):
            raise TypeError(
                f"variant {self.name!r}: buffers must be a tuple of regexes, got the string {self.buffers!r}"
            )
        object.__setattr__(self, "_buffer_res", tuple(re.compile(p) for p in self.buffers))

    @property
    def mergeable(self) -> bool:
        return self.adapted is not None

    def is_buffer(self, entry: str) -> bool:
        """True when the adapter entry ``entry`` is a buffer (never trained)."""
        return any(p.fullmatch(entry) for p in self._buffer_res)  # type: ignore[attr-defined]

    def build_options(self, **values: Any) -> Any:
        """The variant's `Options` from keywords (defaults filled in, checked)."""
        return self.options.build(self.name, **values)


def additive(delta: Callable) -> tuple[Callable, Callable]:
    """``(adapted, unadapted)`` for an additive variant ``W' = W ± delta(w, adapter, t)``.

    The update is computed in its own dtype (the adapter's, usually float32)
    and the result cast back to the weight's dtype. The returned functions take
    (and ignore) the context: a delta that depends on it is written out instead.
    """

    def adapted(w, adapter, t, ctx=EVAL):
        d = delta(w, adapter, t)
        return (w.astype(d.dtype) + d).astype(w.dtype)

    def unadapted(w, adapter, t, ctx=EVAL):
        d = delta(w, adapter, t)
        return (w.astype(d.dtype) - d).astype(w.dtype)

    return adapted, unadapted


def balance_bias(name: str, rate_option: str) -> Callable:
    """``update`` of a load-balanced router: ``{name: b + u · sign(mean(c) − c)}``.

    ``c = aux["counts"]`` (how often each rank was selected), ``u =
    t.options[rate_option]``: the bias of an under-used rank rises by ``u``, of
    an over-used one falls by ``u``. Float32 arithmetic; the bias keeps its dtype.
    """

    def update(adapter: dict, aux: dict, t: Target) -> dict:
        c = aux["counts"].astype(jnp.float32)
        b = adapter[name]
        step = t.options[rate_option] * jnp.sign(jnp.mean(c) - c)
        return {name: (b.astype(jnp.float32) + step).astype(b.dtype)}

    return update
