"""Path matching over parameter pytrees: the one selector used everywhere.

`select(spec, params)` turns a Spec's selection rules into the list of
`Target`s (path, module name, shape, resolved rank/alpha). `init`, `merge`,
the factored mode, optimiser masks and checkpoint filtering all call it, so
they always agree on which weights are adapted.

Works on any pytree whose leaves are arrays: linen ``params`` or
``variables`` dicts (only the ``params`` collection is searched), FrozenDicts,
and NNX ``State`` (``nnx.split``; the trailing ``.value`` is dropped).
"""

from __future__ import annotations

import difflib
import re
from typing import Any

import jax

from lorajax import registry
from lorajax.spec import HEAD_NAMES, Spec
from lorajax.variants.base import Target

__all__ = ["select", "key_names", "weight_leaves", "module_name", "pattern_value", "layer_index"]

WEIGHT_NAMES = ("kernel",)


def _key_name(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def key_names(path: tuple) -> tuple[str, ...]:
    """String names of a jax key path, without NNX's trailing ``value``."""
    names = tuple(_key_name(k) for k in path)
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and names[-1] == "value":
        names = names[:-1]
    return names


def module_name(keys: tuple[str, ...]) -> str:
    """Dotted module name of a weight path: drops ``params`` and the leaf name."""
    body = keys[1:] if keys and keys[0] == "params" else keys
    return ".".join(body[:-1])


def _is_variables(params: Any) -> bool:
    try:
        return "params" in params and not hasattr(params["params"], "shape")
    except TypeError:
        return False


def weight_leaves(params: Any) -> list[tuple[tuple[str, ...], Any]]:
    """``[(keys, array)]`` for every candidate weight (a ``kernel`` with >= 2 axes)."""
    only_params = _is_variables(params)
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = key_names(path)
        if only_params and keys[0] != "params":
            continue
        if keys and keys[-1] in WEIGHT_NAMES and getattr(leaf, "ndim", 0) >= 2:
            out.append((keys, leaf))
    return out


def _suffix_match(name: str, entry: str) -> bool:
    return name == entry or name.endswith("." + entry)


def _matches(rule: Any, name: str, ndim: int) -> bool:
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


def select(spec: Spec, params: Any, variant: Any = None) -> list[Target]:
    """The weights of ``params`` that ``spec`` adapts, in pytree order.

    Raises:
      ValueError: a target entry (or the regex) matches nothing, naming the
        closest module names; a rank larger than ``min(in, out)``; an
        ``in_axes`` that does not fit a kernel.
    """
    variant = registry.get(spec.variant) if variant is None else variant
    leaves = weight_leaves(params)
    names = [module_name(keys) for keys, _ in leaves]
    if not leaves:
        raise ValueError("no weights found: expected leaves named 'kernel' with >= 2 axes in the params tree")
    if isinstance(spec.targets, tuple):
        for entry in spec.targets:
            if not any(_suffix_match(n, entry) for n in names):
                raise _no_match_error(entry, names)
    options = spec.options
    selected = []
    for (keys, leaf), name in zip(leaves, names):
        if not _matches(spec.targets, name, leaf.ndim):
            continue
        if spec.exclude is not None and _matches(spec.exclude, name, leaf.ndim):
            continue
        if spec.layers_to_transform is not None:
            idx = layer_index(name, spec.layers_pattern)
            if idx is None or idx not in spec.layers_to_transform:
                continue
        rank = pattern_value(spec.rank_pattern, name, spec.rank)
        alpha = float(pattern_value(spec.alpha_pattern, name, spec.alpha))
        in_axes = spec.in_axes if isinstance(spec.in_axes, int) else pattern_value(spec.in_axes, name, 1)
        if in_axes >= leaf.ndim:
            raise ValueError(
                f"in_axes={in_axes} leaves no output axis for {name!r} with kernel shape {tuple(leaf.shape)}"
            )
        t = Target(keys=keys, name=name, shape=tuple(leaf.shape), in_axes=in_axes,
                   rank=rank, alpha=alpha, options=options)
        if variant.rank_limited and rank > min(t.matrix_shape):
            raise ValueError(
                f"rank {rank} is larger than min(in, out) = {min(t.matrix_shape)} for {name!r} "
                f"(kernel {tuple(leaf.shape)} viewed as {t.matrix_shape}); lower the rank or set rank_pattern"
            )
        selected.append(t)
    if not selected:
        what = spec.targets if isinstance(spec.targets, str) else list(spec.targets)
        raise ValueError(
            f"targets={what!r} with exclude={spec.exclude!r}, layers_to_transform={spec.layers_to_transform!r} "
            f"selects no weight. Weights found: {names[:12]}"
        )
    return selected
