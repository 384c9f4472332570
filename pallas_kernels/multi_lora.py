"""Multi-adapter LoRA batch (Punica SGMV / S-LoRA style): kernel, references, XLA baselines.

``y[t] = x[t] W + s[g] (x[t] A[g]) B[g]`` with ``g = ids[t]`` indexing a
stacked pool ``A: [G, in, R]``, ``B: [G, R, out]``, ``s: [G]`` (adapters of a
smaller rank are zero-padded to ``R``). ``x`` is ``[S, ..., in]`` with one id
per leading row (``[T, in]`` with ``[T]`` ids is the per-token case).

Kernel (`multi_lora`): the rows are sorted by adapter and each adapter's rows
are padded to a multiple of ``block_m`` (one gather of ``x``), so every row
tile belongs to one adapter; ``tile_group[i]`` names it. Grid ``(row tiles,
out / block_n)``: a program computes ``x W`` and ``x A[g]`` over ``in`` in
``block_k`` steps (float32), then ``+ s[g] (x A[g]) B[g]``; tiles past the
last adapter's rows are skipped. Two ways of reaching ``A[g]``:

* ``layout="prefetch"`` (TPU; default in interpret mode): ``tile_group`` is a
  scalar-prefetch operand (``pltpu.PrefetchScalarGridSpec``) and the A/B
  BlockSpecs fetch only adapter ``g``'s blocks.
* ``layout="pointer"`` (GPU: Triton has no scalar prefetch): the pool refs
  cover the whole pool and the kernel indexes ``A[g]`` itself.

Both run in interpret mode (tested); neither has been compiled on a GPU/TPU here.

XLA baselines (jnp): `multi_lora_reference` (gather ``A[ids]``, ``B[ids]`` per
leading row, then a batched matmul: with one id per sequence this is the
per-sequence gather that performance.md §2.4 measured fastest on CPU) and
`multi_lora_ragged_dot` (rows sorted by adapter, ``jax.lax.ragged_dot``; dense
g-fold work on CPU).

Bad ids: concrete ids out of ``[0, G)`` raise before anything runs; traced
ids (under ``jit``) cannot raise, so their rows come out NaN.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _common as c

__all__ = ["BlockSizes", "multi_lora", "multi_lora_reference", "multi_lora_ragged_dot", "segment_layout"]

LAYOUTS = ("prefetch", "pointer")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes (powers of two). ``block_m=None``: rows per adapter, rounded (16..128)."""

    block_m: int | None = None
    block_n: int = 128
    block_k: int = 128


def _flatten(x, ids):
    """``x: [S, ..., in] -> [S, L, in]``."""
    return x.reshape(ids.shape[0], -1, x.shape[-1])


def _nan_bad_rows(y, ids, n):
    """Rows whose (traced) id is out of range become NaN."""
    ok = (ids >= 0) & (ids < n)
    return jnp.where(ok.reshape(ok.shape + (1,) * (y.ndim - 1)), y, jnp.asarray(jnp.nan, y.dtype))


def multi_lora_reference(x, w, a_pool, b_pool, scales, ids):
    """Gather + batched matmul: ``A[ids]: [S, in, R]``, ``B[ids]``, one einsum each (jnp)."""
    x3 = _flatten(x, ids)
    safe = jnp.clip(ids, 0, a_pool.shape[0] - 1)
    y = x3 @ w
    h = jnp.einsum("slk,skr->slr", x3.astype(a_pool.dtype), a_pool[safe])
    lora = jnp.einsum("slr,srn->sln", h, b_pool[safe]) * scales[safe].astype(h.dtype)[:, None, None]
    y = y + lora.astype(y.dtype)
    return _nan_bad_rows(y, ids, a_pool.shape[0]).reshape(*x.shape[:-1], w.shape[1])


def multi_lora_ragged_dot(x, w, a_pool, b_pool, scales, ids):
    """Rows sorted by adapter, then ``jax.lax.ragged_dot`` for ``x A`` and ``(x A) B`` (jnp)."""
    x3 = _flatten(x, ids)
    rows = jnp.repeat(jnp.clip(ids, 0, a_pool.shape[0] - 1), x3.shape[1])
    x2 = x3.reshape(-1, x.shape[-1])
    order = jnp.argsort(rows, stable=True)
    sizes = jnp.bincount(rows, length=a_pool.shape[0]).astype(jnp.int32)
    xs = x2[order].astype(a_pool.dtype)
    h = jax.lax.ragged_dot(xs, a_pool, sizes)
    h = h * scales[rows[order]].astype(h.dtype)[:, None]
    lora_sorted = jax.lax.ragged_dot(h, b_pool, sizes)
    lora = jnp.zeros_like(lora_sorted).at[order].set(lora_sorted)
    y = x2 @ w
    y = (y + lora.astype(y.dtype)).reshape(x3.shape[0], x3.shape[1], -1)
    return _nan_bad_rows(y, ids, a_pool.shape[0]).reshape(*x.shape[:-1], w.shape[1])


def segment_layout(rows: jax.Array, n_groups: int, block_m: int):
    """Sorted, per-adapter padded row layout (jit-safe; ``rows`` in ``[0, n_groups)``).

    Returns ``(src, dest, tile_group)``: padded slot -> source row (``T`` for an
    empty slot), row -> its padded slot, and tile -> adapter (``n_groups`` for
    tiles past the end). The tile count is static: ``cdiv(T, block_m) + min(G, T)``.
    """
    t = rows.shape[0]
    n_tiles = c.cdiv(t, block_m) + min(n_groups, t)
    counts = jnp.bincount(rows, length=n_groups)
    tiles = (counts + block_m - 1) // block_m
    tile_end = jnp.cumsum(tiles)
    tile_start = tile_end - tiles
    order = jnp.argsort(rows, stable=True)
    sorted_rows = rows[order]
    row_start = jnp.cumsum(counts) - counts
    dest_sorted = tile_start[sorted_rows] * block_m + jnp.arange(t) - row_start[sorted_rows]
    dest = jnp.zeros(t, jnp.int32).at[order].set(dest_sorted.astype(jnp.int32))
    src = jnp.full(n_tiles * block_m, t, jnp.int32).at[dest].set(jnp.arange(t, dtype=jnp.int32))
    tile_group = jnp.searchsorted(tile_end, jnp.arange(n_tiles), side="right").astype(jnp.int32)
    return src, dest, tile_group


def _kernel(tile_ref, scale_ref, x_ref, w_ref, a_ref, b_ref, o_ref, *, block_k, n_groups, layout):
    i, j = pl.program_id(0), pl.program_id(1)
    g = tile_ref[i]
    block_m, block_n = o_ref.shape

    @pl.when(g < n_groups)
    def _():
        if layout == "prefetch":  # blocks of adapter g only
            a_g, b_g = a_ref.at[0], b_ref.at[0]
        else:  # whole pool: index it here
            a_g, b_g = a_ref.at[g], b_ref.at[g, :, pl.ds(pl.multiple_of(j * block_n, block_n), block_n)]

        def body(k, carry):
            acc, h = carry
            ks = pl.ds(pl.multiple_of(k * block_k, block_k), block_k)
            x = x_ref[:, ks]
            acc += jnp.dot(x, w_ref[ks, :], preferred_element_type=jnp.float32)
            a = a_g[ks, :]
            h += jnp.dot(x.astype(a.dtype), a, preferred_element_type=jnp.float32)
            return acc, h

        acc = jnp.zeros((block_m, block_n), jnp.float32)
        h = jnp.zeros((block_m, a_ref.shape[-1]), jnp.float32)
        acc, h = jax.lax.fori_loop(0, x_ref.shape[1] // block_k, body, (acc, h))
        b = b_g[...]
        lora = jnp.dot(h.astype(b.dtype), b, preferred_element_type=jnp.float32)
        o_ref[...] = (acc + scale_ref[g].astype(jnp.float32) * lora).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret", "layout"))
def _multi_lora(x, w, a_pool, b_pool, scales, ids, *, block_sizes: BlockSizes, interpret: bool, layout: str):
    x3 = _flatten(x, ids)
    n_groups, k, r = a_pool.shape
    n = w.shape[1]
    rows = jnp.repeat(jnp.clip(ids, 0, n_groups - 1), x3.shape[1])
    x2 = x3.reshape(-1, k)
    t = x2.shape[0]
    bm = block_sizes.block_m or min(128, max(c.MIN_BLOCK, c.next_pow2(c.cdiv(t, min(n_groups, t)))))
    bn, bk = c.fit_block(n, block_sizes.block_n), c.fit_block(k, block_sizes.block_k)
    np_, kp, rp = c.round_up(n, bn), c.round_up(k, bk), c.whole(r)
    src, dest, tile_group = segment_layout(rows, n_groups, bm)
    scales = scales.astype(jnp.float32)
    n_tiles = tile_group.shape[0]
    xs = c.pad_to(jnp.concatenate([x2, jnp.zeros((1, k), x2.dtype)])[src], (n_tiles * bm, kp))
    w = c.pad_to(w, (kp, np_))
    a_pool = c.pad_to(a_pool, (n_groups, kp, rp))
    b_pool = c.pad_to(b_pool, (n_groups, rp, np_))
    kernel = functools.partial(_kernel, block_k=bk, n_groups=n_groups, layout=layout)
    out_shape = jax.ShapeDtypeStruct((n_tiles * bm, np_), x.dtype)
    params = None if interpret else c.compiler_params(2)
    if layout == "prefetch":
        from jax.experimental.pallas import tpu as pltpu

        last = n_groups - 1
        grid_spec = pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(n_tiles, np_ // bn),
            in_specs=[
                pl.BlockSpec((bm, kp), lambda i, j, tg, s: (i, 0)),
                pl.BlockSpec((kp, bn), lambda i, j, tg, s: (0, j)),
                pl.BlockSpec((1, kp, rp), lambda i, j, tg, s: (jnp.minimum(tg[i], last), 0, 0)),
                pl.BlockSpec((1, rp, bn), lambda i, j, tg, s: (jnp.minimum(tg[i], last), 0, j)),
            ],
            out_specs=pl.BlockSpec((bm, bn), lambda i, j, tg, s: (i, j)),
        )
        out = pl.pallas_call(
            kernel,
            out_shape=out_shape,
            grid_spec=grid_spec,
            compiler_params=params,
            interpret=interpret,
            name="multi_lora",
        )(tile_group, scales, xs, w, a_pool, b_pool)
    else:
        # Triton wants power-of-two shapes: pad the small index/scale vectors too
        tg = c.pad_to(tile_group, (c.next_pow2(n_tiles),))
        sc = c.pad_to(scales, (c.next_pow2(n_groups),))
        full = lambda shape: pl.BlockSpec(shape, lambda i, j: (0,) * len(shape))  # noqa: E731
        out = pl.pallas_call(
            kernel,
            out_shape=out_shape,
            grid=(n_tiles, np_ // bn),
            in_specs=[
                full(tg.shape),
                full(sc.shape),
                pl.BlockSpec((bm, kp), lambda i, j: (i, 0)),
                pl.BlockSpec((kp, bn), lambda i, j: (0, j)),
                full(a_pool.shape),
                full(b_pool.shape),
            ],
            out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
            compiler_params=params,
            interpret=interpret,
            name="multi_lora",
        )(tg, sc, xs, w, a_pool, b_pool)
    y = out[dest, :n].reshape(x3.shape[0], x3.shape[1], n)
    return _nan_bad_rows(y, ids, n_groups).reshape(*x.shape[:-1], n)


def _validate(x, w, a_pool, b_pool, scales, ids):
    name = "multi_lora"
    c.check_float(name, x=x, w=w, a_pool=a_pool, b_pool=b_pool, scales=scales)
    c.check_ndim(name, w=(w, 2), a_pool=(a_pool, 3), b_pool=(b_pool, 3), scales=(scales, 1))
    k, n = w.shape
    g, ka, r = a_pool.shape
    if x.ndim < 2 or x.shape[-1] != k or ka != k:
        raise c.shape_error(
            name,
            f"x must be [S, ..., in] and A pool [G, in, R] with in = {k} (W's input size)",
            x=x,
            w=w,
            a_pool=a_pool,
        )
    if b_pool.shape != (g, r, n) or scales.shape != (g,):
        raise c.shape_error(
            name,
            f"B pool must be [G, R, out] = [{g}, {r}, {n}] and scales [G] = [{g}]",
            a_pool=a_pool,
            b_pool=b_pool,
            scales=scales,
            w=w,
        )
    if getattr(ids, "shape", None) != (x.shape[0],):
        raise ValueError(
            f"{name}: ids must be [S] with one adapter index per leading row of x "
            f"(x: {tuple(x.shape)}, ids: {tuple(getattr(ids, 'shape', ()))})"
        )
    c.check_same_dtype(name, x=x, w=w)
    c.check_same_dtype(name, a_pool=a_pool, b_pool=b_pool)
    return c.check_ids(name, ids, g)


def multi_lora(
    x,
    w,
    a_pool,
    b_pool,
    scales,
    ids,
    *,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
    layout: str | None = None,
) -> jax.Array:
    """``x W + s[ids] (x A[ids]) B[ids]`` in one Pallas kernel (forward only: serving).

    Args:
      x: ``[S, ..., in]``; leading row ``i`` uses adapter ``ids[i]``.
      w: ``[in, out]`` shared base weight (same dtype as ``x``).
      a_pool, b_pool: ``[G, in, R]``, ``[G, R, out]`` (one dtype; zero-padded ranks).
      scales: ``[G]`` per-adapter LoRA scales.
      ids: ``[S]`` integers in ``[0, G)``.
      block_sizes, interpret: see `BlockSizes` and `pallas_kernels` (``None``: interpret on CPU).
      layout: ``"prefetch"`` or ``"pointer"`` (``None``: pointer on GPU, else prefetch).
    """
    ids = _validate(x, w, a_pool, b_pool, scales, ids)
    block_sizes = block_sizes or BlockSizes()
    c.check_block_sizes("multi_lora", **dataclasses.asdict(block_sizes))
    if layout is None:
        layout = "pointer" if jax.default_backend() == "gpu" else "prefetch"
    if layout not in LAYOUTS:
        raise ValueError(f"multi_lora: layout must be one of {LAYOUTS}, got {layout!r}")
    mode = c.resolve_mode("multi_lora", interpret)
    if mode == "reference":
        return multi_lora_reference(x, w, a_pool, b_pool, scales, ids)
    return _multi_lora(
        x, w, a_pool, b_pool, scales, ids, block_sizes=block_sizes, interpret=mode == "interpret", layout=layout
    )
