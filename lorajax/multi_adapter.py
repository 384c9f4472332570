"""Multi-adapter inference: one model call for a batch of requests that use different LoRA adapters.

``stack_adapters(spec, [adapters_0, ..., adapters_{G-1}])`` stacks G ``lora``
adapter trees into a pool: per target ``{"lora_A": [G, in, R], "lora_B":
[G, R, out], "scale": [G]}`` with ``R`` the largest rank (smaller ranks are
zero-padded, which changes nothing) and each adapter's own ``α / r`` (or
rsLoRA) scale. ``spec`` may be one `Spec` or one per adapter (ranks, alphas,
``rank_pattern`` may differ; the targets must be the same).

``adapt_multi(apply_fn, spec)`` returns ``fn(params, pool, adapter_ids, *args,
**kw)``: it runs ``apply_fn(params, *args, **kw)`` once, and at every targeted
``nn.Dense`` / ``nn.DenseGeneral`` / ``nn.Einsum`` (through
``nn.intercept_methods``, as `lorajax.adapt`'s factored mode) computes
``x W + s_i (x A_i) B_i`` where ``i = adapter_ids[request]``.

Rows of the batch are the requests: at each adapted layer the flattened token
rows (row-major, batch axis first: ``[B, S, in]`` or ``[B·S, in]``) split into
``len(adapter_ids)`` equal contiguous groups, group ``b`` using adapter
``adapter_ids[b]``. The default computes the adapter part by gathering
``A[ids]`` / ``B[ids]`` per request and a batched matmul (the fastest XLA form
on CPU, performance.md §2.4); ``kernel="pallas"`` uses the Punica-style
`pallas_kernels.multi_lora` kernel (interpret mode on CPU: correctness only).

Example:
  >>> import jax, jax.numpy as jnp, flax.linen as nn, lorajax
  >>> from lorajax.multi_adapter import stack_adapters, adapt_multi
  >>> model = nn.Dense(3)
  >>> variables = model.init(jax.random.key(0), jnp.ones((1, 4)))
  >>> spec = lorajax.Spec("lora", rank=2, targets=".*", init_weights=False)
  >>> pool = stack_adapters(spec, [lorajax.init(spec, variables, s) for s in (1, 2)])
  >>> pool["params"]["kernel"]["lora_A"].shape
  (2, 4, 2)
  >>> adapt_multi(model.apply, spec)(variables, pool, jnp.array([1, 0, 1]), jnp.ones((3, 4))).shape
  (3, 3)
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lorajax import registry, targets
from lorajax.adapt import make_interceptor
from lorajax.adapters import resolve
from lorajax.plan import adapter_paths, nest
from lorajax.spec import Spec
from lorajax.variants import lora
from lorajax.variants.base import EVAL, Target

__all__ = ["stack_adapters", "adapt_multi"]

KERNELS = (None, "pallas")


def _target(spec: Spec, keys: tuple, rank: int) -> Target:
    """The `Target` (for its scale) of an adapter found at ``keys`` with rank ``rank``."""
    name = targets.module_name(keys)
    want = targets.pattern_value(spec.rank_pattern, name, spec.rank)
    if rank != want:
        raise ValueError(f"stack_adapters: adapter at {'/'.join(keys)} has rank {rank} but its spec says {want}")
    alpha = float(targets.pattern_value(spec.alpha_pattern, name, spec.alpha))
    return Target(keys=keys, name=name, shape=(), in_axes=1, rank=rank, alpha=alpha, options=spec.options)


def stack_adapters(
    spec: Spec | Sequence[Spec], adapters: Sequence[dict], *, rank_multiple: int = 1, dtype: Any = None
) -> dict:
    """Stack G ``lora`` adapter trees into a pool (see the module doc).

    Args:
      spec: the `Spec` all adapters were made with, or one Spec per adapter.
      adapters: G trees from `lorajax.init` (or trained), same targets and shapes.
      rank_multiple: pad the pool rank ``R`` up to a multiple of this (e.g. 16
        to match the kernel's padding once, instead of on every call).
      dtype: pool dtype for A and B (default: promoted from the adapters).
    """
    adapters = list(adapters)
    if isinstance(rank_multiple, bool) or not isinstance(rank_multiple, int) or rank_multiple < 1:
        raise ValueError(f"stack_adapters: rank_multiple must be a positive int, got {rank_multiple!r}")
    if not adapters:
        raise ValueError("stack_adapters: no adapters given")
    given = list(spec) if isinstance(spec, (list, tuple)) else [spec] * len(adapters)
    if len(given) != len(adapters):
        raise ValueError(f"stack_adapters: {len(given)} specs for {len(adapters)} adapters")
    specs: list[Spec] = []
    for i, s in enumerate(given):
        if not isinstance(s, Spec):
            raise TypeError(f"stack_adapters: spec {i} must be a lorajax.Spec, got {type(s).__name__}")
        registry.plain_lora(s.variant, f"stack_adapters (adapter {i})")
        specs.append(s)
    paths = [adapter_paths(a) for a in adapters]
    keys0 = list(paths[0])
    for i, p in enumerate(paths[1:], 1):
        if set(p) != set(keys0):
            diff = sorted(set(p) ^ set(keys0))[0]
            raise ValueError(f"stack_adapters: adapter {i} and adapter 0 differ in targets, e.g. {'/'.join(diff)}")
    flat = {}
    for keys in keys0:
        a_list, b_list, scales = [], [], []
        for i, (p, s) in enumerate(zip(paths, specs)):
            entry = p[keys]
            if set(entry) != {"lora_A", "lora_B"}:
                raise ValueError(
                    f"stack_adapters: adapter {i} at {'/'.join(keys)} is not a lora adapter: {sorted(entry)}"
                )
            a, b = entry["lora_A"], entry["lora_B"]
            if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
                raise ValueError(
                    f"stack_adapters: adapter {i} at {'/'.join(keys)}: lora_A {a.shape} and "
                    f"lora_B {b.shape} do not form [in, r] @ [r, out]"
                )
            io = (a.shape[0], b.shape[1])
            io0 = (paths[0][keys]["lora_A"].shape[0], paths[0][keys]["lora_B"].shape[1])
            if io != io0:
                raise ValueError(
                    f"stack_adapters: adapter {i} at {'/'.join(keys)} maps {io[0]}->{io[1]}, "
                    f"adapter 0 maps {io0[0]}->{io0[1]}"
                )
            a_list.append(a)
            b_list.append(b)
            scales.append(lora.scaling(_target(s, keys, a.shape[1])))
        rank = max(a.shape[1] for a in a_list)
        rank = -(-rank // rank_multiple) * rank_multiple
        dt = dtype or jnp.result_type(*a_list, *b_list)
        flat[keys] = {
            "lora_A": jnp.stack([jnp.pad(a.astype(dt), ((0, 0), (0, rank - a.shape[1]))) for a in a_list]),
            "lora_B": jnp.stack([jnp.pad(b.astype(dt), ((0, rank - b.shape[0]), (0, 0))) for b in b_list]),
            "scale": jnp.asarray(scales, jnp.float32),
        }
    return nest(flat)


def _multi_apply(x2d: jax.Array, w: jax.Array, entry: dict, t, ctx: Any = None, *, ids: jax.Array, kernel: str | None):
    a, b, s = entry["lora_A"], entry["lora_B"], entry["scale"]
    if a.ndim != 3 or a.shape[1] != w.shape[0] or b.shape != (a.shape[0], a.shape[2], w.shape[1]):
        raise ValueError(
            f"adapt_multi: pool at {'/'.join(t.keys)} has lora_A {a.shape}, lora_B {b.shape}; "
            f"the weight is {tuple(w.shape)} (want [G, in, R], [G, R, out])"
        )
    n = ids.shape[0]
    if x2d.shape[0] % n:
        raise ValueError(
            f"adapt_multi: layer {t.name} sees {x2d.shape[0]} token rows, not a multiple of the "
            f"{n} requests in adapter_ids (rows of the batch must be the requests)"
        )
    x3 = x2d.reshape(n, x2d.shape[0] // n, x2d.shape[1])
    import pallas_kernels  # imported here: lorajax needs it only for multi-adapter calls

    fn = pallas_kernels.multi_lora if kernel == "pallas" else pallas_kernels.multi_lora_reference
    return fn(x3, w, a, b, s, ids).reshape(x2d.shape[0], w.shape[1])


def adapt_multi(apply_fn: Callable, spec: Spec, *, kernel: str | None = None) -> Callable:
    """Wrap ``apply_fn(params, *a, **kw)`` as ``fn(params, pool, adapter_ids, *a, **kw)``.

    Args:
      apply_fn: a linen ``apply`` whose targeted layers are ``nn.Dense`` /
        ``nn.DenseGeneral`` / ``nn.Einsum``.
      spec: a ``lora`` `Spec` selecting the same targets as the pool (from
        `stack_adapters`); ranks and scales come from the pool.
      kernel: ``None`` (gather + batched matmul in jnp) or ``"pallas"``
        (`pallas_kernels.multi_lora`).

    ``adapter_ids``: ``[B]`` ints, one per request (batch row), in ``[0, G)``;
    checked when concrete; under ``jit`` out-of-range ids give NaN rows.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    registry.plain_lora(spec.variant, "adapt_multi")

    @functools.wraps(apply_fn)
    def multi_fn(params, pool, adapter_ids, *args, **kwargs):
        selected, index, _ = resolve(spec, params, pool)
        ids = jnp.asarray(adapter_ids) if not isinstance(adapter_ids, jax.Array) else adapter_ids
        if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(
                f"adapt_multi: adapter_ids must be a 1-D integer array (one id per request), "
                f"got shape {ids.shape} dtype {ids.dtype}"
            )
        n_adapters = {entry["lora_A"].shape[0] for entry in index.values()}
        if len(n_adapters) != 1:
            raise ValueError(f"adapt_multi: pool entries hold different numbers of adapters {sorted(n_adapters)}")
        (g,) = n_adapters
        if not isinstance(ids, jax.core.Tracer):
            bad = np.flatnonzero((np.asarray(ids) < 0) | (np.asarray(ids) >= g))
            if bad.size:
                raise ValueError(
                    f"adapt_multi: adapter_ids[{bad[0]}] = {int(np.asarray(ids)[bad[0]])} is out of "
                    f"range for a pool of {g} adapters"
                )
        variant = dataclasses.replace(lora.VARIANT, apply=functools.partial(_multi_apply, ids=ids, kernel=kernel))
        table = {t.name: (t, index[t.keys], EVAL) for t in selected}
        used: set[str] = set()
        with nn.intercept_methods(make_interceptor(variant, table, used, {})):
            out = apply_fn(params, *args, **kwargs)
        if not used:
            raise ValueError(
                "adapt_multi reached none of the adapted weights (is apply_fn a linen model using "
                "nn.Dense / nn.DenseGeneral / nn.Einsum?)"
            )
        missing = sorted(set(table) - used)
        if missing:
            warnings.warn(f"adapt_multi: adapters never used by apply_fn: {missing[:5]}", stacklevel=2)
        return out

    return multi_fn
