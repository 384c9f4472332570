"""Plumbing shared by the kernels: where they run, padding to blocks, input checks.

Where a kernel runs (`resolve_mode`):

* ``interpret=None`` (default): Pallas interpret mode on CPU, compiled Pallas
  on GPU and TPU.
* ``interpret=True``: interpret mode on any backend (a ``jax.jit`` of a scan
  over the grid; for correctness, not speed).
* compiled on ``tpu`` (Mosaic TPU) or ``gpu`` (forced to the Triton lowering
  through ``pltriton.CompilerParams``; Mosaic GPU ``pallas_call`` is deprecated
  in jax 0.10.2). Neither compiled lowering has been run in this repository:
  no GPU or TPU was available, only interpret mode is tested.
* any other case (``interpret=False`` on CPU, an unknown backend): the jnp
  reference, with a warning the first time per kernel and backend.

Padding: every blocked dimension is zero-padded to a multiple of its block and
every dimension taken whole (rank, head dim) to a power of two >= 16, so that
block shapes satisfy Triton (powers of two, >= 16) and Mosaic TPU (multiples
of (8, 128) or the full dimension). Zero padding leaves the products exact.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

COMPILED_BACKENDS = ("tpu", "gpu")
MIN_BLOCK = 16

_warned: set[tuple[str, str]] = set()


def resolve_mode(kernel: str, interpret: bool | None) -> str:
    """``"interpret"``, ``"compiled"`` or ``"reference"`` for this call (see the module doc)."""
    backend = jax.default_backend()
    if interpret is None:
        interpret = backend == "cpu"
    if interpret:
        return "interpret"
    if backend in COMPILED_BACKENDS:
        return "compiled"
    if (kernel, backend) not in _warned:
        _warned.add((kernel, backend))
        warnings.warn(
            f"pallas_kernels.{kernel}: no compiled Pallas lowering for backend {backend!r} "
            "(Pallas runs on CPU only with interpret=True); using the jnp reference instead",
            RuntimeWarning,
            stacklevel=3,
        )
    return "reference"


def compiler_params(dims: int, sequential: Sequence[int] = ()) -> Any:
    """Backend compiler params for a compiled call with ``dims`` grid axes.

    Every axis is ``"parallel"`` except those in ``sequential`` (``"arbitrary"``
    on TPU: needed where programs along an axis share an output block that only
    one of them writes). Triton runs every program independently either way.
    """
    backend = jax.default_backend()
    if backend == "gpu":
        from jax.experimental.pallas import triton as pltriton

        return pltriton.CompilerParams(num_warps=4, num_stages=2)
    if backend == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.CompilerParams(
            dimension_semantics=tuple("arbitrary" if i in sequential else "parallel" for i in range(dims))
        )
    return None


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def round_up(n: int, m: int) -> int:
    return cdiv(n, m) * m


def fit_block(dim: int, block: int) -> int:
    """Block for ``dim``: ``block``, or less for a small dim (a power of two >= 16)."""
    return min(block, max(MIN_BLOCK, next_pow2(dim)))


def whole(dim: int) -> int:
    """Padded size of a dimension taken whole by every block (rank, head dim)."""
    return max(MIN_BLOCK, next_pow2(dim))


def pad_to(x: jax.Array, shape: Sequence[int]) -> jax.Array:
    """Zero-pad ``x`` at the end of each axis up to ``shape`` (no copy if it already fits)."""
    pads = [(0, t - s) for s, t in zip(x.shape, shape)]
    if all(p == 0 for _, p in pads):
        return x
    return jnp.pad(x, pads)


def check_block_sizes(name: str, **blocks: int | None) -> None:
    for key, b in blocks.items():
        if b is None:
            continue
        if not isinstance(b, (int, np.integer)) or b < 8 or b & (b - 1):
            raise ValueError(f"{name}: {key}={b!r} must be a power of two >= 8")


def check_float(name: str, **arrays: Any) -> None:
    for key, a in arrays.items():
        if a is None:
            continue
        if not hasattr(a, "dtype") or not jnp.issubdtype(a.dtype, jnp.floating):
            raise TypeError(f"{name}: {key} must be a floating-point array, got {getattr(a, 'dtype', type(a))}")


def check_same_dtype(name: str, **arrays: Any) -> None:
    items = [(k, a) for k, a in arrays.items() if a is not None]
    first_key, first = items[0]
    for key, a in items[1:]:
        if a.dtype != first.dtype:
            listing = ", ".join(f"{k}: {v.dtype}" for k, v in items)
            raise TypeError(
                f"{name}: dtype mismatch, {key} is {a.dtype} but {first_key} is {first.dtype} "
                f"({listing}); cast them to one dtype"
            )


def check_ndim(name: str, **arrays: tuple[Any, int]) -> None:
    for key, (a, ndim) in arrays.items():
        if a is not None and a.ndim != ndim:
            raise ValueError(f"{name}: {key} must have {ndim} axes, got shape {tuple(a.shape)}")


def shape_error(name: str, what: str, **arrays: Any) -> ValueError:
    listing = ", ".join(f"{k}: {tuple(a.shape)}" for k, a in arrays.items() if a is not None)
    return ValueError(f"{name}: {what} ({listing})")


def check_static_scale(name: str, scale: Any) -> float:
    if isinstance(scale, jax.core.Tracer) or np.ndim(scale) != 0:
        raise TypeError(f"{name}: scale must be a Python number (static), got {type(scale).__name__}")
    return float(scale)


def check_ids(name: str, ids: Any, n: int) -> jax.Array:
    """Integer ids in ``[0, n)``: checked now when concrete (raises), else left to the caller."""
    if not hasattr(ids, "dtype"):
        ids = np.asarray(ids)
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(f"{name}: adapter ids must be integers, got {ids.dtype}")
    if not isinstance(ids, jax.core.Tracer):
        values = np.asarray(ids)
        bad = np.flatnonzero((values < 0) | (values >= n))
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"{name}: adapter index {int(values.reshape(-1)[i])} at position {i} is out of range "
                f"for a pool of {n} adapters ({bad.size} bad entries)"
            )
    return jnp.asarray(ids, jnp.int32)
