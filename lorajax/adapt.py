"""Run an unmodified model with adapted weights: ``merged`` or ``factored`` mode.

``adapt(apply_fn, spec, mode)`` returns ``fn(params, adapters, *args, **kw)``
that calls ``apply_fn(params, *args, **kw)`` with every targeted weight adapted.

* ``merged``: forms ``W'`` for each target (inside your ``jit``) and calls
  ``apply_fn`` with the merged tree. Works for any Flax model, linen or NNX
  (``apply_fn = lambda state, x: nnx.merge(graphdef, state)(x)``).
* ``factored``: for linen ``nn.Dense``, ``nn.DenseGeneral`` and ``nn.Einsum``
  (through ``nn.intercept_methods``) computes the layer as the variant's
  factored forward, e.g. LoRA's ``x W + s (x A) B``, with token activations
  flattened to 2-D ``[T, in]``; ``nn.Embed`` and ``nn.Conv`` run LoRA's
  factored forwards of `lorajax.layer_kinds`. Neither ``ΔW`` nor a full-size weight gradient
  is formed. For an NNX ``State`` the same holds for ``nnx.Linear``,
  ``nnx.LinearGeneral`` and ``nnx.Einsum`` (see `lorajax.nnx_adapt`). Every
  adapter must be reached by an adapted layer call; otherwise it raises (use
  ``merged`` for custom layers).

``kernel="pallas"`` (factored mode, ``lora`` variant only) computes each
adapted layer with the fused Pallas kernel `pallas_kernels.lora_linear`
(interpret mode on CPU: for correctness, not speed).

Both modes give the same outputs and adapter gradients (tested). Differentiate
only the adapters (``jax.grad`` over the ``adapters`` argument): frozen
weights outside the differentiated argument get no weight-gradient matmul.

Internal API (used by `lorajax.nnx_adapt` and `lorajax.multi_adapter`, not
exported): `make_interceptor` (the linen interceptor over a target table),
`forward` (a variant's factored forward on ``[T, in]``), `sowing` (a context
whose statistics add up per layer) and `parse_einsum`.

Example:
  >>> import jax, jax.numpy as jnp, flax.linen as nn, lorajax
  >>> model = nn.Dense(3)
  >>> x = jnp.ones((2, 4))
  >>> variables = model.init(jax.random.key(0), x)
  >>> spec = lorajax.Spec("lora", rank=2, targets=".*")
  >>> adapters = lorajax.init(spec, variables, jax.random.key(1))
  >>> fwd = lorajax.adapt(model.apply, spec, mode="factored")
  >>> bool(jnp.allclose(fwd(variables, adapters, x), model.apply(variables, x)))
  True
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import warnings
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import opt_einsum
from flax import nnx
from flax.core import meta

from lorajax import layer_kinds, layer_scan, registry
from lorajax.adapters import as_matrix, call_variant, check_finite, merge, target_context
from lorajax.plan import make_plan, nest
from lorajax.spec import Spec
from lorajax.variants import lora
from lorajax.variants.base import EVAL, Context

__all__ = ["adapt"]

MODES = ("merged", "factored")
LINEN_LAYERS = "nn.Dense / nn.DenseGeneral / nn.Einsum / nn.Embed / nn.Conv"
KERNELS = (None, "pallas")


def adapt(
    apply_fn: Callable,
    spec: Spec,
    mode: str = "factored",
    *,
    aux: bool = False,
    debug: bool = False,
    kernel: str | None = None,
) -> Callable:
    """Wrap ``apply_fn(params, *a, **kw)`` as ``fn(params, adapters, *a, **kw)``.

    Args:
      apply_fn: e.g. ``model.apply`` (linen) or a function of an NNX State.
      spec: the `Spec` the adapters were made with.
      mode: ``"factored"`` (default) or ``"merged"``.
      aux: the returned function gives ``(out, aux)`` (see below) instead of ``out``.
      debug: check adapters for NaN/Inf on every call (raises FloatingPointError).
      kernel: ``None`` (jnp) or ``"pallas"``: the fused `pallas_kernels.lora_linear`
        kernel (factored mode and the ``lora`` variant only).

    The returned function also takes keyword-only ``adapter_rng`` (a PRNG key;
    folded per target) and ``adapter_train`` (bool) for variants that sample in
    training (e.g. DyLoRA's rank); they are not passed on to ``apply_fn``.
    With ``aux=True`` (or ``adapter_aux=True`` on one call, which overrides
    it) it returns ``(out, aux)``: for
    variants with load-balancing state (FlyLoRA, SMoRA) ``aux`` is a tree like
    the adapters holding each target's statistics (summed over the calls of
    that layer), to be passed to `lorajax.update_state`; for other variants it
    is ``{}``. The statistics are collected while ``apply_fn`` is traced, so
    the layers must not sit inside ``nn.scan`` / ``jax.lax.scan`` bodies.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")

    variant = registered = registry.get(spec.variant)
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "pallas":
        if mode != "factored":
            raise ValueError(
                f"kernel='pallas' is the fused LoRA kernel: it needs mode='factored', got mode={mode!r}; "
                "use kernel=None"
            )
        registry.plain_lora(spec.variant, "kernel='pallas' (the fused LoRA kernel; else use kernel=None)")
        variant = dataclasses.replace(variant, apply=_pallas_lora_apply)
    if mode == "merged":
        if not variant.mergeable:
            raise ValueError(f"variant {spec.variant!r} is input-dependent and cannot be merged: use mode='factored'")

        @functools.wraps(apply_fn)
        def merged_fn(params, adapters, *args, adapter_rng=None, adapter_train=False, adapter_aux=aux, **kwargs):
            if debug:
                check_finite(adapters)
            if adapter_train and spec.options.get("dropout", 0.0):
                raise ValueError(
                    f"dropout={spec.options['dropout']} acts on the adapter's input, which a merged weight cannot "
                    "do: train with mode='factored' (or dropout=0)"
                )
            merged = merge(  # a quantised target is merged as W_deq + ΔW, here inside the caller's jit
                spec, params, adapters, rng=adapter_rng, train=adapter_train, variant=variant, dequantize=True
            )
            out = apply_fn(merged, *args, **kwargs)
            return (out, {}) if adapter_aux else out

        return merged_fn

    @functools.wraps(apply_fn)
    def factored_fn(params, adapters, *args, adapter_rng=None, adapter_train=False, adapter_aux=aux, **kwargs):
        if debug:
            check_finite(adapters)
        plan = make_plan(spec, params, adapters, registered)
        table = {t.name: (t, plan.adapter(t), target_context(t, adapter_rng, adapter_train)) for t in plan.targets}
        used: set[str] = set()
        sink: dict[str, dict] = {}
        if _is_nnx_state(params):  # NNX State: the kernels carry their adapters (lorajax.nnx_adapt)
            from lorajax import nnx_adapt

            params = nnx_adapt.wrap_kernels(params, variant, table, used, sink)
            hook, layers = nnx_adapt.intercept(), nnx_adapt.LAYERS
            scans: contextlib.AbstractContextManager = contextlib.nullcontext()
        else:
            hook, layers = nn.intercept_methods(make_interceptor(variant, table, used, sink)), LINEN_LAYERS
            scans = layer_scan.providing(_scan_provider(plan, table, used, adapter_aux))
        with hook, scans:
            out = apply_fn(params, *args, **kwargs)
        check_reached(table, used, "factored mode", layers, " Use mode='merged'.")
        if not adapter_aux:
            return out
        return out, nest({table[name][0].keys: stats for name, stats in sink.items()})

    return factored_fn


def _is_nnx_state(params) -> bool:
    """True when ``params`` is an NNX ``State``: factored mode then runs through `lorajax.nnx_adapt`."""
    return isinstance(params, nnx.State)


def _pallas_lora_apply(x: jax.Array, w: jax.Array, adapter: dict, t, ctx: Context = EVAL) -> jax.Array:
    from pallas_kernels import lora_linear  # imported only when asked for

    return lora_linear(x, w, adapter["lora_A"], adapter["lora_B"], lora.scaling(t))


def check_reached(table: dict, used: set, what: str, layers: str, hint: str = "") -> None:
    """After an intercepted call: raise if no adapted weight was reached, warn for the ones that were not.

    Call it from the wrapper the user calls: the warning points at the user's line.
    """
    missing = sorted(set(table) - used)
    if missing and not used:
        raise ValueError(
            f"{what} reached none of the adapted weights (does apply_fn call {layers}?). "
            f"Not reached: {missing[:5]}.{hint}"
        )
    if missing:
        warnings.warn(f"{what}: adapters never used by apply_fn: {missing[:5]}", stacklevel=3)


def make_interceptor(variant, table: dict, used: set, sink: dict) -> Callable:
    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        other = layer_kinds.kind(module, context.method_name)  # nn.Embed / nn.Conv: lorajax.layer_kinds
        if other is None and (
            context.method_name != "__call__" or not isinstance(module, (nn.Dense, nn.DenseGeneral, nn.Einsum))
        ):
            return next_fun(*args, **kwargs)
        name = ".".join(str(p) for p in module.path)
        entry = table.get(name)
        if entry is not None:
            used.add(name)
            t, adapter, ctx = entry
            ctx = sowing(ctx, sink, name)
        elif (entry := _scanned_entry(name)) is not None:  # a layer inside `lorajax.layer_scan.scan`: no sink
            t, adapter, ctx = entry
        else:
            return next_fun(*args, **kwargs)
        if other is not None:
            return layer_kinds.forward(other, module, variant, t, adapter, ctx, next_fun, args, kwargs)
        inputs = args[0] if args else kwargs["inputs"]
        if isinstance(module, nn.Einsum):
            einsum_str = module.einsum_str if len(args) < 2 else args[1]
            einsum_str = kwargs.get("einsum_str", einsum_str)
            return _einsum(module, variant, t, adapter, ctx, inputs, einsum_str)
        return _dense(module, variant, t, adapter, ctx, inputs)

    return interceptor


def _scanned_entry(name: str) -> tuple | None:
    """Inside a `lorajax.layer_scan.scan` iteration: ``(target, adapter, ctx)`` of this iteration's layer at the
    relative module path ``name``, or None."""
    here = layer_scan.current()
    if here is None:
        return None
    for resolve, inputs_i in zip(*here):
        entry = resolve(name, inputs_i)
        if entry is not None:
            return entry
    return None


def _scan_provider(plan, table: dict, used: set, aux: bool) -> Callable:
    """The `lorajax.layer_scan` provider of one factored call: for the layers ``{prefix}.{i}``, each target's own
    adapter stacked over the layers (``[n, ...]`` leaves; shared state stays whole) and its per-layer PRNG keys.
    Statistics (``ctx.sow``) are dropped, or refused with ``aux`` (they would have to leave the scan)."""

    def provide(prefix: str, n: int):
        head = prefix + "."
        groups: dict[str, dict[int, str]] = {}
        for name in table:
            index, _, rel = name[len(head) :].partition(".") if name.startswith(head) else ("", "", "")
            if index.isdigit() and rel:
                groups.setdefault(rel, {})[int(index)] = name
        if not groups:
            return None

        def refuse(stats: dict) -> None:
            raise ValueError(
                f"scanned layers under {prefix!r}: adapter statistics (adapter_aux) are not collected inside a "
                "scan; run the model with its layers unscanned (e.g. scan_layers=False)"
            )

        inputs, first = {}, {}
        for rel, by_layer in groups.items():
            if sorted(by_layer) != list(range(n)):
                raise ValueError(
                    f"scanned layers under {prefix!r}: {rel!r} is adapted in layers {sorted(by_layer)}, not in all "
                    f"{n}; a scan adapts every layer alike (run the model unscanned, e.g. scan_layers=False)"
                )
            entries = [table[by_layer[i]] for i in range(n)]
            t0, _, ctx0 = entries[0]
            for t, _, _ in entries[1:]:
                if (t.shape, t.in_axes, t.rank, t.alpha, t.options) != (
                    t0.shape, t0.in_axes, t0.rank, t0.alpha, t0.options
                ):  # fmt: skip
                    raise ValueError(
                        f"scanned layers under {prefix!r}: {t.name} (shape {t.shape}, rank {t.rank}, alpha "
                        f"{t.alpha}) is adapted unlike {t0.name} (shape {t0.shape}, rank {t0.rank}, alpha "
                        f"{t0.alpha}); a scan needs every layer alike (run the model unscanned)"
                    )
            own = layer_scan.stack([plan.adapters[t.keys] for t, _, _ in entries])
            keys = None if ctx0.rng is None else jnp.stack([ctx.rng for _, _, ctx in entries])
            inputs[rel], first[rel] = (own, keys), (t0, ctx0)
            used.update(by_layer.values())

        def resolve(rel: str, inputs_i: dict):
            if rel not in first:
                return None
            (own_i, key_i), (t0, ctx0) = inputs_i[rel], first[rel]
            return t0, {**own_i, **plan.shared}, dataclasses.replace(ctx0, rng=key_i, sink=refuse if aux else None)

        return inputs, resolve

    return provide


def sowing(ctx: Context, sink: dict, name: str) -> Context:
    """``ctx`` whose `Context.sow` adds statistics up in ``sink[name]`` (a layer may be called more than once)."""

    def sow(stats: dict) -> None:
        sink[name] = jax.tree_util.tree_map(jnp.add, sink[name], stats) if name in sink else stats

    return dataclasses.replace(ctx, sink=sow)


def forward(variant, t, adapter, ctx: Context, x2d: jax.Array, w: jax.Array) -> jax.Array:
    """Variant's factored forward on ``x2d: [T, in]`` and ``w: [in, out]``."""
    if variant.apply is not None:
        return call_variant(variant, variant.apply, x2d, w, adapter, t, ctx=ctx)
    return x2d @ call_variant(variant, variant.adapted, w, adapter, t, ctx=ctx)


def _in_compute_dtype(adapter: Any, dtype: Any) -> Any:
    """The adapter's floating leaves cast to a layer's compute ``dtype`` (None: as stored).

    With ``Dense(dtype=bfloat16)`` over float32 parameters the layer computes in bf16; its adapter does
    too, while the stored (master) adapter stays float32 and receives float32 gradients through the cast.
    """
    if dtype is None:
        return adapter
    return jax.tree_util.tree_map(
        lambda a: a.astype(dtype) if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating) else a, adapter
    )


def _dense(module, variant, t, adapter, ctx, x: jax.Array) -> jax.Array:
    p = module.variables["params"]
    kernel, bias = meta.unbox(p["kernel"]), p.get("bias") if module.use_bias else None  # unbox: quantised kernels
    if isinstance(module, nn.DenseGeneral):
        if module.batch_dims:
            raise NotImplementedError(f"{t.name}: DenseGeneral with batch_dims is not supported in factored mode")
        axis = module.axis if isinstance(module.axis, tuple) else (module.axis,)
        axis = tuple(a % x.ndim for a in axis)
    else:
        axis = (x.ndim - 1,)
    if len(axis) != t.in_axes:
        raise ValueError(
            f"{t.name}: the layer contracts {len(axis)} input axes but the adapter was made with "
            f"in_axes={t.in_axes}; set Spec(in_axes={{{t.name.split('.')[-1]!r}: {len(axis)}}})"
        )
    x, kernel, bias = module.promote_dtype(x, kernel, bias, dtype=module.dtype)
    adapter = _in_compute_dtype(adapter, module.dtype)
    n = len(axis)
    x = jnp.moveaxis(x, axis, tuple(range(x.ndim - n, x.ndim)))
    batch_shape = x.shape[: x.ndim - n]
    x2d = x.reshape(math.prod(batch_shape), -1)
    y2d = forward(variant, t, adapter, ctx, x2d, as_matrix(kernel, t))
    y = y2d.reshape(*batch_shape, *kernel.shape[n:])
    if bias is None:
        return y
    return y + bias.reshape((1,) * len(batch_shape) + bias.shape)


def _einsum(module, variant, t, adapter, ctx, x: jax.Array, einsum_str: str) -> jax.Array:
    p = module.variables["params"]
    kernel = meta.unbox(p["kernel"])  # a quantised kernel (lorajax.quant) as its dequantised array
    einsum_str = einsum_str.replace(" ", "")
    (lhs, rhs), out, _ = parse_einsum(einsum_str, x, kernel)
    n = t.in_axes
    in_letters, out_letters = rhs[:n], rhs[n:]
    ok = all(c in lhs and c not in out for c in in_letters) and all(c in out and c not in lhs for c in out_letters)
    batch = "".join(c for c in lhs if c not in in_letters)
    if not ok or not all(c in out for c in batch):
        raise NotImplementedError(
            f"{t.name}: einsum {einsum_str!r} is not a linear map with the kernel's first {n} axes as inputs "
            "and the rest as outputs; use mode='merged' or set in_axes"
        )
    bias = None
    if module.use_bias:
        _, bias_shape = module._get_bias_shape(einsum_str, x, kernel)
        bias = p["bias"]
    x, kernel, bias = module.promote_dtype(x, kernel, bias, dtype=module.dtype)
    adapter = _in_compute_dtype(adapter, module.dtype)
    xt = jnp.einsum(f"{lhs}->{batch}{in_letters}", x)
    batch_shape = xt.shape[: len(batch)]
    y2d = forward(variant, t, adapter, ctx, xt.reshape(math.prod(batch_shape), -1), as_matrix(kernel, t))
    y = y2d.reshape(*batch_shape, *kernel.shape[n:])
    y = jnp.einsum(f"{batch}{out_letters}->{out}", y)
    return y if bias is None else y + jnp.reshape(bias, bias_shape)


def parse_einsum(einsum_str: str, x: jax.Array, kernel: jax.Array):
    operands, result, _ = opt_einsum.parser.parse_einsum_input((einsum_str, x, kernel))
    return operands.split(","), result, None
