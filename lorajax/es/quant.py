"""Reduced-precision inference bases for ESSA: `lorajax.quant` with ESSA's defaults (int8 / int4 / NF4 / bf16).

ESSA (arXiv 2507.04453) evaluates its population with the base model in INT8
or INT4 inference mode (abstract); how the paper quantises (third-party note:
bitsandbytes) is UNVERIFIED. lorajax uses its one quantised-base format,
`lorajax.quant`, here: `quantize` returns a normal params tree whose selected
kernels are `lorajax.quant.QuantizedArray` leaves (or bf16 arrays), so
``model.apply``, `lorajax.adapt` (any mode), generation, sharding and ESSA's
vmapped / chunked evaluation take it as is: no wrapper. Each linen layer
dequantises its kernel at use, inside the caller's ``jit``.

* ``"int8"``: symmetric per output channel, ``s_o = max_i |W_io| / 127``,
  ``q = round(W / s)`` (1 byte per weight plus ``4·out``).
* ``"int4"``: symmetric per group of 64 inputs, 4-bit codes two per byte.
* ``"nf4"``: QLoRA's NormalFloat4 with double quantisation (bitsandbytes' codes).
* ``"bf16"`` (alias ``"bfloat16"``): the kernels cast to bfloat16.

(See `lorajax.quant` for the equations and the bitsandbytes parity.) Compared
with the int8 format this module had before (``{"int8", "scale"}`` dicts and a
``quantized(apply_fn)`` wrapper computing ``(x @ q) · s``), the values are the
same (``W ≈ q · s`` per output channel); the matmul is now ``x @ (q · s)``.
Under ``jit`` on CPU both forms convert the int8 codes to a float weight
before the dot (XLA fuses the convert, and now the scale, into one
elementwise pass over the weight); bf16 kernels are promoted to the
activations' float32 by ``nn.Dense`` (before: bf16 operands, f32 accumulation).

Example:
  >>> import jax, jax.numpy as jnp, flax.linen as nn
  >>> from lorajax.es import quant
  >>> model = nn.Dense(8)
  >>> x = jax.random.normal(jax.random.key(0), (4, 16))
  >>> variables = model.init(jax.random.key(1), x)
  >>> q = quant.quantize(variables, "int8")
  >>> leaf = q["params"]["kernel"]
  >>> leaf.kind, leaf.codes.dtype, leaf.scales.shape
  ('int8', dtype('int8'), (8,))
  >>> y, y_ref = model.apply(q, x), model.apply(variables, x)  # no wrapper
  >>> bool(jnp.linalg.norm(y - y_ref) / jnp.linalg.norm(y_ref) < 1e-2)
  True
"""

from __future__ import annotations

from typing import Any, Callable

from lorajax import quant as _quant
from lorajax.adapt import adapt as _adapt
from lorajax.selection import Selection
from lorajax.spec import Spec

__all__ = ["DTYPES", "quantize", "dequantize", "is_quantized", "adapt", "nbytes"]

#: what `quantize` accepts (``"bfloat16"`` = ``"bf16"``)
DTYPES = ("int8", "int4", "nf4", "bf16", "bfloat16")

#: the float params back (quantised kernels dequantised to their own dtype; bf16 kernels stay bf16)
dequantize = _quant.dequantize
#: True for a quantised kernel (`lorajax.quant.QuantizedArray`)
is_quantized = _quant.is_quantized
#: bytes of every array in a params tree (codes and scales of quantised kernels)
nbytes = _quant.base_bytes


def quantize(
    params: Any, dtype: str = "int8", targets: str | None = None, exclude: str | None = None, **options: Any
) -> Any:
    """The base's kernels in ``dtype`` (`lorajax.quant.quantize` with a regex selection).

    Args:
      params: linen params or variables dict.
      dtype: one of `DTYPES`.
      targets: regex (``re.fullmatch``) on the dotted module name, e.g.
        ``r".*layers.*"``; default every kernel, the output head included.
      exclude: regex of module names to keep in full precision (e.g. ``"lm_head"``).
      options: ``blocksize``, ``double_quant`` (NF4), ``group_size`` (int4): see `lorajax.quant.quantize_array`.

    Raises:
      ValueError: an unknown ``dtype``, or a selection that selects no kernel (naming the modules found).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    selection = Selection(".*" if targets is None else targets, exclude=exclude)
    return _quant.quantize(params, selection, "bf16" if dtype == "bfloat16" else dtype, **options)


def adapt(apply_fn: Callable, spec: Spec) -> Callable:
    """``fn(params, adapters, *args, **kw)``: `lorajax.adapt` in factored mode; ``params`` quantised or not."""
    return _adapt(apply_fn, spec, mode="factored")
