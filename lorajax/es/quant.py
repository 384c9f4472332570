"""Inference-only reduced-precision base weights: bf16 and int8 weight-only matmuls, with LoRA on top.

ESSA (arXiv 2507.04453) evaluates its population with the base model in INT8
or INT4 inference mode (abstract); how the paper quantises (third-party note:
bitsandbytes) is UNVERIFIED. lorajax's version is a params transformation plus
a model wrapper, for linen models whose projections are ``nn.Dense`` (all
lorajax models):

* `quantize(params, "int8")`: every selected 2-D ``kernel [in, out]`` becomes
  ``{"int8": q [in, out] int8, "scale": [out] float32}``: symmetric,
  per-output-channel ``scale_j = max_i |W_ij| / 127``, ``q = round(W / scale)``
  (weights stored in 1 byte instead of 4). `quantize(params, "bfloat16")`
  casts the selected kernels to bf16.
* `quantized(apply_fn)` -> ``fn(qparams, *args)``: runs the model with every
  ``nn.Dense`` whose kernel is quantised computed as
  ``(x @ q) * scale + bias`` (int8: dequantised in the matmul, the int8 → float
  convert is an operand of the dot and the per-channel scale is applied to
  the output; bf16: bf16 operands, float32 accumulation).
* `adapt(apply_fn, spec)` -> ``fn(qparams, adapters, *args)``: the same plus
  LoRA adapters in the factored form ``base(x) + s·(x A) B`` (A, B in full
  precision), i.e. `lorajax.adapt`'s factored mode over a quantised base.
  Plain LoRA only (ESSA's SVD form converts back to it). `lorajax.adapt` itself
  does not accept quantised params (its merged mode would have to form
  ``W + ΔW`` in int8): a quantised kernel is a dict, so it fails loudly there
  instead of silently using unscaled integers.

Inference only: nothing here is differentiable with respect to the base.

Example:
  >>> import jax, jax.numpy as jnp, flax.linen as nn
  >>> from lorajax.es import quant
  >>> model = nn.Dense(8)
  >>> x = jax.random.normal(jax.random.key(0), (4, 16))
  >>> variables = model.init(jax.random.key(1), x)
  >>> q = quant.quantize(variables, "int8")
  >>> q["params"]["kernel"]["int8"].dtype, q["params"]["kernel"]["scale"].shape
  (dtype('int8'), (8,))
  >>> y, y_ref = quant.quantized(model.apply)(q, x), model.apply(variables, x)
  >>> bool(jnp.linalg.norm(y - y_ref) / jnp.linalg.norm(y_ref) < 1e-2)
  True
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from lorajax import registry
from lorajax.adapt import check_reached
from lorajax.adapters import resolve
from lorajax.paths import key_names, module_name
from lorajax.spec import Spec
from lorajax.variants import lora

__all__ = ["DTYPES", "quantize", "dequantize", "is_quantized", "quantized", "adapt", "nbytes"]

DTYPES = ("int8", "bfloat16")
_QKEYS = frozenset({"int8", "scale"})


def is_quantized(x: Any) -> bool:
    """True for an int8-quantised kernel ``{"int8", "scale"}``."""
    return isinstance(x, dict) and frozenset(x) == _QKEYS


def _quantize_int8(w: jax.Array) -> dict:
    w = jnp.asarray(w, jnp.float32)
    amax = jnp.max(jnp.abs(w), axis=0)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0).astype(jnp.float32)
    q = jnp.clip(jnp.round(w / scale[None, :]), -127, 127).astype(jnp.int8)
    return {"int8": q, "scale": scale}


def quantize(params: Any, dtype: str = "int8", targets: str | None = None, exclude: str | None = None) -> Any:
    """Quantise the base's 2-D ``kernel`` leaves (inference only).

    Args:
      params: linen params or variables dict.
      dtype: ``"int8"`` (symmetric per-output-channel, weight-only) or ``"bfloat16"``.
      targets: regex (``re.fullmatch``) on the dotted module name, e.g.
        ``r".*layers.*"``; default every 2-D kernel.
      exclude: regex of module names to keep in full precision (e.g. ``"lm_head"``).

    Raises ValueError for an unknown dtype or when nothing is selected.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    hits = []

    def one(path, leaf):
        keys = key_names(path)
        if not keys or keys[-1] != "kernel" or getattr(leaf, "ndim", 0) != 2:
            return leaf
        name = module_name(keys)
        if targets is not None and not re.fullmatch(targets, name):
            return leaf
        if exclude is not None and re.fullmatch(exclude, name):
            return leaf
        hits.append(name)
        return _quantize_int8(leaf) if dtype == "int8" else jnp.asarray(leaf, jnp.bfloat16)

    out = jax.tree_util.tree_map_with_path(one, params)
    if not hits:
        raise ValueError(f"quantize selected no 2-D kernel (targets={targets!r}, exclude={exclude!r})")
    return out


def dequantize(qparams: Any, dtype: Any = jnp.float32) -> Any:
    """Full-precision params back from `quantize` (int8 kernels -> ``q·scale`` in ``dtype``)."""
    return jax.tree.map(
        lambda x: (x["int8"].astype(jnp.float32) * x["scale"][None, :]).astype(dtype) if is_quantized(x) else x,
        qparams,
        is_leaf=is_quantized,
    )


def nbytes(tree: Any) -> int:
    """Bytes of every array in ``tree`` (int8 kernels count 1 byte per weight plus their scales)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


def _base(module: nn.Dense, kernel: Any, x2d: jax.Array, compute_dtype: Any) -> jax.Array:
    """``x2d @ W`` for a quantised (int8 dict or bf16) or plain kernel, float32 accumulation."""
    dims = (((1,), (0,)), ((), ()))
    if is_quantized(kernel):
        cd = compute_dtype or x2d.dtype
        y = jax.lax.dot_general(
            x2d.astype(cd),
            kernel["int8"].astype(cd),
            dims,
            precision=module.precision,
            preferred_element_type=jnp.float32,
        )
        return y * kernel["scale"][None, :]
    if kernel.dtype == jnp.bfloat16:
        return jax.lax.dot_general(
            x2d.astype(jnp.bfloat16), kernel, dims, precision=module.precision, preferred_element_type=jnp.float32
        )
    cd = jnp.result_type(x2d.dtype, kernel.dtype)
    return jax.lax.dot_general(
        x2d.astype(cd), kernel.astype(cd), dims, precision=module.precision, preferred_element_type=jnp.float32
    )


def _make_interceptor(table: dict, used: set, compute_dtype: Any) -> Callable:
    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        try:
            p = module.variables.get("params", {})
        except Exception:  # noqa: BLE001 - unbound / no variables: nothing of ours here
            return next_fun(*args, **kwargs)
        kernel = p.get("kernel") if hasattr(p, "get") else None
        name = ".".join(str(s) for s in module.path)
        if not isinstance(module, nn.Dense):
            if is_quantized(kernel):
                raise ValueError(
                    f"{name}: an int8 kernel is used by a {type(module).__name__}; lorajax.es.quant "
                    "handles nn.Dense only: exclude this module from quantize()"
                )
            return next_fun(*args, **kwargs)
        entry = table.get(name)
        quant = is_quantized(kernel) or (kernel is not None and kernel.dtype == jnp.bfloat16)
        if entry is None and not quant:
            return next_fun(*args, **kwargs)
        if kernel is None:
            raise ValueError(f"{name}: an adapted nn.Dense has no kernel in its params (called before init?)")
        x = args[0] if args else kwargs["inputs"]
        bias = p.get("bias") if module.use_bias else None
        out_dtype = module.dtype or jnp.result_type(x.dtype, jnp.float32 if is_quantized(kernel) else kernel.dtype)
        batch = x.shape[:-1]
        x2d = x.reshape(math.prod(batch), x.shape[-1])
        y = _base(module, kernel, x2d, compute_dtype)
        if entry is not None:
            used.add(name)
            t, adapter = entry
            y = y + lora.low_rank(x2d, adapter, t).astype(y.dtype)
        if bias is not None:
            y = y + bias.astype(y.dtype)[None, :]
        return y.astype(out_dtype).reshape(*batch, y.shape[-1])

    return interceptor


def quantized(apply_fn: Callable, *, compute_dtype: Any = None) -> Callable:
    """``fn(qparams, *args, **kw)``: ``apply_fn`` with the quantised ``nn.Dense`` layers computed weight-only.

    ``compute_dtype``: the matmul operand dtype for int8 kernels (default the
    activations' dtype; e.g. ``jnp.bfloat16`` for bf16 activations × int8 weights).
    """

    @functools.wraps(apply_fn)
    def fn(qparams, *args, **kwargs):
        with nn.intercept_methods(_make_interceptor({}, set(), compute_dtype)):
            return apply_fn(qparams, *args, **kwargs)

    return fn


def _shapes(qparams: Any) -> Any:
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x["int8"].shape, jnp.float32) if is_quantized(x) else x,
        qparams,
        is_leaf=is_quantized,
    )


def adapt(apply_fn: Callable, spec: Spec, *, compute_dtype: Any = None) -> Callable:
    """``fn(qparams, adapters, *args, **kw)``: quantised base + LoRA ``adapters`` (factored, full precision).

    ``qparams`` may also be unquantised params (then this equals
    `lorajax.adapt` in factored mode for ``nn.Dense`` layers).
    """
    registry.plain_lora(spec.variant, "lorajax.es.quant.adapt")

    @functools.wraps(apply_fn)
    def fn(qparams, adapters, *args, **kwargs):
        selected, index, _ = resolve(spec, _shapes(qparams), adapters)
        table = {t.name: (t, index[t.keys]) for t in selected}
        used: set = set()
        with nn.intercept_methods(_make_interceptor(table, used, compute_dtype)):
            out = apply_fn(qparams, *args, **kwargs)
        check_reached(table, used, "lorajax.es.quant.adapt", "nn.Dense")
        return out

    return fn
