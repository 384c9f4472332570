"""Fused low-rank attention (LRAgent's Flash-LoRA-Attention): kernel and jnp reference.

Each batch row ``b`` (an agent / a request) attends over keys and values
built from a base cache plus a low-rank cache::

    K_b = K_base + s · LR_k[b] B_k[b, h],    V_b = V_base + s · LR_v[b] B_v[b, h]

with ``LR = X A`` (``[Sk, r]``, shared by all heads, as in LRAgent's
``lr_v``) and per-KV-head ``B: [Hkv, r, D]``. A leading axis of size 1 on a
cache or on B is shared by the whole batch (LRAgent's *BaseShared* base cache;
*BaseLRShared* low-rank cache when the agents share ``A``); it is read in
place, never broadcast in memory.

The kernel never forms ``K_b`` or ``V_b`` (LRAgent's reordering, flash-style
online softmax over KV blocks of ``block_k``)::

    logits = q K_baseᵀ + (s q B_kᵀ) LR_kᵀ        (q B_kᵀ: [block_q, r], once per q tile)
    O      = (P V_base + s (P LR_v) B_v) / l     (P LR_v: [block_q, r] accumulated
                                                  beside P V with the same rescaling)

Grid ``(B, H, Sq / block_q)``; GQA/MQA by ``h // (H / Hkv)``. ``causal``
aligns the last query with the last key (``Sq <= Sk``). Forward only (serving,
as LRAgent's kernel): ``jax.grad`` raises; differentiate
`lora_attention_reference` instead.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from pallas_kernels import _common as c

__all__ = ["BlockSizes", "lora_attention", "lora_attention_reference"]

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Query and key tile sizes (powers of two); short sequences get smaller blocks."""

    block_q: int = 128
    block_k: int = 128


def _pick(arr, b):
    """Batch row ``b`` of ``arr``, or row 0 of a shared (leading size 1) array."""
    return arr[0] if arr.shape[0] == 1 else arr[b]


def lora_attention_reference(
    q, k_base, v_base, lr_k, lr_v, b_k, b_v, *, scale: float = 1.0, sm_scale: float | None = None, causal: bool = False
) -> jax.Array:
    """Materialises every ``K_b``, ``V_b`` ([B, Sk, H, D]) and runs softmax attention in float32."""
    bsz, sq, h, d = q.shape
    sk, hkv = k_base.shape[1], k_base.shape[2]
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    f32 = jnp.float32

    def full(base, lr, bmat):
        base = jnp.broadcast_to(base.astype(f32), (bsz, sk, hkv, d))
        if lr is None:
            return base
        lr = jnp.broadcast_to(lr.astype(f32), (bsz, sk, lr.shape[-1]))
        bmat = jnp.broadcast_to(bmat.astype(f32), (bsz,) + bmat.shape[1:])
        return base + scale * jnp.einsum("bsr,bhrd->bshd", lr, bmat)

    kk, vv = full(k_base, lr_k, b_k), full(v_base, lr_v, b_v)
    kk, vv = jnp.repeat(kk, h // hkv, axis=2), jnp.repeat(vv, h // hkv, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(f32), kk) * sm_scale
    if causal:
        mask = jnp.arange(sq)[:, None] + (sk - sq) >= jnp.arange(sk)[None, :]
        logits = jnp.where(mask[None, None], logits, MASK_VALUE)
    p = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", p, vv).astype(q.dtype)


def _kernel(
    q_ref,
    k_ref,
    v_ref,
    lrk_ref,
    lrv_ref,
    bk_ref,
    bv_ref,
    o_ref,
    *,
    sm_scale,
    scale,
    causal,
    block_q,
    block_k,
    sq,
    sk,
    has_k_lora,
):
    iq = pl.program_id(2)
    f32 = jnp.float32
    q = q_ref[...]  # [bq, D]
    lr_dtype = lrv_ref.dtype
    if has_k_lora:  # s q B_kᵀ: [bq, r], once per q tile
        qb = scale * jax.lax.dot_general(
            q.astype(lr_dtype), bk_ref[...], (((1,), (1,)), ((), ())), preferred_element_type=f32
        )
    rank = lrv_ref.shape[-1]
    span_q = iq * block_q + jnp.arange(block_q) + (sk - sq)  # key position each query may see up to

    def body(kb, carry):
        acc, acc_lr, m_prev, l_prev = carry
        ks = pl.ds(pl.multiple_of(kb * block_k, block_k), block_k)
        k = k_ref[ks, :]
        logits = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=f32)
        if has_k_lora:
            lrk = lrk_ref[ks, :]
            logits += jax.lax.dot_general(
                qb.astype(lrk.dtype), lrk, (((1,), (1,)), ((), ())), preferred_element_type=f32
            )
        logits *= sm_scale
        span_k = kb * block_k + jnp.arange(block_k)
        mask = jnp.broadcast_to(span_k[None, :] < sk, (block_q, block_k))
        if causal:
            mask = mask & (span_q[:, None] >= span_k[None, :])
        logits = jnp.where(mask, logits, MASK_VALUE)
        m_next = jnp.maximum(m_prev, logits.max(axis=-1))
        corr = jnp.exp(m_prev - m_next)
        p = jnp.exp(logits - m_next[:, None])
        l_next = corr * l_prev + p.sum(axis=-1)
        v = v_ref[ks, :]
        acc = corr[:, None] * acc + jnp.dot(p.astype(v.dtype), v, preferred_element_type=f32)
        lrv = lrv_ref[ks, :]
        acc_lr = corr[:, None] * acc_lr + jnp.dot(p.astype(lrv.dtype), lrv, preferred_element_type=f32)
        return acc, acc_lr, m_next, l_next

    n_kb: int | jax.Array = c.cdiv(sk, block_k)
    if causal:  # key blocks after this q tile's last visible key are skipped
        last = (iq + 1) * block_q - 1 + (sk - sq)
        n_kb = jnp.minimum(jax.lax.div(last + block_k, block_k), n_kb)
    d = q_ref.shape[-1]
    init = (
        jnp.zeros((block_q, d), f32),
        jnp.zeros((block_q, rank), f32),
        jnp.full((block_q,), -jnp.inf, f32),
        jnp.zeros((block_q,), f32),
    )
    acc, acc_lr, _, l_i = jax.lax.fori_loop(0, n_kb, body, init)
    bv = bv_ref[...]
    acc += scale * jnp.dot(acc_lr.astype(bv.dtype), bv, preferred_element_type=f32)
    o_ref[...] = (acc / l_i[:, None]).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "sm_scale", "causal", "block_sizes", "interpret"))
def _forward(q, k_base, v_base, lr_k, lr_v, b_k, b_v, *, scale, sm_scale, causal, block_sizes, interpret):
    bsz, sq, h, d = q.shape
    sk, hkv = k_base.shape[1], k_base.shape[2]
    r = lr_v.shape[-1]
    has_k_lora = lr_k is not None
    if not has_k_lora:  # unused zero operands keep one kernel signature
        lr_k, b_k = jnp.zeros((1, 1, r), lr_v.dtype), jnp.zeros((1, 1, r, d), b_v.dtype)
    bq, bk = c.fit_block(sq, block_sizes.block_q), c.fit_block(sk, block_sizes.block_k)
    sqp, skp, dp, rp = c.round_up(sq, bq), c.round_up(sk, bk), c.whole(d), c.whole(r)
    q = c.pad_to(q, (bsz, sqp, h, dp))
    k_base = c.pad_to(k_base, (k_base.shape[0], skp, hkv, dp))
    v_base = c.pad_to(v_base, (v_base.shape[0], skp, hkv, dp))
    lr_k = c.pad_to(lr_k, (lr_k.shape[0], skp if has_k_lora else 1, rp))
    lr_v = c.pad_to(lr_v, (lr_v.shape[0], skp, rp))
    b_k = c.pad_to(b_k, (b_k.shape[0], b_k.shape[1], rp, dp))
    b_v = c.pad_to(b_v, (b_v.shape[0], hkv, rp, dp))
    group = h // hkv

    def row(arr):  # batch index in the grid -> row of arr (0 when shared)
        return (lambda b: b) if arr.shape[0] > 1 else (lambda b: 0)

    kv_row, v_row, lrk_row, lrv_row, bk_row, bv_row = map(row, (k_base, v_base, lr_k, lr_v, b_k, b_v))
    kh = (lambda hh: hh // group) if has_k_lora else (lambda hh: 0)
    in_specs = [
        pl.BlockSpec((None, bq, None, dp), lambda b, hh, i: (b, i, hh, 0)),
        pl.BlockSpec((None, skp, None, dp), lambda b, hh, i: (kv_row(b), 0, hh // group, 0)),
        pl.BlockSpec((None, skp, None, dp), lambda b, hh, i: (v_row(b), 0, hh // group, 0)),
        pl.BlockSpec((None,) + lr_k.shape[1:], lambda b, hh, i: (lrk_row(b), 0, 0)),
        pl.BlockSpec((None, skp, rp), lambda b, hh, i: (lrv_row(b), 0, 0)),
        pl.BlockSpec((None, None, rp, dp), lambda b, hh, i: (bk_row(b), kh(hh), 0, 0)),
        pl.BlockSpec((None, None, rp, dp), lambda b, hh, i: (bv_row(b), hh // group, 0, 0)),
    ]
    kernel = functools.partial(
        _kernel,
        sm_scale=sm_scale,
        scale=scale,
        causal=causal,
        block_q=bq,
        block_k=bk,
        sq=sq,
        sk=sk,
        has_k_lora=has_k_lora,
    )
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((bsz, sqp, h, dp), q.dtype),
        grid=(bsz, h, sqp // bq),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, bq, None, dp), lambda b, hh, i: (b, i, hh, 0)),
        compiler_params=None if interpret else c.compiler_params(3),
        interpret=interpret,
        name="lora_attention",
    )(q, k_base, v_base, lr_k, lr_v, b_k, b_v)
    return out[:, :sq, :, :d]


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _lora_attention(q, k_base, v_base, lr_k, lr_v, b_k, b_v, static):
    return _forward(q, k_base, v_base, lr_k, lr_v, b_k, b_v, **dict(static))


def _fwd(q, k_base, v_base, lr_k, lr_v, b_k, b_v, static):
    return _lora_attention(q, k_base, v_base, lr_k, lr_v, b_k, b_v, static), None


def _bwd(static, res, g):
    raise NotImplementedError(
        "pallas_kernels.lora_attention is forward-only (serving); differentiate "
        "pallas_kernels.lora_attention_reference instead"
    )


_lora_attention.defvjp(_fwd, _bwd)


def _validate(q, k_base, v_base, lr_k, lr_v, b_k, b_v):
    name = "lora_attention"
    c.check_float(name, q=q, k_base=k_base, v_base=v_base, lr_k=lr_k, lr_v=lr_v, b_k=b_k, b_v=b_v)
    c.check_ndim(
        name,
        q=(q, 4),
        k_base=(k_base, 4),
        v_base=(v_base, 4),
        lr_k=(lr_k, 3),
        lr_v=(lr_v, 3),
        b_k=(b_k, 4),
        b_v=(b_v, 4),
    )
    if (lr_k is None) != (b_k is None):
        raise ValueError(f"{name}: give lr_k and b_k together (or neither, for a base-only K)")
    bsz, sq, h, d = q.shape
    _, sk, hkv, _ = k_base.shape
    arrays = dict(q=q, k_base=k_base, v_base=v_base, lr_k=lr_k, lr_v=lr_v, b_k=b_k, b_v=b_v)
    for key, arr in arrays.items():
        if arr is not None and arr.shape[0] not in (1, bsz):
            raise c.shape_error(name, f"{key}'s leading axis must be the batch {bsz} or 1 (shared)", **arrays)
    if k_base.shape[1:] != (sk, hkv, d) or v_base.shape[1:] != (sk, hkv, d):
        raise c.shape_error(name, "k_base and v_base must be [B or 1, Sk, Hkv, D] with q's head dim", **arrays)
    if h % hkv:
        raise c.shape_error(name, f"query heads {h} must be a multiple of KV heads {hkv}", **arrays)
    r = lr_v.shape[-1]
    for lr, bmat, key in ((lr_k, b_k, "k"), (lr_v, b_v, "v")):
        if lr is None:
            continue
        if lr.shape[1:] != (sk, r) or bmat.shape[1:] != (hkv, r, d):
            raise c.shape_error(
                name,
                f"lr_{key} must be [B or 1, Sk={sk}, r={r}] and b_{key} [B or 1, Hkv={hkv}, r={r}, D={d}]",
                **arrays,
            )
    c.check_same_dtype(name, q=q, k_base=k_base, v_base=v_base)
    c.check_same_dtype(name, lr_v=lr_v, b_v=b_v, lr_k=lr_k, b_k=b_k)


def lora_attention(
    q,
    k_base,
    v_base,
    lr_k,
    lr_v,
    b_k,
    b_v,
    *,
    scale: float = 1.0,
    sm_scale: float | None = None,
    causal: bool = False,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Attention over ``K = K_base + s LR_k B_k``, ``V = V_base + s LR_v B_v`` without forming K, V.

    Args:
      q: ``[B, Sq, H, D]``.
      k_base, v_base: ``[B or 1, Sk, Hkv, D]`` base cache (same dtype as ``q``).
      lr_k, lr_v: ``[B or 1, Sk, r]`` low-rank caches ``X A`` (``lr_k=None``: K is the base only).
      b_k, b_v: ``[B or 1, Hkv, r, D]`` (``b_k=None`` with ``lr_k=None``).
      scale: LoRA scale ``s`` (Python number); sm_scale: softmax scale (default ``1/√D``).
      causal: mask keys after each query (last query aligned with the last key; needs ``Sq <= Sk``).
      block_sizes, interpret: see `BlockSizes` and `pallas_kernels`.

    Returns ``[B, Sq, H, D]`` in ``q``'s dtype. Forward only.
    """
    _validate(q, k_base, v_base, lr_k, lr_v, b_k, b_v)
    if causal and q.shape[1] > k_base.shape[1]:
        raise ValueError(f"lora_attention: causal needs Sq <= Sk, got Sq={q.shape[1]}, Sk={k_base.shape[1]}")
    scale = c.check_static_scale("lora_attention", scale)
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else c.check_static_scale("lora_attention", sm_scale)
    block_sizes = block_sizes or BlockSizes()
    c.check_block_sizes("lora_attention", **dataclasses.asdict(block_sizes))
    mode = c.resolve_mode("lora_attention", interpret)
    if mode == "reference":
        return lora_attention_reference(
            q, k_base, v_base, lr_k, lr_v, b_k, b_v, scale=scale, sm_scale=sm_scale, causal=causal
        )
    static = (
        ("scale", scale),
        ("sm_scale", sm_scale),
        ("causal", bool(causal)),
        ("block_sizes", block_sizes),
        ("interpret", mode == "interpret"),
    )
    return _lora_attention(q, k_base, v_base, lr_k, lr_v, b_k, b_v, static)
