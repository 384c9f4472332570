"""Variant name -> `Variant`. A new variant is one line in `_MODULES`."""

from __future__ import annotations

import difflib
import importlib

from lorajax.variants.base import Variant

__all__ = ["get", "list_variants", "with_capability", "plain_lora"]

# name -> module under lorajax.variants that defines VARIANT
_MODULES = {
    "lora": "lora",
    "dora": "dora",
    "vera": "vera",
    "randlora": "randlora",
    "unilora": "unilora",
    "dylora": "dylora",
    "paca": "paca",
    "sora": "sora",
    "lora_xs": "lora_xs",
    "comp_lora": "comp_lora",
    "hydra": "hydra",
    "miss": "miss",
    "bone": "miss",  # alias: PEFT's removed BoneConfig is MiSS's default and "bat" modes
    "shira": "shira",
    "loldu": "loldu",
    "tera": "tera",
    "flylora": "flylora",
    "smora": "smora",
}


def list_variants() -> list[str]:
    """The registered variant names, sorted."""
    return sorted(_MODULES)


def get(name: str) -> Variant:
    """The `Variant` registered as ``name``; unknown names raise with the closest ones."""
    if name not in _MODULES:
        close = difflib.get_close_matches(str(name), list(_MODULES), n=3)
        hint = f" Did you mean {close}?" if close else ""
        raise ValueError(f"unknown variant {name!r}.{hint} Registered: {list_variants()}")
    module = importlib.import_module(f"lorajax.variants.{_MODULES[name]}")
    return module.VARIANT


def with_capability(name: str) -> tuple[str, ...]:
    """The registered variant names whose `Variant` declares ``name`` (e.g. ``"factors"``), sorted.

    Aliases of one variant are listed once, under the variant's own name.
    """
    found = {get(n).name for n in _MODULES if getattr(get(n), name, None) is not None}
    return tuple(sorted(found))


def plain_lora(variant: str, who: str) -> Variant:
    """The `Variant` named ``variant`` when its adapters are plain LoRA, ``W' = W + s·A·B``; else a ValueError.

    Plain LoRA is declared by ``Variant(factors=Factors(..., exact=True))``; tools
    built on its algebra (multi-adapter pools, ESSA, the fused kernel, the
    data-aware inits) call this instead of checking a name.
    """
    v = get(variant)
    if v.factors is None or not v.factors.exact:
        plain = tuple(sorted({w.name for w in map(get, _MODULES) if w.factors is not None and w.factors.exact}))
        raise ValueError(
            f"{who} needs plain LoRA adapters W' = W + s·A·B (the variants {plain}), got variant {variant!r}"
        )
    return v
