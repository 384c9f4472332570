"""Grouped-query attention cores: the dense reference and a blockwise path that cuts the queries into blocks.

Both compute, per query head ``h`` reading kv head ``h // G``,
``softmax(q kᵀ / sqrt(d) + mask) v`` with the scores and the softmax in float32
(as HF's eager attention), on ``q [B, S, K, G, d]``, ``k, v [B, T, K, d]`` and a
boolean ``mask [B, S, T]`` (True = the query may read the key). They return
``o [B, S, K, G, d]`` in ``v``'s dtype.

* `dense_attention` forms the whole ``[B, K, G, S, T]`` score tensor: the
  reference, and the path for decoding with a KV cache.
* `self_attention` picks the implementation the models' ``attention`` field names: ``"dense"``,
  ``"blockwise"``, ``"fused"`` (`lorajax.models.attention_cpu.fused_attention`, one C++ kernel for
  XLA:CPU) or ``"auto"`` = fused where it runs (`uses_fused`: one CPU device, float32, kernel built),
  else blockwise.
* `blockwise_attention` is for self-attention without a cache (``T == S``, query
  ``s`` sits at key slot ``s``): queries are cut into blocks of ``block`` rows,
  each block its own pair of matmuls, so each block's scores are
  ``[block, ≤ S]`` instead of ``[S, S]``.

  - ``causal=True`` (decoders), where causality is known when tracing: block
    ``i`` reads only the keys ``lo_i .. hi_i`` that any of its queries can see
    (``hi_i`` = its last query + 1; ``lo_i`` = its first query − window + 1
    with a sliding window, else 0). Keys past ``hi_i`` are masked for every
    query of the block, so skipping them changes no visible row: for a causal
    ``S``-token sequence it computes about half the score and probability
    entries (``(n+1)/2n`` of them for ``n`` blocks).
  - ``causal=False`` (bidirectional encoders such as BERT): every block reads
    all ``S`` keys (scores ``[block, S]``); it computes as many entries as the
    dense path, but never the whole ``[S, S]`` matrix in one op.

  A query row with no visible key at all (a left-padded query) is a padding
  row whose output is not defined to match the dense path (the dense path
  averages all ``T`` values, this one the block's keys); no valid row differs.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from lorajax.models import attention
  >>> ks = jax.random.split(jax.random.key(0), 3)
  >>> q = jax.random.normal(ks[0], (1, 8, 2, 2, 4)); k, v = (jax.random.normal(x, (1, 8, 2, 4)) for x in ks[1:])
  >>> mask = jnp.tril(jnp.ones((8, 8), bool))[None]
  >>> ref = attention.dense_attention(q, k, v, mask)
  >>> bool(jnp.allclose(attention.blockwise_attention(q, k, v, mask, block=3), ref, atol=1e-6))
  True
  >>> pad = jnp.broadcast_to(jnp.arange(8)[None, None] < 6, (1, 8, 8))  # bidirectional, last 2 keys padding
  >>> got = attention.blockwise_attention(q, k, v, pad, block=3, causal=False)
  >>> bool(jnp.allclose(got, attention.dense_attention(q, k, v, pad), atol=1e-6))
  True

References: T. Dao et al., "FlashAttention", arXiv:2205.14135 (skipping fully
masked blocks of a causal mask, §3.1 block-sparse); M. Rabe & C. Staats,
"Self-attention Does Not Need O(n²) Memory", arXiv:2112.05682.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lorajax.models import attention_cpu

__all__ = ["dense_attention", "blockwise_attention", "self_attention", "uses_fused", "auto_block", "IMPLEMENTATIONS"]

#: names accepted by the models' ``attention`` field (see `self_attention`)
IMPLEMENTATIONS = ("auto", "dense", "blockwise", "fused")
_NEG = jnp.finfo(jnp.float32).min


def auto_block(S: int, min_block: int = 64, max_blocks: int = 8) -> int:
    """Query rows per block for a length-``S`` sequence: ``min_block``, or more so that there are at most
    ``max_blocks`` blocks (a multiple of ``min_block``). Each block is its own pair of matmuls in the
    program, so the block count bounds the compile time; 8 blocks already skip ``7/16`` of the scores."""
    per = -(-S // max_blocks)
    return max(min_block, -(-per // min_block) * min_block)


def _scores_softmax(q_BxSxKxGxd, k_BxTxKxd, mask_BxSxT):
    d = q_BxSxKxGxd.shape[-1]
    s_BxKxGxSxT = jnp.einsum("bskgd,btkd->bkgst", q_BxSxKxGxd, k_BxTxKxd) * (d**-0.5)
    s_BxKxGxSxT = jnp.where(mask_BxSxT[:, None, None], s_BxKxGxSxT.astype(jnp.float32), _NEG)
    return jax.nn.softmax(s_BxKxGxSxT, axis=-1)


def dense_attention(q_BxSxKxGxd, k_BxTxKxd, v_BxTxKxd, mask_BxSxT):
    """``softmax(q kᵀ/√d + mask) v`` over the whole ``[S, T]`` score matrix -> ``o [B, S, K, G, d]``."""
    p_BxKxGxSxT = _scores_softmax(q_BxSxKxGxd, k_BxTxKxd, mask_BxSxT).astype(v_BxTxKxd.dtype)
    return jnp.einsum("bkgst,btkd->bskgd", p_BxKxGxSxT, v_BxTxKxd)


def blockwise_attention(
    q_BxSxKxGxd,
    k_BxSxKxd,
    v_BxSxKxd,
    mask_BxSxS,
    *,
    window: int | None = None,
    block: int | None = None,
    causal: bool = True,
):
    """Self-attention (no cache) by query blocks of ``block`` rows -> ``o [B, S, K, G, d]``.

    ``mask [B, S, S]`` must already hold the whole mask (causal, window and
    padding); the blocks only choose which key columns each block reads.
    ``causal=True``: block ``i`` reads only the keys its queries can see
    (``window``: a sliding window narrows them further; None: all earlier keys).
    ``causal=False``: every block reads all ``S`` keys (``window`` must be None).
    ``block``: query rows per block (None: `auto_block`); with ``S <= block``
    this is `dense_attention`. Equal to `dense_attention` on every row with a
    visible key.
    """
    B, S, K, G, d = q_BxSxKxGxd.shape
    if k_BxSxKxd.shape[1] != S or mask_BxSxS.shape[-2:] != (S, S):
        raise ValueError(
            f"blockwise_attention is self-attention without a cache: q has {S} rows, "
            f"k {k_BxSxKxd.shape[1]}, mask {mask_BxSxS.shape}"
        )
    if not causal and window is not None:
        raise ValueError(f"window={window} needs causal=True (a sliding window here is causal)")
    if block is None:
        block = auto_block(S)
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    if S <= block:
        return dense_attention(q_BxSxKxGxd, k_BxSxKxd, v_BxSxKxd, mask_BxSxS)
    outs = []
    for start in range(0, S, block):
        stop = min(start + block, S)
        lo, hi = (0 if window is None else max(0, start - window + 1), stop) if causal else (0, S)
        outs.append(
            dense_attention(
                q_BxSxKxGxd[:, start:stop],
                k_BxSxKxd[:, lo:hi],
                v_BxSxKxd[:, lo:hi],
                mask_BxSxS[:, start:stop, lo:hi],
            )
        )
    return jnp.concatenate(outs, axis=1)


def uses_fused(*arrays) -> bool:
    """Whether ``attention="auto"`` takes the fused CPU kernel for these inputs: the default backend is the
    CPU with one device (the custom call is not partitioned over a mesh), every input is float32 and the
    kernel is built (`lorajax.models.attention_cpu.available`; if not, one warning says why)."""
    if jax.default_backend() != "cpu" or jax.device_count() != 1:
        return False
    if any(x.dtype != jnp.float32 for x in arrays):
        return False
    if not attention_cpu.available():
        attention_cpu.warn_unavailable()
        return False
    return True


def self_attention(
    q_BxSxKxGxd,
    k_BxSxKxd,
    v_BxSxKxd,
    mask_BxSxS,
    *,
    implementation: str = "auto",
    window: int | None = None,
    block: int | None = None,
    causal: bool = True,
):
    """Self-attention without a cache by ``implementation`` (one of `IMPLEMENTATIONS`) -> ``o [B, S, K, G, d]``.

    ``"dense"``: `dense_attention`; ``"blockwise"``: `blockwise_attention` (``block``, ``window``,
    ``causal``); ``"fused"``: `lorajax.models.attention_cpu.fused_attention` (``window``, ``causal``;
    float32 on the CPU, raises where it cannot run); ``"auto"``: fused when `uses_fused`, else blockwise.
    All agree on every row with a visible key.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention={implementation!r}; choose one of {list(IMPLEMENTATIONS)}")
    args = (q_BxSxKxGxd, k_BxSxKxd, v_BxSxKxd, mask_BxSxS)
    if implementation == "dense":
        return dense_attention(*args)
    if implementation == "fused" or (implementation == "auto" and uses_fused(*args[:3])):
        return attention_cpu.fused_attention(*args, causal=causal, window=window)
    return blockwise_attention(*args, window=window, block=block, causal=causal)
