"""lorajax: LoRA and its variants as pure functions over Flax parameter pytrees."""

from lorajax import (
    combination,
    es,
    groups,
    inits,
    loram,
    loraprune,
    lragent,
    models,
    o3,
    optim,
    peft,
    quant,
    serve,
    train,
    xlora,
)
from lorajax.adapt import adapt
from lorajax.adapters import (
    check_finite,
    combine,
    count_params,
    init,
    merge,
    partition,
    trainable_mask,
    unmerge,
    update_state,
)
from lorajax.multi_adapter import adapt_multi, stack_adapters
from lorajax.rank_tools import squeeze, truncate
from lorajax.registry import list_variants
from lorajax.selection import Selection
from lorajax.spec import Spec
from lorajax.targets import select

__all__ = [
    "Spec",
    "Selection",
    "init",
    "adapt",
    "merge",
    "unmerge",
    "select",
    "list_variants",
    "truncate",
    "squeeze",
    "stack_adapters",
    "adapt_multi",
    "partition",
    "combine",
    "trainable_mask",
    "count_params",
    "check_finite",
    "update_state",
    "combination",
    "es",
    "groups",
    "inits",
    "loram",
    "loraprune",
    "lragent",
    "models",
    "o3",
    "optim",
    "peft",
    "quant",
    "serve",
    "train",
    "xlora",
]

__version__ = "0.1.0"
