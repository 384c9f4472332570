"""The `Variant` record every variant module ends with, and `Target`, its per-weight config.

A variant works on one weight viewed as a matrix ``w: [in, out]`` (Flax
orientation; N-D kernels are reshaped by the caller). It provides pure
functions:

* ``init(key, w, t) -> adapter``: a dict of arrays for one target.
* ``adapted(w, adapter, t) -> w'``: the merged weight, same shape and dtype.
* ``apply(x, w, adapter, t) -> y``: optional factored forward for 2-D
  ``x: [T, in]`` giving ``y: [T, out]`` without a bias and without forming the
  full-size update. Without it the factored mode uses ``x @ adapted(w)``.
* ``unadapted(w', adapter, t) -> w``: optional inverse of ``adapted``.
* Input-dependent variants (routing, token-level experts) set
  ``adapted=None``: they run only in the factored mode and cannot be merged.
* Variants with ``uses_context=True`` get a last argument ``ctx`` in
  ``adapted`` / ``apply``: ``{"rng": a per-target PRNG key or None,
  "step_rng": the same key for every target (one draw per step, e.g.
  DyLoRA's rank), "train": bool}``. The caller of
  `lorajax.adapt`'s function passes ``adapter_rng=`` / ``adapter_train=``;
  `lorajax.merge` uses ``{"rng": None, "train": False}``.
* Variants with ``has_aux=True`` (load-balanced routing: FlyLoRA, SMoRA) return
  ``(y, aux)`` from ``apply``: ``aux`` is a dict of arrays that add up over
  calls and batches (e.g. how often each rank was selected). ``update(adapter,
  aux, t) -> dict`` gives new values for non-trained entries (a routing bias);
  `lorajax.update_state` applies it per target.
* ``init_shared(key, targets) -> dict``: optional state shared by all targets
  (VeRA's random projections). It is stored once under ``adapters["_shared"]``
  and passed to the per-target functions merged into ``adapter``.

``frozen`` names adapter entries that are buffers, never trained (per target
or under ``_shared``; other ``_shared`` entries, e.g. Uni-LoRA's one vector,
are trainable).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import jax.numpy as jnp

__all__ = ["Variant", "Target", "SHARED_KEY", "additive", "balance_bias"]

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
    options: Mapping[str, Any]

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """``(in, out)`` of the weight viewed as a matrix."""
        return (math.prod(self.shape[: self.in_axes]), math.prod(self.shape[self.in_axes :]))

    def __hash__(self):  # options is a dict; hash by identity of the path
        return hash((self.keys, self.shape, self.rank, self.alpha))


@dataclasses.dataclass(frozen=True)
class Variant:
    """A registered LoRA variant (see the module docstring for the contract)."""

    name: str
    init: Callable
    adapted: Callable | None
    apply: Callable | None = None
    unadapted: Callable | None = None
    init_shared: Callable | None = None
    frozen: frozenset = frozenset()
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    validate: Callable | None = None
    #: False where the rank may exceed min(in, out) (VeRA's shared projections).
    rank_limited: bool = True
    #: True where adapted/apply take a last ``ctx`` argument ({"rng", "train"}).
    uses_context: bool = False
    #: True where ``apply`` returns ``(y, aux)`` and ``update(adapter, aux, t)`` refreshes buffers.
    has_aux: bool = False
    update: Callable | None = None

    def __post_init__(self):
        if self.adapted is None and self.apply is None:
            raise ValueError(f"variant {self.name!r} needs adapted (mergeable) or apply (factored) or both")
        if self.has_aux and (self.apply is None or self.update is None):
            raise ValueError(f"variant {self.name!r}: has_aux needs both apply (returning (y, aux)) and update")

    @property
    def mergeable(self) -> bool:
        return self.adapted is not None
    doc: str = ""


def additive(delta: Callable) -> tuple[Callable, Callable]:
    """``(adapted, unadapted)`` for an additive variant ``W' = W ± delta(w, adapter, t)``.

    The update is computed in its own dtype (the adapter's, usually float32)
    and the result cast back to the weight's dtype.
    """

    def adapted(w, adapter, t):
        d = delta(w, adapter, t)
        return (w.astype(d.dtype) + d).astype(w.dtype)

    def unadapted(w, adapter, t):
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
