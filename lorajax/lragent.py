"""LRAgent's decomposed KV cache: ``n`` LoRA agents reading one shared context (serving).

Agents that share a backbone and a context of ``S`` tokens, and differ by LoRA
adapters on the value projection, each need the value cache
``V_i = X W_v + s_i (X A_i) B_i`` (``[S, Hkv·D]``; ``X: [S, in]`` the context's
hidden states at this layer, Flax layout ``W_v: [in, Hkv·D]``, ``A_i: [in, r]``,
``B_i: [r, Hkv·D]``). LRAgent keeps the base part ``X W_v`` once for all
agents and only the ``r`` columns ``X A_i`` per agent, and never forms
``V_i``: attention is ``O_i = P_i (X W_v) + s_i (P_i X A_i) B_i``
(`pallas_kernels.lora_attention`, flash-style). With shared-A multi-LoRA (all
agents one ``A``) the low-rank cache is shared as well.

Keys carry RoPE, a position-dependent rotation of each head that does not
commute with keeping ``X A_k`` at rank ``r``, so keys stay per agent; models
without RoPE may also pass a low-rank key part (``lr_k`` / ``b_k``).

Cache (a dict pytree; a leading 1 is shared by every agent and read in place)::

    k     [n, S, Hkv, D]     each agent's keys
    v     [1, S, Hkv, D]     X W_v, shared
    lr_v  [n | 1, S, r]      X A_i   (1: shared A)

Memory, against ``n`` full K and V caches of equal dtype, ``W = Hkv·D``:
``(n + 1) / (2n) + r / (2W)`` (``r / (2nW)`` with shared A) — `memory_ratio`;
for ``n = 3``, ``r = 8``, ``W = 1024``: 0.671.

Adapters come as the value projection's entry of a `lorajax.stack_adapters`
pool (e.g. ``pool["params"]["model"]["layers"]["0"]["self_attn"]["v_proj"]["kernel"]``
= ``{"lora_A": [G, in, R], "lora_B": [G, R, Hkv·D], "scale": [G]}``) and
``agent_ids`` (host integers, checked before anything runs; under ``jax.jit``
pass them as a static argument) pick an adapter per agent; each scale is
folded into its ``B``.
This module is the per-layer cache and attention; `lorajax.lragent_decode`
drives a whole Llama's decode through it (each layer's ``X`` from one shared
base prefill: LRAgent's approximation, since adapters upstream make agents'
hidden states differ; exact when only the last layer is adapted).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from lorajax import lragent
  >>> k0, k1, k2, k3 = jax.random.split(jax.random.key(0), 4)
  >>> x, w_v = jax.random.normal(k0, (6, 16)), jax.random.normal(k1, (16, 8))     # S=6, in=16, Hkv*D=8
  >>> pool = {"lora_A": jax.random.normal(k2, (3, 16, 2)), "lora_B": jax.random.normal(k3, (3, 2, 8)),
  ...         "scale": jnp.ones(3)}
  >>> ids = jnp.array([0, 2])                                                     # two agents
  >>> cache = lragent.build_cache(x, w_v, pool, ids, k=jnp.zeros((2, 6, 2, 4)))  # Hkv=2, D=4
  >>> cache["v"].shape, cache["lr_v"].shape
  ((1, 6, 2, 4), (2, 6, 2))
  >>> lragent.attend(jnp.ones((2, 1, 4, 4)), cache, pool, ids).shape           # one query, H=4
  (2, 1, 4, 4)
  >>> round(lragent.memory_ratio(3, 8, 1024), 3)
  0.671

References:
  LRAgent, arXiv 2602.01053 (abstract); official code hjeon2k/LRAgent,
  ``src/flash-attention/tests/test_flash_lora_attn.py`` (the kernel's
  semantics ``softmax(q kᵀ/√d)·(v + lr_v·lr_B[h])``). Facts in
  ``specs/performance.md`` §3; the memory formula is derived there.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["build_cache", "attend", "cache_bytes", "full_cache_bytes", "memory_ratio"]

KERNELS = (None, "pallas")


def _pool(pool: dict, agent_ids: Any, width: int):
    a, b, s = (jnp.asarray(pool[k]) for k in ("lora_A", "lora_B", "scale"))
    if (
        a.ndim != 3
        or b.ndim != 3
        or b.shape[:2] != (a.shape[0], a.shape[2])
        or b.shape[2] != width
        or s.shape != (a.shape[0],)
    ):
        raise ValueError(
            f"lragent: pool has lora_A {a.shape}, lora_B {b.shape}, scale {s.shape}; want "
            f"[G, in, R], [G, R, {width}], [G] (a stack_adapters entry of the value projection)"
        )
    ids = np.asarray(agent_ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer) or ids.size == 0:
        raise ValueError(f"lragent: agent_ids must be a non-empty 1-D integer array, got {ids!r}")
    if ids.min() < 0 or ids.max() >= a.shape[0]:
        raise ValueError(f"lragent: agent_ids {ids.tolist()} out of range for a pool of {a.shape[0]} adapters")
    return a, b, s, ids


def build_cache(
    x: jax.Array,
    w_v: jax.Array,
    pool: dict,
    agent_ids: Any,
    *,
    k: jax.Array,
    shared_a: bool = False,
    bias: jax.Array | None = None,
) -> dict:
    """The decomposed cache of one attention layer for ``n = len(agent_ids)`` agents.

    Args:
      x: ``[S, in]`` the shared context's hidden states at this layer (the value projection's input).
      w_v: ``[in, Hkv·D]`` the base value kernel.
      pool: the value projection's `lorajax.stack_adapters` entry.
      agent_ids: ``[n]`` adapter index per agent.
      k: ``[n, S, Hkv, D]`` each agent's keys (after RoPE), or ``[1, S, Hkv, D]`` keys shared by every
        agent (no agent adapts the key projection); fixes ``Hkv`` and ``D``.
      shared_a: every selected adapter has the same ``A`` (shared-A multi-LoRA): one ``lr_v`` row,
        checked.
      bias: ``[Hkv·D]`` the value projection's bias, added to the shared base values (None: no bias).

    Returns ``{"k", "v": [1, S, Hkv, D], "lr_v": [n or 1, S, r]}`` in ``x``'s dtype (``v``) and the
    adapter dtype (``lr_v``).
    """
    if x.ndim != 2 or w_v.ndim != 2 or x.shape[1] != w_v.shape[0]:
        raise ValueError(f"lragent: x {x.shape} and w_v {w_v.shape} do not line up (want [S, in], [in, Hkv*D])")
    if k.ndim != 4 or k.shape[1] != x.shape[0] or k.shape[2] * k.shape[3] != w_v.shape[1]:
        raise ValueError(
            f"lragent: keys {k.shape} do not match the context: want [n, {x.shape[0]}, Hkv, D] with "
            f"Hkv*D = {w_v.shape[1]}"
        )
    a, _, _, ids = _pool(pool, agent_ids, w_v.shape[1])
    if a.shape[1] != x.shape[1]:
        raise ValueError(f"lragent: pool lora_A {a.shape} does not take inputs of width {x.shape[1]}")
    if k.shape[0] not in (1, ids.size):
        raise ValueError(f"lragent: {k.shape[0]} key caches for {ids.size} agents (want {ids.size}, or 1 shared)")
    if bias is not None and bias.shape != (w_v.shape[1],):
        raise ValueError(f"lragent: value bias {bias.shape} does not match w_v {w_v.shape} (want [{w_v.shape[1]}])")
    if shared_a:
        if not bool(jnp.all(a[ids] == a[ids[:1]])):
            raise ValueError("lragent: shared_a=True but the agents' lora_A differ")
        ids = ids[:1]
    s_len, (hkv, d) = x.shape[0], k.shape[2:]
    v = x @ w_v if bias is None else x @ w_v + bias.astype(x.dtype)[None, :]
    v = v.reshape(1, s_len, hkv, d)
    lr_v = jnp.einsum("si,nir->nsr", x.astype(a.dtype), a[ids])
    return {"k": k, "v": v, "lr_v": lr_v}


def attend(
    q: jax.Array,
    cache: dict,
    pool: dict,
    agent_ids: Any,
    *,
    causal: bool = False,
    sm_scale: float | None = None,
    kernel: str | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Each agent's attention over the shared context, ``V_i`` never formed.

    Args:
      q: ``[n, Sq, H, D]`` queries of the ``n`` agents (``H`` a multiple of ``Hkv``).
      cache: from `build_cache`; pool / agent_ids: as there.
      causal: last query aligned with the last key; sm_scale: default ``1/√D``.
      kernel: ``None`` (`pallas_kernels.lora_attention_reference`, jnp) or ``"pallas"``
        (`pallas_kernels.lora_attention`; interpret mode on CPU).

    Returns ``[n, Sq, H, D]`` in ``q``'s dtype.
    """
    if kernel not in KERNELS:
        raise ValueError(f"lragent: kernel must be one of {KERNELS}, got {kernel!r}")
    k, v, lr_v = cache["k"], cache["v"], cache["lr_v"]
    hkv, d = v.shape[2:]
    _, b, s, ids = _pool(pool, agent_ids, hkv * d)
    if q.ndim != 4 or q.shape[0] != ids.size:
        raise ValueError(f"lragent: q {q.shape} must be [n, Sq, H, D] for the {ids.size} agents")
    if lr_v.shape[-1] != b.shape[1]:
        raise ValueError(f"lragent: cache rank {lr_v.shape[-1]} but the pool's lora_B has rank {b.shape[1]}")
    # B_i [R, Hkv·D] -> [Hkv, R, D], each agent's scale folded in (the kernel takes one static scale)
    b_v = (b[ids] * s[ids][:, None, None]).reshape(ids.size, b.shape[1], hkv, d).transpose(0, 2, 1, 3)
    import pallas_kernels  # imported here: lorajax needs it only for this serving path

    if kernel == "pallas":
        return pallas_kernels.lora_attention(
            q, k, v, None, lr_v, None, b_v, causal=causal, sm_scale=sm_scale, interpret=interpret
        )
    return pallas_kernels.lora_attention_reference(q, k, v, None, lr_v, None, b_v, causal=causal, sm_scale=sm_scale)


def cache_bytes(cache: dict) -> int:
    """Bytes held by a cache pytree."""
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache)))


def full_cache_bytes(n: int, seq: int, heads_kv: int, head_dim: int, dtype: Any) -> int:
    """Bytes of ``n`` agents' full K and V caches (``2·n·S·Hkv·D`` elements)."""
    return 2 * n * seq * heads_kv * head_dim * jnp.dtype(dtype).itemsize


def memory_ratio(n: int, rank: int, width: int, *, shared_a: bool = False, shared_k: bool = False) -> float:
    """``cache_bytes / full_cache_bytes`` for equal dtypes: ``(n+1)/(2n) + r/(2W)`` (``r/(2nW)`` with shared A).

    ``shared_k``: one key cache for every agent (no agent adapts the key projection): ``1/n + r/(2W)``.
    """
    return ((2 if shared_k else n + 1) / (2 * n)) + rank / (2 * width * (n if shared_a else 1))
