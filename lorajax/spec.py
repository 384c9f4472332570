"""`Spec`: which variant, its hyper-parameters, and which weights it adapts.

A `Spec` is a frozen, hashable value. It is validated when it is built: a bad
rank, an unknown variant or an unknown option raises at once, naming the bad
value and the closest valid ones.

Which weights are adapted is a `lorajax.selection.Selection` (``spec.selection``;
``Spec(variant, rank, alpha, targets=Selection(...))`` also works): the fields
below, except the rank and alpha patterns, are its. Target selection follows
PEFT's `LoraConfig` semantics, applied to module
names made by joining a Flax parameter path with dots (the collection name
``params`` and the leaf name ``kernel`` are dropped), e.g.
``encoder.layers_0.attention.query`` for linen or ``layers.0.q_proj`` for NNX.

* ``targets``: a list of module-name suffixes (``["q_proj", "v_proj"]``: a
  name matches if it equals the suffix or ends with ``"." + suffix``), a
  regex string (``re.fullmatch`` against the whole name), or ``"all-linear"``
  (every 2-D kernel except the output head, see `HEAD_NAMES`).
* ``exclude``: the same grammar, removing names from the selection.
* ``layers_to_transform`` / ``layers_pattern``: keep only layers with these
  indices; the index is read from ``<pattern>.<i>.`` or ``<pattern>_<i>.``.
* ``rank_pattern`` / ``alpha_pattern``: ``{regex: value}``; a key applies to a
  module when ``re.match(rf"(.*\\.)?({key})$", name)`` (PEFT's rule); the first
  matching key wins.
* ``in_axes``: for kernels with more than two axes (DenseGeneral / Einsum),
  how many leading axes are inputs; an int or ``{regex: int}`` (default 1).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, Sequence

from lorajax.selection import HEAD_NAMES, Selection

__all__ = ["Spec", "Selection", "HEAD_NAMES"]

_SELECTION_DEFAULTS = dict(exclude=None, layers_to_transform=None, layers_pattern=None, in_axes=1)


@dataclasses.dataclass(frozen=True, init=False)
class Spec:
    """What to adapt and how.

    Args:
      variant: registered variant name (see `lorajax.list_variants()`).
      rank: adapter rank ``r`` (> 0).
      alpha: scaling numerator ``α`` (``s = α / r``; ``α / √r`` with
        ``use_rslora=True``). Default 8, as PEFT's ``lora_alpha``.
      targets: module-name suffixes, a regex, or ``"all-linear"``.
      exclude, layers_to_transform, layers_pattern, rank_pattern,
      alpha_pattern, in_axes: see the module docstring.
      **options: variant options (e.g. ``use_rslora=True``); unknown names
        raise, listing the variant's options.

    Example:
      >>> import lorajax
      >>> spec = lorajax.Spec("lora", rank=4, alpha=8, targets=["q_proj", "v_proj"])
      >>> spec.options["use_rslora"]
      False
    """

    variant: str
    rank: int
    alpha: float
    selection: Selection
    rank_pattern: tuple
    alpha_pattern: tuple
    _options: Any

    def __init__(
        self,
        variant: str = "lora",
        rank: int = 8,
        alpha: float = 8.0,
        targets: str | Sequence[str] | Selection = "all-linear",
        *,
        exclude: str | Sequence[str] | None = None,
        layers_to_transform: int | Sequence[int] | None = None,
        layers_pattern: str | Sequence[str] | None = None,
        rank_pattern: Mapping[str, int] | None = None,
        alpha_pattern: Mapping[str, float] | None = None,
        in_axes: int | Mapping[str, int] = 1,
        **options: Any,
    ):
        from lorajax import registry  # local: registry imports variants

        variant_obj = registry.get(variant)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"rank must be a positive int, got {rank!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise ValueError(f"alpha must be a finite number, got {alpha!r}")
        for name, pat, kind in (("rank_pattern", rank_pattern, int), ("alpha_pattern", alpha_pattern, float)):
            for key, val in (pat or {}).items():
                try:
                    re.compile(key)
                except re.error as e:
                    raise ValueError(f"{name} key {key!r} is not a valid regex: {e}") from None
                if kind is int and (isinstance(val, bool) or not isinstance(val, int) or val <= 0):
                    raise ValueError(f"{name}[{key!r}] must be a positive int, got {val!r}")
                if kind is float and (not isinstance(val, (int, float)) or not math.isfinite(val)):
                    raise ValueError(f"{name}[{key!r}] must be a finite number, got {val!r}")
        if isinstance(targets, Selection):
            given = dict(
                exclude=exclude, layers_to_transform=layers_to_transform, layers_pattern=layers_pattern, in_axes=in_axes
            )
            extra = [k for k, v in given.items() if v != _SELECTION_DEFAULTS[k]]
            if extra:
                raise ValueError(f"{extra} given together with a Selection, which already fixes them")
            selection = targets
        else:
            selection = Selection(
                targets,
                exclude=exclude,
                layers_to_transform=layers_to_transform,
                layers_pattern=layers_pattern,
                in_axes=in_axes,
            )

        built = variant_obj.build_options(**options)

        set_ = object.__setattr__
        set_(self, "variant", variant)
        set_(self, "rank", rank)
        set_(self, "alpha", float(alpha))
        set_(self, "selection", selection)
        # patterns keep their order: the first matching key wins, as in PEFT
        set_(self, "rank_pattern", tuple((str(k), v) for k, v in (rank_pattern or {}).items()))
        set_(self, "alpha_pattern", tuple((str(k), float(v)) for k, v in (alpha_pattern or {}).items()))
        set_(self, "_options", built)

    # the selection's fields, read through the Spec
    targets = property(lambda self: self.selection.targets, doc="`Selection.targets`")
    exclude = property(lambda self: self.selection.exclude, doc="`Selection.exclude`")
    layers_to_transform = property(
        lambda self: self.selection.layers_to_transform, doc="`Selection.layers_to_transform`"
    )
    layers_pattern = property(lambda self: self.selection.layers_pattern, doc="`Selection.layers_pattern`")
    in_axes = property(lambda self: self.selection.in_axes, doc="`Selection.in_axes`")

    @property
    def options(self) -> Any:
        """The variant's options (its `Options` dataclass; it reads like a dict too), defaults filled in."""
        return self._options

    def replace(self, **changes: Any) -> "Spec":
        """A copy with some fields or options changed (validated again)."""
        kwargs = dict(
            variant=self.variant,
            rank=self.rank,
            alpha=self.alpha,
            **self.selection.keywords(),
            rank_pattern=dict(self.rank_pattern),
            alpha_pattern=dict(self.alpha_pattern),
        )
        if changes.get("variant", self.variant) == self.variant:
            kwargs.update(self.options)
        kwargs.update(changes)
        return Spec(**kwargs)
