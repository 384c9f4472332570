"""`Selection`: which weights of a params tree are adapted, and how an N-D kernel is viewed as a matrix.

A `Selection` is the part of a `lorajax.Spec` that picks weights, split out so
that tools which select weights without adapting them (GaLore, partition
rules) use the same grammar and the same resolver. Its rules follow PEFT's
``LoraConfig``, applied to module names made by joining a Flax parameter path
with dots (the collection ``params`` and the leaf name ``kernel`` are dropped),
e.g. ``encoder.layers_0.attention.query`` for linen or ``layers.0.q_proj``
for NNX:

* ``targets``: a list of module-name suffixes (``["q_proj", "v_proj"]``: a
  name matches if it equals the suffix or ends with ``"." + suffix``), a regex
  string (``re.fullmatch`` against the whole name), or ``"all-linear"`` (every
  2-D kernel except the output head, see `HEAD_NAMES`). Embedding tables
  (``nn.Embed``'s ``embedding`` leaf, see `EMBEDDING_NAMES`) are picked only by
  a list entry naming their module (``["embed_tokens"]``), never by a regex or
  ``"all-linear"`` (as PEFT's ``"all-linear"``, which takes linear layers only).
* ``exclude``: the same grammar, removing names from the selection.
* ``layers_to_transform`` / ``layers_pattern``: keep only layers with these
  indices; the index is read from ``<pattern>.<i>.`` or ``<pattern>_<i>.``.
* ``in_axes``: for kernels with more than two axes (DenseGeneral / Einsum),
  how many leading axes are inputs; an int or ``{regex: int}`` (default 1).
  An ``nn.Conv`` kernel ``[*kernel_size, in, out]`` takes ``ndim - 1`` (LoRA's
  ``[prod(kernel_size)·in, out]`` view; `lorajax.layer_kinds.conv_in_axes`
  finds them from the model).

`Selection.resolve(params)` gives the selected `Weight`s in pytree order.

Example:
  >>> import jax.numpy as jnp
  >>> from lorajax.selection import Selection
  >>> params = {"q": {"kernel": jnp.ones((4, 4))}, "v": {"kernel": jnp.ones((4, 2))}}
  >>> [w.name for w in Selection(["v"]).resolve(params)]
  ['v']
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from typing import Any, Mapping, NamedTuple, Sequence

import jax

from lorajax import paths
from lorajax.paths import module_name

__all__ = [
    "Selection",
    "Weight",
    "HEAD_NAMES",
    "EMBEDDING_NAMES",
    "is_embedding",
    "weight_leaves",
    "pattern_value",
    "layer_index",
    "check_targets",
    "matches",
]

#: Last name components treated as the output head by ``targets="all-linear"``.
HEAD_NAMES = ("lm_head", "embed_out", "classifier", "score", "head")

#: Leaf names of embedding tables ``[num_embeddings, features]`` (linen/NNX ``Embed``): candidate weights that
#: only a ``targets`` list selects.
EMBEDDING_NAMES = ("embedding",)


def is_embedding(keys: tuple) -> bool:
    """True when the weight at path ``keys`` is an embedding table (its leaf name is in `EMBEDDING_NAMES`)."""
    return bool(keys) and keys[-1] in EMBEDDING_NAMES


def weight_leaves(params: Any) -> list[tuple[tuple[str, ...], Any]]:
    """``[(keys, array)]`` of every candidate weight in pytree order: `lorajax.paths.weight_leaves`' kernels
    and the 2-D embedding tables."""
    kernels = paths.weight_leaves(params)
    only_params = paths.is_variables(params)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    keyed = [paths.key_names(path) for path, _ in flat]
    embeds = [
        (keys, leaf)
        for keys, (_, leaf) in zip(keyed, flat)
        if is_embedding(keys) and getattr(leaf, "ndim", 0) == 2 and (not only_params or keys[0] == "params")
    ]
    if not embeds:
        return kernels
    order: dict[tuple, int] = {}  # a weight's position: its first leaf (a quantised kernel is a subtree)
    for i, keys in enumerate(keyed):
        for j in range(1, len(keys) + 1):
            order.setdefault(keys[:j], i)
    return sorted(kernels + embeds, key=lambda kv: order.get(kv[0], len(flat)))


class Weight(NamedTuple):
    """One selected weight: its path (string keys), dotted module name, shape and input axes."""

    keys: tuple
    name: str
    shape: tuple
    in_axes: int

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """``(in, out)`` of the weight viewed as a matrix."""
        return (math.prod(self.shape[: self.in_axes]), math.prod(self.shape[self.in_axes :]))


def check_targets(value: Any, what: str) -> Any:
    """A target rule (``None``, ``"all-linear"``, a regex string or a list of module-name suffixes), checked and
    normalised (a list -> tuple; a set -> sorted tuple); ``what`` names the argument in the errors."""
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
class Selection:
    """Which weights to adapt (see the module docstring for the grammar); frozen and hashable.

    Raises ValueError / TypeError at construction naming the bad field.
    """

    targets: Any
    exclude: Any
    layers_to_transform: Any
    layers_pattern: Any
    in_axes: Any

    def __init__(
        self,
        targets: str | Sequence[str] = "all-linear",
        *,
        exclude: str | Sequence[str] | None = None,
        layers_to_transform: int | Sequence[int] | None = None,
        layers_pattern: str | Sequence[str] | None = None,
        in_axes: int | Mapping[str, int] | tuple = 1,
    ):
        if isinstance(layers_to_transform, bool):
            raise ValueError(f"layers_to_transform must be non-negative ints, got {layers_to_transform!r}")
        if isinstance(layers_to_transform, int):
            layers_to_transform = (layers_to_transform,)
        if layers_to_transform is not None:
            layers_to_transform = tuple(layers_to_transform)
            if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers_to_transform):
                raise ValueError(f"layers_to_transform must be non-negative ints, got {layers_to_transform!r}")
        if isinstance(layers_pattern, str):
            layers_pattern = (layers_pattern,)
        if isinstance(in_axes, tuple):  # the frozen {regex: int} form
            in_axes = dict(in_axes)
        if isinstance(in_axes, Mapping):
            for key, val in in_axes.items():
                if not isinstance(val, int) or val < 1:
                    raise ValueError(f"in_axes[{key!r}] must be an int >= 1, got {val!r}")
        elif isinstance(in_axes, bool) or not isinstance(in_axes, int) or in_axes < 1:
            raise ValueError(f"in_axes must be an int >= 1 or a {{regex: int}} dict, got {in_axes!r}")
        set_ = object.__setattr__
        set_(self, "targets", check_targets(targets, "targets"))
        set_(self, "exclude", check_targets(exclude, "exclude"))
        set_(self, "layers_to_transform", layers_to_transform)
        set_(self, "layers_pattern", tuple(layers_pattern) if layers_pattern else None)
        set_(self, "in_axes", tuple(in_axes.items()) if isinstance(in_axes, Mapping) else in_axes)

    def keywords(self) -> dict[str, Any]:
        """The constructor keywords that rebuild this selection (``Selection(**sel.keywords())``)."""
        return dict(
            targets=self.targets,
            exclude=self.exclude,
            layers_to_transform=self.layers_to_transform,
            layers_pattern=self.layers_pattern,
            in_axes=dict(self.in_axes) if isinstance(self.in_axes, tuple) else self.in_axes,
        )

    def in_axes_of(self, name: str) -> int:
        """The number of input axes of the module ``name``."""
        return self.in_axes if isinstance(self.in_axes, int) else pattern_value(self.in_axes, name, 1)

    def resolve(self, params: Any) -> list[Weight]:
        """The selected weights of ``params``, in pytree order.

        Raises:
          ValueError: no candidate weight; a target entry (or the regex) that
            matches nothing, naming the closest module names; an ``in_axes``
            that leaves no output axis; a selection that selects nothing.
        """
        leaves = weight_leaves(params)
        names = [module_name(keys) for keys, _ in leaves]
        if not leaves:
            raise ValueError(
                "no weights found: expected leaves named 'kernel' with >= 2 axes (or 2-D 'embedding' tables) in the "
                "params tree"
            )
        if isinstance(self.targets, tuple):
            for entry in self.targets:
                if not any(_suffix_match(n, entry) for n in names):
                    raise _no_match_error(entry, names)
        selected = []
        for (keys, leaf), name in zip(leaves, names):
            embedding = is_embedding(keys)
            if not matches(self.targets, name, leaf.ndim, embedding):
                continue
            if self.exclude is not None and matches(self.exclude, name, leaf.ndim, embedding):
                continue
            if self.layers_to_transform is not None:
                idx = layer_index(name, self.layers_pattern)
                if idx is None or idx not in self.layers_to_transform:
                    continue
            in_axes = self.in_axes_of(name)
            if in_axes >= leaf.ndim:
                raise ValueError(
                    f"in_axes={in_axes} leaves no output axis for {name!r} with kernel shape {tuple(leaf.shape)}"
                )
            selected.append(Weight(keys, name, tuple(leaf.shape), in_axes))
        if not selected:
            what = self.targets if isinstance(self.targets, str) else list(self.targets)
            tables = [n for (keys, _), n in zip(leaves, names) if is_embedding(keys)]
            hint = (
                f" Embedding tables ({tables[:3]}) are selected only by a targets list naming them."
                if tables and isinstance(self.targets, str)
                else ""
            )
            raise ValueError(
                f"targets={what!r} with exclude={self.exclude!r}, layers_to_transform={self.layers_to_transform!r} "
                f"selects no weight. Weights found: {names[:12]}.{hint}"
            )
        return selected


def _suffix_match(name: str, entry: str) -> bool:
    return name == entry or name.endswith("." + entry)


def matches(rule: Any, name: str, ndim: int, embedding: bool = False) -> bool:
    """Whether a checked target rule (`check_targets`) picks the weight of module ``name`` (dotted) with ``ndim``
    axes; an embedding table (``embedding``) only by a list entry naming it."""
    if isinstance(rule, str) and embedding:  # a table is picked only by a list entry naming it
        return False
    if rule == "all-linear":
        return ndim == 2 and name.split(".")[-1] not in HEAD_NAMES
    if isinstance(rule, str):
        return re.fullmatch(rule, name) is not None
    return any(_suffix_match(name, e) for e in rule)


def pattern_value(pattern: tuple, name: str, default: Any) -> Any:
    """PEFT's rule: the first key with ``re.match(rf"(.*\\.)?({key})$", name)``."""
    for key, value in pattern:
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def layer_index(name: str, patterns: tuple | None) -> int | None:
    """The layer index in a module name: ``layers.3.x`` or ``layers_3.x`` -> 3.

    With ``patterns`` only ``<pattern>.<i>`` / ``<pattern>_<i>`` count. Without,
    PEFT's rule: the first numbered component with at least two components
    before it (``model.layers.3.q`` -> 3, but ``layers.3.q`` -> None); linen's
    ``<name>_<i>`` components also count.
    """
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if patterns is None:
            if part.isdigit() and i >= 2:
                return int(part)
            m = re.fullmatch(r".+_(\d+)", part)
            if m:
                return int(m.group(1))
        else:
            for p in patterns:
                if part == p and parts[i + 1].isdigit():
                    return int(parts[i + 1])
                m = re.fullmatch(rf"{p}_(\d+)", part)
                if m:
                    return int(m.group(1))
    return None


def _no_match_error(entry: str, names: list[str]) -> ValueError:
    lasts = sorted({n.split(".")[-1] for n in names})
    close = difflib.get_close_matches(entry, lasts, n=3) or difflib.get_close_matches(entry, names, n=3)
    hint = f" Closest: {close}." if close else ""
    shown = names[:12] + (["..."] if len(names) > 12 else [])
    return ValueError(f"target {entry!r} matches no weight.{hint} Weights found: {shown}")
