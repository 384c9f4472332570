"""Shared plumbing for initialisers that also change the base weight."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from lorajax import adapters as adapters_lib
from lorajax import registry, targets
from lorajax.plan import nest
from lorajax.spec import Spec
from lorajax.variants import lora


def init_with_residual(spec: Spec, params: Any, make: Callable, what: str) -> tuple[dict, Any]:
    """Run ``make(w_f32: [in, out], t) -> (adapter, w_res)`` on every target.

    Returns ``(adapters, new_params)``; ``params`` itself is not changed.
    """
    registry.plain_lora(spec.variant, what)
    selected = targets.select(spec, params)
    weights = dict(targets.weight_leaves(params))
    flat, residual = {}, {}
    for t in selected:
        w = jnp.asarray(weights[t.keys])
        if w.dtype not in (jnp.float32, jnp.float16, jnp.bfloat16):
            raise TypeError(f"{what} needs a float32/float16/bfloat16 weight; {t.name} is {w.dtype}")
        adapter, w_res = make(adapters_lib.as_matrix(w, t).astype(jnp.float32), t)
        dtype = lora.adapter_dtype(t, w)
        flat[t.keys] = {k: v.astype(dtype) for k, v in adapter.items()}
        residual[t.keys] = w_res.reshape(w.shape).astype(w.dtype)

    def swap(path, leaf):
        return residual.get(targets.key_names(path), leaf)

    return nest(flat), jax.tree_util.tree_map_with_path(swap, params)
