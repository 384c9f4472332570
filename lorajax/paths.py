"""Names of pytree paths: the one place that turns jax key paths into strings.

* `key_names(path)`: ``("params", "layers_0", "q", "kernel")`` (NNX's trailing
  ``value`` dropped); the adapters tree is keyed by these.
* `module_name(keys)`: ``"layers_0.q"``, the name targets are matched against
  (collection ``params`` and the leaf name dropped).
* `dict_path(path)`: ``"layers_0.q.kernel"``, the name partition rules match
  (only dict keys: the attribute and index keys of optax states are skipped).
* `entry_name(path)`: the last key, an adapter entry such as ``"lora_A"``.
* `weight_leaves(params)`: every candidate weight, a ``kernel`` with >= 2 axes.
* `is_quantized(x)`: a quantised kernel (`lorajax.quant.QuantizedArray`), one weight rather than a
  subtree of codes and scales (pass it as ``is_leaf`` when walking params).
"""

from __future__ import annotations

from typing import Any

import jax

__all__ = [
    "key_name",
    "key_names",
    "module_name",
    "dict_path",
    "entry_name",
    "is_variables",
    "weight_leaves",
    "is_quantized",
    "WEIGHT_NAMES",
]

#: Leaf names of the weights lorajax can adapt.
WEIGHT_NAMES = ("kernel",)


def key_name(k: Any) -> str:
    """One key of a jax key path as a string (dict key, attribute name or sequence index)."""
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def key_names(path: tuple) -> tuple[str, ...]:
    """String names of a jax key path, without NNX's trailing ``value``."""
    names = tuple(key_name(k) for k in path)
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and names[-1] == "value":
        names = names[:-1]
    return names


def module_name(keys: tuple[str, ...]) -> str:
    """Dotted module name of a weight path: drops ``params`` and the leaf name."""
    body = keys[1:] if keys and keys[0] == "params" else keys
    return ".".join(body[:-1])


def dict_path(path: tuple) -> str:
    """Dotted dict path of a leaf (attribute and sequence keys of optax states skipped, no ``params``)."""
    names = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
    if names and names[0] == "params":
        names = names[1:]
    return ".".join(names)


def entry_name(path: tuple) -> str:
    """The last key of a path as a string (an adapter entry name such as ``lora_A``)."""
    return key_name(path[-1]) if path else ""


def is_variables(params: Any) -> bool:
    """True for a Flax variables dict (``{"params": {...}, ...}``) rather than bare params."""
    try:
        return "params" in params and not hasattr(params["params"], "shape")
    except TypeError:
        return False


def is_quantized(x: Any) -> bool:
    """True for a quantised kernel (`lorajax.quant.QuantizedArray`; marked by its class, so no import cycle)."""
    return getattr(type(x), "lorajax_quantized", False) is True


def weight_leaves(params: Any) -> list[tuple[tuple[str, ...], Any]]:
    """``[(keys, array)]`` for every candidate weight (a ``kernel`` with >= 2 axes; a quantised kernel is one)."""
    only_params = is_variables(params)
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)[0]:
        keys = key_names(path)
        if only_params and keys[0] != "params":
            continue
        if keys and keys[-1] in WEIGHT_NAMES and getattr(leaf, "ndim", 0) >= 2:
            out.append((keys, leaf))
    return out
