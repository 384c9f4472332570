"""`Spec`: which variant, its hyper-parameters, and which weights it adapts.

A `Spec` is a frozen, hashable value. It is validated when it is built: a bad
rank, an unknown variant or an unknown option raises at once, naming the bad
value and the closest valid ones.

Target selection follows PEFT's `LoraConfig` semantics, applied to module
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

__all__ = ["Spec", "HEAD_NAMES"]

#: Last name components treated as the output head by ``targets="all-linear"``.
HEAD_NAMES = ("lm_head", "embed_out", "classifier", "score", "head")


def _check_targets(value: Any, what: str) -> Any:
    if value is None:
        return None
    if isinstance(value, str):
        if value != "all-linear":
            try:
                re.compile(value)
            except re.error as e:
                raise ValueError(f"{what}={value!r} is not a valid regex: {e}") from None
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        items = tuple(sorted(value)) if isinstance(value, (set, frozenset)) else tuple(value)
        if not items and what == "targets":
            raise ValueError("targets is empty: give module-name suffixes, a regex or 'all-linear'")
        for item in items:
            if not isinstance(item, str) or not item:
                raise ValueError(f"{what} entries must be non-empty strings, got {item!r}")
        return items
    raise TypeError(f"{what} must be a list of names, a regex string or 'all-linear', got {value!r}")


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
    targets: Any
    exclude: Any
    layers_to_transform: Any
    layers_pattern: Any
    rank_pattern: tuple
    alpha_pattern: tuple
    in_axes: Any
    _options: Any

    def __init__(
        self,
        variant: str = "lora",
        rank: int = 8,
        alpha: float = 8.0,
        targets: str | Sequence[str] = "all-linear",
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
        if isinstance(layers_to_transform, int):
            layers_to_transform = (layers_to_transform,)
        if layers_to_transform is not None:
            layers_to_transform = tuple(layers_to_transform)
            if not all(isinstance(i, int) and i >= 0 for i in layers_to_transform):
                raise ValueError(f"layers_to_transform must be non-negative ints, got {layers_to_transform!r}")
        if isinstance(layers_pattern, str):
            layers_pattern = (layers_pattern,)
        if isinstance(in_axes, Mapping):
            for key, val in in_axes.items():
                if not isinstance(val, int) or val < 1:
                    raise ValueError(f"in_axes[{key!r}] must be an int >= 1, got {val!r}")
        elif isinstance(in_axes, bool) or not isinstance(in_axes, int) or in_axes < 1:
            raise ValueError(f"in_axes must be an int >= 1 or a {{regex: int}} dict, got {in_axes!r}")

        built = variant_obj.build_options(**options)

        set_ = object.__setattr__
        set_(self, "variant", variant)
        set_(self, "rank", rank)
        set_(self, "alpha", float(alpha))
        set_(self, "targets", _check_targets(targets, "targets"))
        set_(self, "exclude", _check_targets(exclude, "exclude"))
        set_(self, "layers_to_transform", layers_to_transform)
        set_(self, "layers_pattern", tuple(layers_pattern) if layers_pattern else None)
        # patterns keep their order: the first matching key wins, as in PEFT
        set_(self, "rank_pattern", tuple((str(k), v) for k, v in (rank_pattern or {}).items()))
        set_(self, "alpha_pattern", tuple((str(k), float(v)) for k, v in (alpha_pattern or {}).items()))
        set_(self, "in_axes", tuple(in_axes.items()) if isinstance(in_axes, Mapping) else in_axes)
        set_(self, "_options", built)

    @property
    def options(self) -> Any:
        """The variant's options (its `Options` dataclass; it reads like a dict too), defaults filled in."""
        return self._options

    def replace(self, **changes: Any) -> "Spec":
        """A copy with some fields or options changed (validated again)."""
        kwargs = dict(
            variant=self.variant, rank=self.rank, alpha=self.alpha, targets=self.targets,
            exclude=self.exclude, layers_to_transform=self.layers_to_transform,
            layers_pattern=self.layers_pattern, rank_pattern=dict(self.rank_pattern),
            alpha_pattern=dict(self.alpha_pattern),
            in_axes=dict(self.in_axes) if isinstance(self.in_axes, tuple) else self.in_axes,
        )
        if changes.get("variant", self.variant) == self.variant:
            kwargs.update(self.options)
        kwargs.update(changes)
        return Spec(**kwargs)
