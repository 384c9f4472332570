"""Target resolution: a Spec's `Selection` plus its per-target rank, alpha and options.

`select(spec, params)` resolves ``spec.selection`` (`lorajax.selection`) on
``params`` and attaches to each selected weight its rank and alpha (from
``rank_pattern`` / ``alpha_pattern``) and the variant's options, giving the
`Target`s that `init`, `merge`, the factored mode, optimiser masks and
checkpoint filtering all use, so they always agree on which weights are
adapted.

Works on any pytree whose leaves are arrays: linen ``params`` or
``variables`` dicts (only the ``params`` collection is searched), FrozenDicts,
and NNX ``State`` (``nnx.split``; the trailing ``.value`` is dropped).
"""

from __future__ import annotations

from typing import Any

from lorajax import paths, registry
from lorajax.paths import key_names, module_name
from lorajax.selection import layer_index, pattern_value, weight_leaves
from lorajax.variants.base import Target

__all__ = ["select", "key_names", "weight_leaves", "module_name", "pattern_value", "layer_index"]

WEIGHT_NAMES = paths.WEIGHT_NAMES  # kernels; `lorajax.selection.EMBEDDING_NAMES` for embedding tables


def select(spec: Any, params: Any, variant: Any = None) -> list[Target]:
    """The weights of ``params`` that ``spec`` adapts, in pytree order, as `Target`s.

    ``variant``: the spec's `Variant` when the caller has looked it up already.

    Raises:
      ValueError: see `lorajax.selection.Selection.resolve`; and a rank larger
        than ``min(in, out)`` for variants whose rank is limited.
    """
    variant = registry.get(spec.variant) if variant is None else variant
    options = spec.options
    selected = []
    for w in spec.selection.resolve(params):
        rank = pattern_value(spec.rank_pattern, w.name, spec.rank)
        alpha = float(pattern_value(spec.alpha_pattern, w.name, spec.alpha))
        t = Target(keys=w.keys, name=w.name, shape=w.shape, in_axes=w.in_axes, rank=rank, alpha=alpha, options=options)
        if variant.rank_limited and rank > min(t.matrix_shape):
            raise ValueError(
                f"rank {rank} is larger than min(in, out) = {min(t.matrix_shape)} for {w.name!r} "
                f"(kernel {w.shape} viewed as {t.matrix_shape}); lower the rank or set rank_pattern"
            )
        selected.append(t)
    return selected
