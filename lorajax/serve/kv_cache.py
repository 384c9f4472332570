"""Paged KV cache: fixed-size blocks in one pool per layer, a block table per sequence.

The cache of every running sequence lives in one pool per layer and per K/V,
``[num_blocks + 1, block_size, kv_heads, head_dim]``. Block 0 is the *null
block*: unused block-table entries point at it and writes of padded positions
(prefill padding, idle decode rows) land in it; it is never read unmasked. A
sequence's token at position ``p`` lives at ``pool[table[p // block_size],
p % block_size]``. Blocks are handed out on the host by `BlockAllocator` as a
sequence grows, so memory follows the actual lengths, not ``max_len``
(vLLM's PagedAttention; the jnp reference here gathers a sequence's blocks into
a contiguous view inside ``jit`` and runs the model's own dense attention on it).

Shapes: ``table [M]`` int32 with ``M = ceil(max_len / block_size)`` entries
per sequence; `gather` gives the contiguous view ``[M·block_size, K, d]``;
`scatter` writes ``[R, S, K, d]`` new entries for ``R`` sequences at
positions ``start_R + arange(S)``.

References:
  W. Kwon et al., "Efficient Memory Management for Large Language Model Serving
  with PagedAttention", SOSP 2023, arXiv:2309.06180; vLLM
  ``vllm/core/block_manager.py`` (block tables, free-block pool) and its
  reference ``paged_attention`` test (gather the blocks, then attend).

Example:
  >>> import jax.numpy as jnp
  >>> alloc = BlockAllocator(4)
  >>> blocks = alloc.allocate(2); alloc.num_free
  2
  >>> alloc.free(blocks); alloc.num_free
  4
  >>> pool = jnp.arange(5 * 2 * 1 * 1, dtype=jnp.float32).reshape(5, 2, 1, 1)
  >>> gather(pool, jnp.array([3, 1], jnp.int32))[:, 0, 0].tolist()
  [6.0, 7.0, 2.0, 3.0]
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["NULL_BLOCK", "BlockAllocator", "init_pool", "gather", "scatter", "blocks_needed", "pool_bytes"]

#: the block that unused table entries point at (never allocated)
NULL_BLOCK = 0


def blocks_needed(length: int, block_size: int) -> int:
    """Blocks that hold ``length`` tokens: ``ceil(length / block_size)``."""
    return -(-int(length) // int(block_size))


class BlockAllocator:
    """Host-side free list of the blocks ``1 .. num_blocks`` (block 0 is `NULL_BLOCK`).

    ``allocate(n)`` returns ``n`` block ids (ValueError when fewer are free:
    check `num_free` first); ``free(ids)`` returns them. ``num_used`` is the
    number of blocks held by sequences.
    """

    def __init__(self, num_blocks: int):
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be a positive int, got {num_blocks!r}")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks, 0, -1))  # pop() hands out the lowest id first
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise ValueError(f"asked for {n} KV blocks, {len(self._free)} free of {self.num_blocks}")
        out = [self._free.pop() for _ in range(n)]
        self._used.update(out)
        return out

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            if b not in self._used:
                raise ValueError(f"KV block {b} is not allocated")
            self._used.remove(b)
            self._free.append(b)
        self._free.sort(reverse=True)


def init_pool(num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int, dtype: Any) -> tuple:
    """Zeros: per layer ``{"k", "v"}`` of ``[num_blocks + 1, block_size, kv_heads, head_dim]`` (+1: `NULL_BLOCK`)."""
    shape = (num_blocks + 1, block_size, kv_heads, head_dim)
    return tuple({"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(num_layers))


def pool_bytes(pool: tuple) -> int:
    """Bytes held by a pool from `init_pool`."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(pool))


def gather(pool_NxBxKxd: jax.Array, table_M: jax.Array) -> jax.Array:
    """A sequence's contiguous cache ``[M·block_size, K, d]`` from its block table ``[M]``."""
    blocks = pool_NxBxKxd[table_M]  # [M, bs, K, d]
    return blocks.reshape((-1,) + pool_NxBxKxd.shape[2:])


def scatter(pool_NxBxKxd: jax.Array, table_RxM: jax.Array, start_R: jax.Array, new_RxSxKxd: jax.Array) -> jax.Array:
    """Write ``new[r, i]`` at position ``start[r] + i`` of sequence ``r`` (through its table row ``[M]``).

    Positions past the table (``>= M·block_size``) are dropped.
    """
    bs = pool_NxBxKxd.shape[1]
    R, S = new_RxSxKxd.shape[:2]
    pos_RxS = start_R[:, None] + jnp.arange(S, dtype=jnp.int32)[None, :]
    idx = jnp.minimum(pos_RxS // bs, table_RxM.shape[1] - 1)
    block_RxS = jnp.take_along_axis(table_RxM, idx, axis=1)
    block_RxS = jnp.where(pos_RxS < table_RxM.shape[1] * bs, block_RxS, NULL_BLOCK)
    return pool_NxBxKxd.at[block_RxS, pos_RxS % bs].set(new_RxSxKxd.astype(pool_NxBxKxd.dtype))
