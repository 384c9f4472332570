"""The resolved plan of one adapted call: the documented internal API between lorajax's modules.

`make_plan(spec, params, adapters)` looks the variant up once, selects the
targets once, and checks that ``adapters`` fits ``params``; `adapt`, `merge`,
`update_state`, multi-adapter serving, ESSA and the PEFT format all work from
the `Plan` it returns instead of repeating those steps.

Adapters trees are nested dicts mirroring the targeted paths (see
`lorajax.adapters`); `adapter_paths` flattens one to ``{target keys: adapter
dict}`` and `nest` builds one back.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lorajax import paths, registry, targets
from lorajax.variants.base import SHARED_KEY, Target, Variant

__all__ = ["Plan", "make_plan", "adapter_paths", "nest"]


@dataclasses.dataclass(frozen=True)
class Plan:
    """What an adapted call needs, resolved once.

    Attributes:
      variant: the spec's `Variant` (one registry lookup).
      targets: the selected `Target`s, in pytree order (one selection).
      adapters: ``{target keys: adapter dict}``, keyed like ``targets``' keys
        (a tree made for bare params also fits a variables dict, and back).
      shared: the model-level state ``adapters["_shared"]`` (``{}`` if none).
    """

    variant: Variant
    targets: list[Target]
    adapters: dict[tuple, dict]
    shared: dict

    def adapter(self, t: Target) -> dict:
        """Target ``t``'s adapter with the shared state merged in (what the variant's functions take)."""
        return {**self.adapters[t.keys], **self.shared}


def nest(flat: dict[tuple, Any]) -> dict:
    """``{(k1, k2, ...): value}`` as nested dicts."""
    out: dict = {}
    for keys, value in flat.items():
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return out


def adapter_paths(adapters: Any) -> dict[tuple, dict]:
    """``{target keys: adapter dict}`` from an adapters tree (without ``_shared``)."""
    if not isinstance(adapters, dict):
        raise TypeError(f"adapters must be the dict returned by lorajax.init, got {type(adapters).__name__}")
    out: dict[tuple, dict] = {}

    def walk(node: Any, prefix: tuple) -> None:
        if isinstance(node, dict) and node and all(not isinstance(v, dict) for v in node.values()):
            out[prefix] = node
            return
        if not isinstance(node, dict):
            where = "/".join(prefix) or "<root>"
            raise ValueError(f"adapters tree: expected a dict at {where}, got {type(node).__name__}")
        for k, v in node.items():
            if prefix == () and k == SHARED_KEY:
                continue
            walk(v, prefix + (str(k),))

    walk(adapters, ())
    return out


def make_plan(spec: Any, params: Any, adapters: Any, variant: Variant | None = None) -> Plan:
    """Resolve ``spec`` on ``params`` and check that ``adapters`` fits.

    ``variant`` (the spec's, already looked up) saves the registry lookup.

    Raises:
      ValueError: naming the first path that is missing or extra, or missing shared state.
    """
    variant = registry.get(spec.variant) if variant is None else variant
    selected = targets.select(spec, params, variant)
    index = adapter_paths(adapters)
    # adapters made for bare params work with the variables dict {"params": params}, and vice versa
    wrapped = paths.is_variables(params)
    if index and wrapped and not all(k[0] == "params" for k in index):
        index = {("params",) + k: v for k, v in index.items()}
    elif index and not wrapped and all(k[0] == "params" for k in index):
        index = {k[1:]: v for k, v in index.items()}
    want = [t.keys for t in selected]
    for keys in want:
        if keys not in index:
            raise ValueError(
                f"adapters do not match params: no adapter for {'/'.join(keys)} "
                f"(adapters has {['/'.join(k) for k in list(index)[:5]]}...)"
            )
    extra = [k for k in index if k not in set(want)]
    if extra:
        raise ValueError(
            f"adapters do not match params: adapter at {'/'.join(extra[0])} has no targeted weight in params"
        )
    shared = adapters.get(SHARED_KEY, {}) if variant.init_shared is not None else {}
    if variant.init_shared is not None and not shared:
        raise ValueError(f"adapters for variant {spec.variant!r} lack the shared state adapters[{SHARED_KEY!r}]")
    return Plan(variant=variant, targets=selected, adapters=index, shared=shared)
