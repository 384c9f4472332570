"""Fused LoRA linear ``y = x W + s (x A) B``: Pallas kernel, custom_vjp, jnp reference.

Forward kernel: grid ``(rows of x / block_m, columns of W / block_n)``. Each
program walks the contraction axis in ``block_k`` steps, accumulating
``x W`` (``[block_m, block_n]``) and the rank-``r`` intermediate ``x A``
(``[block_m, r]``) in float32 side by side; it then adds ``s (x A) B`` for its
column block and writes ``y`` once. ``x A`` never goes to memory (it is
recomputed per column block: ``r / block_n`` extra work).

Backward (`jax.custom_vjp`; ``jax.grad`` through a raw ``pallas_call`` fails),
every product a Pallas kernel:

* Residual: when ``B`` is differentiated the forward kernel also writes
  ``h = x A`` (``[M, r]``, adapter dtype; written once per row block by its
  first column block, so that grid axis is sequential on TPU), so the
  backward does not recompute it.
* ``dx = dy Wᵀ + s (dy Bᵀ) Aᵀ`` is the same fused kernel run on ``dy`` with
  ``W`` read transposed (no copy of ``W``), ``A := Bᵀ`` and ``B := Aᵀ``. Its
  rank-``r`` intermediate is ``g = dy Bᵀ``, which it emits the same way when
  ``A`` is differentiated. When ``dx`` is not needed (``x`` not
  differentiated) a small kernel (`_project`, grid over row blocks, walking
  ``N``) computes ``g`` alone.
* ``dA = s xᵀ g`` (`_grad_a`): grid over ``K / block_k``; each program keeps
  its ``[block_k, r]`` float32 accumulator on chip and walks ``M`` in
  ``block_m`` tiles of ``x`` and ``g``.
* ``dB = s hᵀ dy`` (`_grad_b`): grid over ``N / block_n``; each program keeps
  its ``[r, block_n]`` float32 accumulator on chip and walks ``M`` in tiles of
  ``h`` and ``dy``. Both reduce over ``M`` inside the kernel (no cross-program
  accumulation, which Triton cannot do); with few ``K`` / ``N`` blocks that is
  little parallelism for a long ``M`` (a split-``M`` partial-sum pass is the
  known next step, not done).
* ``dW = xᵀ dy`` (jnp) is computed only when ``W`` is differentiated
  (symbolic zeros): LoRA training never forms it. ``dx``, ``dA`` and ``dB``
  are likewise skipped when ``x``, ``A`` or ``B`` is not differentiated.

Dtypes follow `lorajax.variants.lora.apply`: ``x`` and ``W`` share one dtype
(the output's), ``A`` and ``B`` share one (often float32); ``x A`` is
computed in the adapter dtype, every product accumulates in float32. ``h``,
``g``, ``dA`` and ``dB`` come out in the adapter dtype (``x`` and ``dy`` are
cast to it tile by tile inside the kernels), ``dx`` in ``x``'s.
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


def _kernel(x_ref, w_ref, a_ref, b_ref, o_ref, *h_ref, scale: float, block_k: int, w_transposed: bool):
    block_m, block_n = o_ref.shape
    rank = a_ref.shape[1]

    def body(k, carry):
        acc, h = carry
        ks = pl.ds(pl.multiple_of(k * block_k, block_k), block_k)
        x = x_ref[:, ks]
        if w_transposed:  # w_ref block is [block_n, K]
            acc += jax.lax.dot_general(x, w_ref[:, ks], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
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
    h = h.astype(b.dtype)
    lora = jnp.dot(h, b, preferred_element_type=jnp.float32)
    o_ref[...] = (acc + scale * lora).astype(o_ref.dtype)
    if h_ref:  # every column block holds the same h: the first one writes it

        @pl.when(pl.program_id(1) == 0)
        def _():
            h_ref[0][...] = h.astype(h_ref[0].dtype)


@functools.partial(jax.jit, static_argnames=("scale", "block_sizes", "interpret", "w_transposed", "emit_h"))
def _forward(
    x,
    w,
    a,
    b,
    *,
    scale: float,
    block_sizes: BlockSizes,
    interpret: bool,
    w_transposed: bool = False,
    emit_h: bool = False,
):
    """The kernel on 2-D ``x: [M, K]``; ``w: [K, N]`` (or ``[N, K]`` with ``w_transposed``).

    Returns ``y``, or ``(y, h)`` with ``emit_h``: ``h = x A`` (``[M, r]``, the
    adapter dtype), written once per row block by its first column block.
    """
    m, k = x.shape
    n = w.shape[0] if w_transposed else w.shape[1]
    r = a.shape[1]
    bm, bn, bk = (
        c.fit_block(m, block_sizes.block_m),
        c.fit_block(n, block_sizes.block_n),
        c.fit_block(k, block_sizes.block_k),
    )
    mp, np_, kp, rp = c.round_up(m, bm), c.round_up(n, bn), c.round_up(k, bk), c.whole(r)
    x = c.pad_to(x, (mp, kp))
    w = c.pad_to(w, (np_, kp) if w_transposed else (kp, np_))
    a = c.pad_to(a, (kp, rp))
    b = c.pad_to(b, (rp, np_))
    w_spec = (
        pl.BlockSpec((bn, kp), lambda i, j: (j, 0)) if w_transposed else pl.BlockSpec((kp, bn), lambda i, j: (0, j))
    )
    out_shape = [jax.ShapeDtypeStruct((mp, np_), x.dtype)]
    out_specs = [pl.BlockSpec((bm, bn), lambda i, j: (i, j))]
    if emit_h:  # one [bm, r] block per row block, shared by its column blocks (sequential on TPU)
        out_shape.append(jax.ShapeDtypeStruct((mp, rp), a.dtype))
        out_specs.append(pl.BlockSpec((bm, rp), lambda i, j: (i, 0)))
    itemsize = x.dtype.itemsize
    out = pl.pallas_call(
        functools.partial(_kernel, scale=scale, block_k=bk, w_transposed=w_transposed),
        out_shape=out_shape,
        grid=(mp // bm, np_ // bn),
        in_specs=[
            pl.BlockSpec((bm, kp), lambda i, j: (i, 0)),
            w_spec,
            pl.BlockSpec((kp, rp), lambda i, j: (0, 0)),
            pl.BlockSpec((rp, bn), lambda i, j: (0, j)),
        ],
        out_specs=out_specs,
        compiler_params=None if interpret else c.compiler_params(2, sequential=(1,) if emit_h else ()),
        cost_estimate=pl.CostEstimate(
            flops=2 * mp * kp * np_ + 2 * mp * rp * (kp * (np_ // bn) + np_),
            transcendentals=0,
            bytes_accessed=itemsize * (mp * kp * (np_ // bn) + kp * np_ + mp * np_)
            + (a.dtype.itemsize * mp * rp if emit_h else 0),
        ),
        interpret=interpret,
        name="lora_linear",
    )(x, w, a, b)
    if emit_h:
        return out[0][:m, :n], out[1][:m, :r]
    return out[0][:m, :n]


def _project_kernel(x_ref, a_ref, h_ref, *, block_k: int):
    """``h = x A`` for one row block, walking the contraction axis (f32 accumulation)."""
    block_m, rank = h_ref.shape

    def body(k, h):
        ks = pl.ds(pl.multiple_of(k * block_k, block_k), block_k)
        a = a_ref[ks, :]
        return h + jnp.dot(x_ref[:, ks].astype(a.dtype), a, preferred_element_type=jnp.float32)

    h = jax.lax.fori_loop(0, x_ref.shape[1] // block_k, body, jnp.zeros((block_m, rank), jnp.float32))
    h_ref[...] = h.astype(h_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def _project(x, a, *, block_sizes: BlockSizes, interpret: bool):
    """``x A`` (``x: [M, K]``, ``A: [K, r]``) in A's dtype: grid over row blocks of ``x``.

    The backward's ``g = dy Bᵀ`` when ``dx`` (whose kernel emits ``g``) is not needed.
    """
    m, k = x.shape
    r = a.shape[1]
    bm, bk = c.fit_block(m, block_sizes.block_m), c.fit_block(k, block_sizes.block_k)
    mp, kp, rp = c.round_up(m, bm), c.round_up(k, bk), c.whole(r)
    out = pl.pallas_call(
        functools.partial(_project_kernel, block_k=bk),
        out_shape=jax.ShapeDtypeStruct((mp, rp), a.dtype),
        grid=(mp // bm,),
        in_specs=[pl.BlockSpec((bm, kp), lambda i: (i, 0)), pl.BlockSpec((kp, rp), lambda i: (0, 0))],
        out_specs=pl.BlockSpec((bm, rp), lambda i: (i, 0)),
        compiler_params=None if interpret else c.compiler_params(1),
        cost_estimate=pl.CostEstimate(
            flops=2 * mp * kp * rp,
            transcendentals=0,
            bytes_accessed=x.dtype.itemsize * mp * kp + a.dtype.itemsize * rp * (kp + mp),
        ),
        interpret=interpret,
        name="lora_linear_project",
    )(c.pad_to(x, (mp, kp)), c.pad_to(a, (kp, rp)))
    return out[:m, :r]


def _tn_kernel(p_ref, q_ref, o_ref, *, scale: float, block_m: int):
    """``o = s pᵀ q`` for one output block, reducing over the rows in ``block_m`` tiles.

    Both operands are cast to the output (adapter) dtype tile by tile; f32 accumulation.
    """
    dt = o_ref.dtype

    def body(i, acc):
        ms = pl.ds(pl.multiple_of(i * block_m, block_m), block_m)
        return acc + jax.lax.dot_general(
            p_ref[ms, :].astype(dt),
            q_ref[ms, :].astype(dt),
            (((0,), (0,)), ((), ())),
            preferred_element_type=jnp.float32,
        )

    acc = jax.lax.fori_loop(0, p_ref.shape[0] // block_m, body, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = (scale * acc).astype(dt)


@functools.partial(jax.jit, static_argnames=("scale", "block_m", "block_split", "split", "interpret", "name"))
def _tn(p, q, *, scale: float, block_m: int, block_split: int, split: int, interpret: bool, name: str):
    """``s pᵀ q`` (``p: [M, P]``, ``q: [M, Q]``) in the dtype of the rank-sized operand, reduced over ``M``.

    The wide operand (``p`` when ``split == 0``, else ``q``) is cut into
    ``block_split``-column blocks, one program each; the narrow (rank-sized)
    one is read whole. Each program holds its f32 accumulator and walks ``M``
    in ``block_m`` tiles (`_tn_kernel`).
    """
    m = p.shape[0]
    wide, narrow = (p, q) if split == 0 else (q, p)
    r = narrow.shape[1]
    bm, bs = c.fit_block(m, block_m), c.fit_block(wide.shape[1], block_split)
    mp, sp, rp = c.round_up(m, bm), c.round_up(wide.shape[1], bs), c.whole(r)
    wide_spec = pl.BlockSpec((mp, bs), lambda i: (0, i))
    narrow_spec = pl.BlockSpec((mp, rp), lambda i: (0, 0))
    if split == 0:
        in_specs, shape, out_spec = [wide_spec, narrow_spec], (sp, rp), pl.BlockSpec((bs, rp), lambda i: (i, 0))
    else:
        in_specs, shape, out_spec = [narrow_spec, wide_spec], (rp, sp), pl.BlockSpec((rp, bs), lambda i: (0, i))
    padded = [c.pad_to(wide, (mp, sp)), c.pad_to(narrow, (mp, rp))]
    out = pl.pallas_call(
        functools.partial(_tn_kernel, scale=scale, block_m=bm),
        out_shape=jax.ShapeDtypeStruct(shape, narrow.dtype),
        grid=(sp // bs,),
        in_specs=in_specs,
        out_specs=out_spec,
        compiler_params=None if interpret else c.compiler_params(1),
        cost_estimate=pl.CostEstimate(
            flops=2 * mp * sp * rp,
            transcendentals=0,
            bytes_accessed=wide.dtype.itemsize * mp * sp + narrow.dtype.itemsize * rp * (mp * (sp // bs) + sp),
        ),
        interpret=interpret,
        name=name,
    )(*(padded if split == 0 else padded[::-1]))
    return out[: wide.shape[1], :r] if split == 0 else out[:r, : wide.shape[1]]


def _grad_a(x, g, *, scale: float, block_sizes: BlockSizes, interpret: bool):
    """``dA = s xᵀ g`` (``x: [M, K]``, ``g = dy Bᵀ: [M, r]``) in g's dtype: grid over ``K / block_k``."""
    return _tn(
        x,
        g,
        scale=scale,
        block_m=block_sizes.block_m,
        block_split=block_sizes.block_k,
        split=0,
        interpret=interpret,
        name="lora_linear_grad_a",
    )


def _grad_b(h, dy, *, scale: float, block_sizes: BlockSizes, interpret: bool):
    """``dB = s hᵀ dy`` (``h = x A: [M, r]``, ``dy: [M, N]``) in h's dtype: grid over ``N / block_n``."""
    return _tn(
        h,
        dy,
        scale=scale,
        block_m=block_sizes.block_m,
        block_split=block_sizes.block_n,
        split=1,
        interpret=interpret,
        name="lora_linear_grad_b",
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _lora_linear(x, w, a, b, scale, block_sizes, interpret):
    return _forward(x, w, a, b, scale=scale, block_sizes=block_sizes, interpret=interpret)


def _fwd(x, w, a, b, scale, block_sizes, interpret):
    need = (x.perturbed, w.perturbed, a.perturbed, b.perturbed)
    out = _forward(
        x.value,
        w.value,
        a.value,
        b.value,
        scale=scale,
        block_sizes=block_sizes,
        interpret=interpret,
        emit_h=b.perturbed,
    )  # h = x A is dB's residual
    y, h = out if b.perturbed else (out, None)
    return y, (x.value, w.value, a.value, b.value, h, need)


def _bwd(scale, block_sizes, interpret, res, dy):
    x, w, a, b, h, (need_dx, need_dw, need_da, need_db) = res
    if isinstance(dy, SymbolicZero):
        return None, None, None, None
    kw = dict(block_sizes=block_sizes, interpret=interpret)
    dx = g = None
    if need_dx:  # dx = dy Wᵀ + s (dy Bᵀ) Aᵀ: the forward kernel with W read transposed, A := Bᵀ, B := Aᵀ
        out = _forward(dy, w, b.T, a.T, scale=scale, w_transposed=True, emit_h=need_da, **kw)
        dx, g = out if need_da else (out, None)  # ... which also emits g = dy Bᵀ
    elif need_da:
        g = _project(dy, b.T, **kw)
    da = _grad_a(x, g, scale=scale, **kw) if need_da else None
    db = _grad_b(h, dy, scale=scale, **kw) if need_db else None
    dw = jnp.dot(x.T, dy, preferred_element_type=jnp.float32).astype(w.dtype) if need_dw else None
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
        raise c.shape_error(name, f"the last axis of x and the first of A must equal W's input size {k}", x=x, w=w, a=a)
    if b.shape != (a.shape[1], n):
        raise c.shape_error(name, f"B must be [rank, out] = [{a.shape[1]}, {n}]", w=w, a=a, b=b)
    c.check_same_dtype(name, x=x, w=w)
    c.check_same_dtype(name, a=a, b=b)


def lora_linear(
    x: jax.Array,
    w: jax.Array,
    a: jax.Array,
    b: jax.Array,
    scale: float = 1.0,
    *,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
) -> jax.Array:
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
