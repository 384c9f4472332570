"""Rank tools: cut a trained adapter down to a lower rank.

`truncate(spec, adapters, rank)` keeps the first ``b = rank`` components of a
LoRA-style adapter (``lora_A[:, :b]``, ``lora_B[:b]``) and returns the spec
that gives the rank-``b`` model with them:

* ``dylora``: the rank-``b`` model is DyLoRA evaluated at ``b``,
  ``W + (α/b) A[:, :b] B[:b]``; the new spec has ``rank=b`` and the same
  ``α`` (its scale ``α/b`` is DyLoRA's), ``eval_rank=None``.
* ``lora`` (and rsLoRA): the rank-``b`` model is the sum of the first ``b``
  rank-one terms of the trained update with its scale unchanged,
  ``W + s A[:, :b] B[:b]`` with ``s = α/r`` (``α/√r``); the new spec has
  ``rank=b`` and ``α' = α·b/r`` (``α·√(b/r)``), so that ``α'/b = α/r``. Where
  targets end up with different ``α'`` (rank or alpha patterns), ``α'`` is
  written per target into ``alpha_pattern``.

The slices are the adapter's own leading components, as DyLoRA orders them;
for a plain LoRA they are not the best rank-``b`` approximation (use an SVD
for that).

Example:
  >>> import jax, jax.numpy as jnp, lorajax
  >>> from lorajax.rank_tools import truncate
  >>> params = {"q": {"kernel": jnp.ones((6, 4))}}
  >>> spec = lorajax.Spec("lora", rank=4, alpha=8, targets=["q"])
  >>> spec2, small = truncate(spec, lorajax.init(spec, params, jax.random.key(0)), 2)
  >>> spec2.rank, spec2.alpha, small["q"]["kernel"]["lora_A"].shape
  (2, 4.0, (6, 2))
"""

from __future__ import annotations

import math
import re
from typing import Any

from lorajax import targets
from lorajax.adapters import _adapter_paths
from lorajax.spec import Spec
from lorajax.variants.base import SHARED_KEY

__all__ = ["truncate", "TRUNCATABLE"]

#: Variants whose adapters are ``{"lora_A": [in, r], "lora_B": [r, out]}`` with nested ranks.
TRUNCATABLE = ("lora", "dylora")


def _nest_like(adapters: dict, new: dict[tuple, dict]) -> dict:
    """``adapters`` with the adapter dict at each path in ``new`` replaced."""

    def walk(node: Any, prefix: tuple) -> Any:
        if prefix in new:
            return new[prefix]
        if prefix == ():
            return {k: (v if k == SHARED_KEY else walk(v, (str(k),))) for k, v in node.items()}
        return {k: walk(v, prefix + (str(k),)) for k, v in node.items()}

    return walk(adapters, ())


def truncate(spec: Spec, adapters: dict, rank: int) -> tuple[Spec, dict]:
    """``(spec', adapters')``: every adapter cut to its first ``rank`` components.

    Args:
      spec: the `Spec` the adapters were made with (variant ``lora`` or ``dylora``).
      adapters: the adapters tree (`lorajax.init` layout).
      rank: the new rank ``b``, ``1 <= b <=`` every target's rank.

    Returns:
      The new spec (``rank=b``, no ``rank_pattern``, alpha set as described in
      the module docstring) and a new adapters tree; nothing is mutated.

    Raises:
      ValueError: another variant, a bad ``rank``, or ``rank`` larger than the
        rank of the adapter at some path (named).
    """
    if spec.variant not in TRUNCATABLE:
        raise ValueError(f"truncate supports the variants {TRUNCATABLE}, got {spec.variant!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    index = _adapter_paths(adapters)
    if not index:
        raise ValueError("truncate: the adapters tree holds no adapter")
    rslora = spec.variant == "lora" and spec.options.get("use_rslora", False)
    new: dict[tuple, dict] = {}
    new_alpha: dict[str, float] = {}
    for keys, adapter in index.items():
        path = "/".join(keys)
        if set(adapter) != {"lora_A", "lora_B"}:
            raise ValueError(f"truncate: adapter at {path} has entries {sorted(adapter)}, expected lora_A and lora_B")
        a, b = adapter["lora_A"], adapter["lora_B"]
        r = a.shape[-1]
        if a.ndim != 2 or b.ndim != 2 or b.shape[0] != r:
            raise ValueError(f"truncate: adapter at {path} has lora_A {a.shape} and lora_B {b.shape}; "
                             "expected [in, r] and [r, out]")
        if rank > r:
            raise ValueError(f"truncate: rank {rank} is larger than the rank {r} of the adapter at {path}")
        new[keys] = {"lora_A": a[:, :rank], "lora_B": b[:rank]}
        if spec.variant == "lora":
            name = targets.module_name(keys)
            alpha = float(targets._pattern_value(spec.alpha_pattern, name, spec.alpha))
            ratio = math.sqrt(rank / r) if rslora else rank / r
            new_alpha[name] = alpha * ratio

    if spec.variant == "dylora":
        spec2 = spec.replace(rank=rank, rank_pattern={}, eval_rank=None)
    else:
        values = set(new_alpha.values())
        if len(values) == 1:
            spec2 = spec.replace(rank=rank, rank_pattern={}, alpha=values.pop(), alpha_pattern={})
        else:
            # most specific names first: a pattern key also matches names that end with ".<key>"
            pattern = {re.escape(n): new_alpha[n] for n in sorted(new_alpha, key=lambda n: (-len(n), n))}
            ratio = math.sqrt(rank / spec.rank) if rslora else rank / spec.rank
            spec2 = spec.replace(rank=rank, rank_pattern={}, alpha=spec.alpha * ratio,
                                 alpha_pattern=pattern)
    return spec2, _nest_like(adapters, new)
