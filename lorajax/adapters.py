"""Generic operations on adapter pytrees: init, merge, unmerge, partition, counting.

An adapters tree mirrors the targeted paths of ``params``: for a weight at
``params["layers_0"]["q"]["kernel"]`` the adapter (a dict of arrays, e.g.
``{"lora_A", "lora_B"}``) sits at ``adapters["layers_0"]["q"]["kernel"]``
(with a leading ``"params"`` when ``params`` is a Flax variables dict).
Model-level state shared by all targets (VeRA's projections) sits under
``adapters["_shared"]``. Keys are strings, also for NNX list indices.
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorajax import paths, registry, targets
from lorajax import plan as plan_lib
from lorajax.spec import Spec
from lorajax.variants.base import EVAL, SHARED_KEY, Context, Target, Variant

__all__ = [
    "init",
    "merge",
    "unmerge",
    "partition",
    "combine",
    "trainable_mask",
    "count_params",
    "check_finite",
    "resolve",
    "target_key",
    "update_state",
]


def target_key(key: jax.Array, t: Target) -> jax.Array:
    """Per-target PRNG key ``fold_in(key, crc32(path))``: adding a target changes no other.

    The path leaves out the ``params`` collection name, so bare params and a
    variables dict give the same adapters.
    """
    keys = t.keys[1:] if t.keys[0] == "params" else t.keys
    return jax.random.fold_in(key, zlib.crc32(".".join(keys).encode()) & 0x7FFFFFFF)


def as_matrix(w: jax.Array, t: Target) -> jax.Array:
    """View an N-D kernel as ``[prod(in axes), prod(out axes)]``."""
    return w.reshape(t.matrix_shape)


#: internal names kept for modules not yet moved to `lorajax.plan`
_nest = plan_lib.nest
_adapter_paths = plan_lib.adapter_paths


def _as_key(key: Any) -> jax.Array:
    if isinstance(key, (int, np.integer)):
        return jax.random.key(int(key))
    if not isinstance(key, jax.Array):
        raise TypeError(f"key must be a jax PRNG key or an int seed, got {type(key).__name__}")
    return key


def init(spec: Spec, params: Any, key: jax.Array | int) -> dict:
    """Initialise adapters for every weight ``spec`` selects in ``params``.

    Args:
      spec: the `Spec`.
      params: linen params / variables dict, or an NNX ``State``.
      key: a PRNG key (or int seed). Target keys are ``fold_in(key, crc32(path))``.

    Returns:
      The adapters tree (nested dicts mirroring the targeted paths).
    """
    key = _as_key(key)
    variant = registry.get(spec.variant)
    selected = targets.select(spec, params)
    weights = dict(targets.weight_leaves(params))
    flat = {}
    for t in selected:
        w = as_matrix(jnp.asarray(weights[t.keys]), t)
        flat[t.keys] = variant.init(target_key(key, t), w, t)
    tree = _nest(flat)
    if variant.init_shared is not None:
        tree[SHARED_KEY] = variant.init_shared(jax.random.fold_in(key, 0x5EED), selected)
    return tree


def resolve(spec: Spec, params: Any, adapters: Any) -> tuple[list[Target], dict, dict]:
    """``(targets, {keys: adapter}, shared)`` of `lorajax.plan.make_plan` (kept for existing callers)."""
    p = plan_lib.make_plan(spec, params, adapters)
    return p.targets, p.adapters, p.shared


def call_variant(variant: Variant, fn: Any, *args: Any, ctx: Context | None = None) -> Any:
    """Call a variant function with the context ``ctx`` (default: evaluation)."""
    return fn(*args, EVAL if ctx is None else ctx)


def target_context(t: Target, rng: jax.Array | None, train: bool, sink: Any = None) -> Context:
    """The `Context` of one target: its own key folded from ``rng``, and ``rng`` itself as the step key."""
    return Context(rng=None if rng is None else target_key(rng, t), step_rng=rng, train=train, sink=sink)


def _map_weights(
    spec: Spec,
    params: Any,
    adapters: Any,
    fn_name: str,
    *,
    rng: jax.Array | None = None,
    train: bool = False,
    variant: Variant | None = None,
    dequantize: bool = False,
) -> Any:
    plan = plan_lib.make_plan(spec, params, adapters, variant)
    variant = plan.variant
    fn = getattr(variant, fn_name)
    if fn is None and fn_name == "adapted":
        raise ValueError(
            f"variant {spec.variant!r} is input-dependent and cannot be merged: use lorajax.adapt(..., mode='factored')"
        )
    if fn is None:
        raise NotImplementedError(
            f"variant {spec.variant!r} has no inverse: keep the original params instead of unmerging"
        )
    by_keys = {t.keys: t for t in plan.targets}

    def one(path, w):
        keys = targets.key_names(path)
        t = by_keys.get(keys)
        if t is None:
            return w
        if paths.is_quantized(w):
            if not dequantize:
                raise ValueError(
                    f"weight {'/'.join(keys)} is quantised ({w.kind}): {fn_name!r} needs float weights; merge into "
                    "its dequantised values with lorajax.merge(..., dequantize=True) or lorajax.quant.dequantize("
                    "params) first, or keep the quantised base and use lorajax.adapt(..., mode='factored')"
                )
            w = w.dequantize()
        ctx = target_context(t, rng, train) if (rng is not None or train) else EVAL
        try:
            out = call_variant(variant, fn, as_matrix(w, t), plan.adapter(t), t, ctx=ctx)
        except (TypeError, ValueError) as e:
            raise ValueError(f"adapter at {'/'.join(keys)} does not fit weight {tuple(w.shape)}: {e}") from e
        if out.shape != t.matrix_shape:
            raise ValueError(f"adapter at {'/'.join(keys)} gives shape {out.shape}, weight is {t.matrix_shape}")
        return out.reshape(w.shape)

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=paths.is_quantized)


def merge(
    spec: Spec,
    params: Any,
    adapters: Any,
    *,
    rng: jax.Array | None = None,
    train: bool = False,
    variant: Variant | None = None,
    dequantize: bool = False,
) -> Any:
    """``params`` with every targeted weight replaced by its adapted weight ``W'``.

    Returns a new tree of the same type (dict, FrozenDict, NNX State); nothing is mutated.
    ``rng`` / ``train`` reach variants that use them (e.g. DyLoRA's sampled rank);
    the default is evaluation. Input-dependent variants cannot be merged (raises).
    ``variant``: the spec's `Variant` when the caller has looked it up already.
    A quantised target (`lorajax.quant`) raises unless ``dequantize=True``, which
    merges into its dequantised kernel (``W_deq + ΔW`` in the kernel's float dtype).
    """
    return _map_weights(spec, params, adapters, "adapted", rng=rng, train=train, variant=variant, dequantize=dequantize)


def update_state(spec: Spec, params: Any, adapters: Any, aux: Any) -> Any:
    """New adapters with the non-trained state refreshed from ``aux`` (pure).

    ``aux`` is what ``lorajax.adapt(...)(..., adapter_aux=True)`` returned: per
    target statistics of variants with load-balancing buffers (FlyLoRA's and
    SMoRA's routing bias). Targets without statistics are unchanged; for
    variants without an ``update`` ``aux`` must be empty.
    """
    variant = registry.get(spec.variant)
    flat_aux = _adapter_paths(aux) if aux else {}
    if not flat_aux:
        return adapters
    if variant.update is None:
        raise ValueError(f"variant {spec.variant!r} keeps no routing state; aux must be empty")
    selected, index, shared = resolve(spec, params, adapters)
    by_keys = {t.keys: t for t in selected}
    flat = dict(_adapter_paths(adapters))

    def other_form(keys: tuple) -> tuple:  # with / without the "params" collection name
        return keys[1:] if keys[:1] == ("params",) else ("params",) + keys

    for keys, stats in flat_aux.items():
        keys = keys if keys in by_keys else other_form(keys)
        if keys not in by_keys:
            raise ValueError(f"aux has statistics for {'/'.join(keys)}, which is not an adapted weight")
        new = variant.update({**index[keys], **shared}, stats, by_keys[keys])
        own = keys if keys in flat else other_form(keys)
        flat[own] = {**flat[own], **new}
    tree = _nest(flat)
    if SHARED_KEY in adapters:
        tree[SHARED_KEY] = adapters[SHARED_KEY]
    return tree


def unmerge(spec: Spec, merged_params: Any, adapters: Any) -> Any:
    """Inverse of `merge` for variants that define one (LoRA, VeRA); DoRA raises."""
    return _map_weights(spec, merged_params, adapters, "unadapted")


def _is_frozen(variant: Variant, path: tuple) -> bool:
    names = targets.key_names(path)
    return bool(names) and variant.is_buffer(names[-1])


def trainable_mask(spec: Spec, adapters: Any) -> Any:
    """A bool tree like ``adapters``: True for trainable leaves, False for frozen buffers.

    Use with ``optax.masked`` or to build ``optax.multi_transform`` labels.
    """
    variant = registry.get(spec.variant)
    return jax.tree_util.tree_map_with_path(lambda p, _: not _is_frozen(variant, p), adapters)


def partition(spec: Spec, adapters: Any) -> tuple[Any, Any]:
    """Split into ``(trainable, frozen)`` trees with ``None`` where a leaf belongs to the other.

    Differentiate only ``trainable`` and rebuild with `combine`, so that frozen
    buffers get no gradient and no optimiser state.
    """
    variant = registry.get(spec.variant)
    trainable = jax.tree_util.tree_map_with_path(lambda p, x: None if _is_frozen(variant, p) else x, adapters)
    frozen = jax.tree_util.tree_map_with_path(lambda p, x: x if _is_frozen(variant, p) else None, adapters)
    return trainable, frozen


def combine(trainable: Any, frozen: Any) -> Any:
    """Inverse of `partition`."""
    return jax.tree_util.tree_map(lambda a, b: b if a is None else a, trainable, frozen, is_leaf=lambda x: x is None)


def _size(tree: Any) -> int:
    leaves = jax.tree_util.tree_leaves(tree, is_leaf=paths.is_quantized)
    return sum(math.prod(x.shape) for x in leaves if hasattr(x, "shape"))


def count_params(spec: Spec, params: Any, adapters: Any) -> dict[str, float]:
    """``{"trainable", "frozen_adapter", "base", "total", "trainable_percent"}``."""
    trainable, frozen = partition(spec, adapters)
    base = _size(params if not paths.is_variables(params) else params["params"])
    n_train, n_frozen = _size(trainable), _size(frozen)
    total = base + n_train + n_frozen
    return {
        "trainable": n_train,
        "frozen_adapter": n_frozen,
        "base": base,
        "total": total,
        "trainable_percent": 100.0 * n_train / total,
    }


def check_finite(adapters: Any) -> Any:
    """Raise ``FloatingPointError`` naming the first adapter leaf with NaN/Inf; else return ``adapters``.

    Works on concrete arrays and, inside ``jit``, through ``jax.debug.callback``
    (the error then surfaces when the computation runs).
    """
    for path, leaf in jax.tree_util.tree_flatten_with_path(adapters)[0]:
        name = "/".join(targets.key_names(path))
        if isinstance(leaf, jax.core.Tracer):

            def _cb(ok, name=name):
                if not bool(ok):
                    raise FloatingPointError(f"non-finite values in adapter leaf {name}")

            jax.debug.callback(_cb, jnp.all(jnp.isfinite(leaf)))
        elif not np.all(np.isfinite(np.asarray(leaf))):
            raise FloatingPointError(f"non-finite values in adapter leaf {name}")
    return adapters
