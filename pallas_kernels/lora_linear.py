"""Fused LoRA linear ``y = x W + s (x A) B``: Pallas kernel, custom_vjp, jnp reference.

Forward kernel: grid ``(rows of x / block_m, columns of W / block_n)``. Each
program walks the contraction axis in ``block_k`` steps, accumulating
``x W`` (``[block_m, block_n]``) and the rank-``r`` intermediate ``x A``
(``[block_m, r]``) in float32 side by side; it then adds ``s (x A) B`` for its
column block and writes ``y`` once. ``x A`` never goes to memory (it is
recomputed per column block: ``r / block_n`` extra work).

Backward (`jax.custom_vjp`; ``jax.grad`` through a raw ``pallas_call`` fails):

* ``dx = dy Wᵀ + s (dy Bᵀ) Aᵀ`` is the same fused kernel run on ``dy`` with
  ``W`` read transposed (no copy of ``W``), ``A := Bᵀ`` and ``B := Aᵀ``.
* ``dA = s xᵀ (dy Bᵀ)`` and ``dB = s (x A)ᵀ dy`` are thin jnp matmuls.
* ``dW = xᵀ dy`` is computed only when ``W`` is differentiated (symbolic
  zeros): LoRA training never forms it. ``dx`` is likewise skipped when ``x``
  is not differentiated.

Dtypes follow `lorajax.variants.lora.apply`: ``x`` and ``W`` share one dtype
(the output's), ``A`` and ``B`` share one (often float32); ``x A`` is
computed in the adapter dtype, every product accumulates in float32.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero
from jax.experimental import pallas as pl

from pallas_kernels import _common as c

__all__ = ["BlockSizes", "lora_linear", "lora_linear_reference"]


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes (powers of two); a smaller dimension gets a smaller block."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 128


def lora_linear_reference(x: jax.Array, w: jax.Array, a: jax.Array, b: jax.Array, scale: float = 1.0) -> jax.Array:
    """``x W + s (x A) B`` in jnp, exactly as `lorajax.variants.lora.apply`."""
    y = x @ w
    h = x.astype(a.dtype) @ a
    return y + (scale * (h @ b)).astype(y.dtype)


def _kernel(x_ref, w_ref, a_ref, b_ref, o_ref, *, scale: float, block_k: int, w_transposed: bool):
    block_m, block_n = o_ref.shape
    rank = a_ref.shape[1]

    def body(k, carry):
        acc, h = carry
        ks = pl.ds(pl.multiple_of(k * block_k, block_k), block_k)
        x = x_ref[:, ks]
        if w_transposed:  # w_ref block is [block_n, K]
            acc += jax.lax.dot_general(x, w_ref[:, ks], (((1,), (1,)), ((), ())),
                                       preferred_element_type=jnp.float32)
        else:
            acc += jnp.dot(x, w_ref[ks, :], preferred_element_type=jnp.float32)
        a = a_ref[ks, :]
        h += jnp.dot(x.astype(a.dtype), a, preferred_element_type=jnp.float32)
        return acc, h

    n_k = x_ref.shape[1] // block_k
    acc = jnp.zeros((block_m, block_n), jnp.float32)
    h = jnp.zeros((block_m, rank), jnp.float32)
    acc, h = jax.lax.fori_loop(0, n_k, body, (acc, h))
    b = b_ref[...]
    lora = jnp.dot(h.astype(b.dtype), b, preferred_element_type=jnp.float32)
    o_ref[...] = (acc + scale * lora).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "block_sizes", "interpret", "w_transposed"))
def _forward(x, w, a, b, *, scale: float, block_sizes: BlockSizes, interpret: bool, w_transposed: bool = False):
    """The kernel on 2-D ``x: [M, K]``; ``w: [K, N]`` (or ``[N, K]`` with ``w_transposed``)."""
    m, k = x.shape
    n = w.shape[0] if w_transposed else w.shape[1]
    r = a.shape[1]
    bm, bn, bk = (c.fit_block(m, block_sizes.block_m), c.fit_block(n, block_sizes.block_n),
                  c.fit_block(k, block_sizes.block_k))
    mp, np_, kp, rp = c.round_up(m, bm), c.round_up(n, bn), c.round_up(k, bk), c.whole(r)
    x = c.pad_to(x, (mp, kp))
    w = c.pad_to(w, (np_, kp) if w_transposed else (kp, np_))
    a = c.pad_to(a, (kp, rp))
    b = c.pad_to(b, (rp, np_))
    w_spec = (pl.BlockSpec((bn, kp), lambda i, j: (j, 0)) if w_transposed
              else pl.BlockSpec((kp, bn), lambda i, j: (0, j)))
    itemsize = x.dtype.itemsize
    out = pl.pallas_call(
        functools.partial(_kernel, scale=scale, block_k=bk, w_transposed=w_transposed),
        out_shape=jax.ShapeDtypeStruct((mp, np_), x.dtype),
        grid=(mp // bm, np_ // bn),
        in_specs=[
            pl.BlockSpec((bm, kp), lambda i, j: (i, 0)),
            w_spec,
            pl.BlockSpec((kp, rp), lambda i, j: (0, 0)),
            pl.BlockSpec((rp, bn), lambda i, j: (0, j)),
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        compiler_params=None if interpret else c.compiler_params(2),
        cost_estimate=pl.CostEstimate(
            flops=2 * mp * kp * np_ + 2 * mp * rp * (kp * (np_ // bn) + np_), transcendentals=0,
            bytes_accessed=itemsize * (mp * kp * (np_ // bn) + kp * np_ + mp * np_)),
        interpret=interpret,
        name="lora_linear",
    )(x, w, a, b)
    return out[:m, :n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _lora_linear(x, w, a, b, scale, block_sizes, interpret):
    return _forward(x, w, a, b, scale=scale, block_sizes=block_sizes, interpret=interpret)


def _fwd(x, w, a, b, scale, block_sizes, interpret):
    y = _forward(x.value, w.value, a.value, b.value, scale=scale, block_sizes=block_sizes, interpret=interpret)
    return y, (x.value, w.value, a.value, b.value, x.perturbed, w.perturbed)


def _bwd(scale, block_sizes, interpret, res, dy):
    x, w, a, b, need_dx, need_dw = res
    if isinstance(dy, SymbolicZero):
        return None, None, None, None
    f32 = jnp.float32
    # dx = dy Wᵀ + s (dy Bᵀ) Aᵀ: the forward kernel with W read transposed, A := Bᵀ, B := Aᵀ
    dx = _forward(dy, w, b.T, a.T, scale=scale, block_sizes=block_sizes, interpret=interpret,
                  w_transposed=True) if need_dx else None
    dy_a = dy.astype(a.dtype)
    dh = scale * jnp.dot(dy_a, b.T, preferred_element_type=f32)          # [M, r]
    h = jnp.dot(x.astype(a.dtype), a, preferred_element_type=f32)        # [M, r]
    da = jnp.dot(x.astype(a.dtype).T, dh.astype(a.dtype), preferred_element_type=f32).astype(a.dtype)
    db = (scale * jnp.dot(h.astype(a.dtype).T, dy_a, preferred_element_type=f32)).astype(b.dtype)
    dw = jnp.dot(x.T, dy, preferred_element_type=f32).astype(w.dtype) if need_dw else None
    return dx, dw, da, db


_lora_linear.defvjp(_fwd, _bwd, symbolic_zeros=True)


def _validate(x, w, a, b) -> None:
    name = "lora_linear"
    c.check_float(name, x=x, w=w, a=a, b=b)
    c.check_ndim(name, w=(w, 2), a=(a, 2), b=(b, 2))
    if x.ndim < 1:
        raise c.shape_error(name, "x must have at least one axis", x=x)
    k, n = w.shape
    if x.shape[-1] != k or a.shape[0] != k:
        raise c.shape_error(name, f"the last axis of x and the first of A must equal W's input size {k}",
                            x=x, w=w, a=a)
    if b.shape != (a.shape[1], n):
        raise c.shape_error(name, f"B must be [rank, out] = [{a.shape[1]}, {n}]", w=w, a=a, b=b)
    c.check_same_dtype(name, x=x, w=w)
    c.check_same_dtype(name, a=a, b=b)


def lora_linear(x: jax.Array, w: jax.Array, a: jax.Array, b: jax.Array, scale: float = 1.0, *,
                block_sizes: BlockSizes | None = None, interpret: bool | None = None) -> jax.Array:
    """Fused ``x W + scale (x A) B`` for ``x: [..., in]``, ``W: [in, out]``, ``A: [in, r]``, ``B: [r, out]``.

    Differentiable in ``x``, ``A``, ``B`` (and ``W``, whose gradient is only
    formed when asked for). ``scale`` is a Python number. ``interpret``:
    ``None`` picks interpret mode on CPU and the compiled kernel on GPU/TPU;
    on a backend without a lowering the jnp reference runs (one warning).
    Raises ValueError / TypeError on shapes or dtypes that do not fit, before
    anything is launched.
    """
    _validate(x, w, a, b)
    scale = c.check_static_scale("lora_linear", scale)
    block_sizes = block_sizes or BlockSizes()
    c.check_block_sizes("lora_linear", **dataclasses.asdict(block_sizes))
    mode = c.resolve_mode("lora_linear", interpret)
    if mode == "reference":
        return lora_linear_reference(x, w, a, b, scale)
    lead = x.shape[:-1]
    x2 = x.reshape(math.prod(lead), x.shape[-1])
    y = _lora_linear(x2, w, a, b, scale, block_sizes, mode == "interpret")
    return y.reshape(*lead, w.shape[1])
