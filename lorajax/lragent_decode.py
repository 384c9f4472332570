"""LRAgent at model level: ``n`` LoRA agents decode from one shared, base-prefilled context in one batch.

A Llama-family model (`lorajax.models.llama`) and a `lorajax.stack_adapters` pool of ``G`` plain LoRA
adapters; ``agent_ids [n]`` picks one adapter per agent. `decode`:

1. **Shared prefill, once, base model only.** The context ``c [S]`` minus its last token runs through the
   base model (``Sc = S - 1`` tokens). Per decoder layer ``l`` it keeps the input of the attention
   projections ``X_l = RMSNorm(x_l)`` (``[Sc, D]``) and the base K/V cache (keys after RoPE).
2. **Decomposed cache per layer** (`lorajax.lragent.build_cache`): the base values ``X_l W_v (+ b_v)``
   once (``[1, Sc, Hkv, d]``), per agent the ``r`` columns ``X_l A_i`` of its value adapter
   (``[n, Sc, r]``); keys per agent ``rope(X_l W_k + b_k) + rope(s_i (X_l A_i) B_i)`` (RoPE is linear)
   when the layer's ``k_proj`` is adapted, else the shared base keys ``[1, Sc, Hkv, d]``. A layer with
   no value adapter keeps only the shared base values.
3. **Batched greedy decode** (one ``jax.jit``, a ``lax.scan`` of ``max_new`` steps). Step 0 feeds the
   context's last token, so every agent's first logits already come from its own adapted forward.
   Each step runs the ``n`` agents' tokens (batch rows) through every layer with each agent's adapter
   on every adapted projection (``x W + b + s_i (x A_i) B_i``), appends the step's own keys/values
   per agent, and attends over both parts with one softmax (float32)::

       P = softmax([q Kctx_iᵀ, q Ktail_iᵀ] / √d)   (causal over the tail)
       O_i = P_ctx (X W_v) + s_i (P_ctx X A_i) B_i + P_tail V_tail,i

   so no agent's context values ``V_i`` are formed.

**Approximation (LRAgent's setting).** With adapters upstream (any layer below the last, or q/o/MLP
projections) each agent's own prefill would give different hidden states ``X_l``; LRAgent reads the base
ones for every agent. `report` measures this against the exact per-agent decode (`reference`: each
agent's adapter merged, `lorajax.models.llama.generate`): token agreement and the largest first-step
logit difference. With zero adapters (``B = 0``) the two agree up to float rounding.

**Exact mode** (``mode="exact"``): every adapter is in the last decoder layer (e.g. its ``k_proj`` /
``v_proj``). Then nothing upstream differs (the context's own last-layer outputs are never read), the
decomposed decode equals the per-agent merged `generate` token for token; `decode` checks the pool.

Memory (`memory`): the decomposed context cache against ``n`` full K/V caches of the same ``Sc`` tokens
(`lorajax.lragent.memory_ratio`: ``(n + 1)/(2n) + r/(2W)`` per layer with per-agent keys; with shared
keys ``1/n + r/(2W)``). The ``max_new`` decoded tokens' K/V are per agent in both and not counted.

Supported: the adapters on ``layers.<i>.self_attn.{q,k,v,o}_proj`` and ``layers.<i>.mlp.{gate,up,down}_proj``
(not ``lm_head`` or ``embed_tokens``: ValueError); full attention only (sliding windows raise); one
unpadded context; greedy decoding; no shared-A (``lr_v`` per agent).

Example:
  >>> import jax, jax.numpy as jnp, lorajax
  >>> from lorajax import lragent_decode
  >>> from lorajax.models import llama
  >>> cfg = llama.Config(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
  ...                    num_attention_heads=4, num_key_value_heads=2)
  >>> model = llama.build(cfg)
  >>> params = model.init(jax.random.key(0), *llama.example_inputs(cfg))["params"]
  >>> spec = lorajax.Spec("lora", rank=2, targets=["k_proj", "v_proj"], init_weights=False)
  >>> pool = lorajax.stack_adapters(spec, [lorajax.init(spec, {"params": params}, s) for s in range(3)])
  >>> ctx = jnp.array([1, 5, 7, 2, 9], jnp.int32)
  >>> lragent_decode.decode(model, params, pool, [2, 0], ctx, 4).shape       # 2 agents, S + 4 tokens
  (2, 9)
  >>> caches = lragent_decode.build_caches(model, params, pool, [2, 0], ctx)
  >>> round(lragent_decode.memory(model, caches, 2)["ratio"], 4)             # (n+1)/(2n) + r/(2W), W = 8
  0.875

References:
  LRAgent, arXiv 2602.01053 (abstract); official code hjeon2k/LRAgent, ``src/transformers/cache_utils.py``
  (the shared base / per-agent low-rank value cache) and ``src/flash-attention/tests/test_flash_lora_attn.py``
  (``softmax(q kᵀ/√d)·(v + lr_v·lr_B[h])``). Facts in ``specs/performance.md`` §3.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorajax import lragent
from lorajax.models import llama
from lorajax.plan import adapter_paths

__all__ = ["MODES", "decode", "build_caches", "memory", "merged_params", "reference", "report"]

MODES = ("approximate", "exact")
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
_NEG = -0.7 * float(np.finfo(np.float32).max)


# ---------------------------------------------------------------------------- checks
def _entries(model: Any, pool: dict) -> dict[str, dict]:
    """``{"<layer>.<block>.<proj>": {"lora_A" [G, in, R], "lora_B" [G, R, out], "scale" [G]}}`` of ``pool``."""
    if not isinstance(model, llama.LlamaForCausalLM):
        raise TypeError(f"lragent_decode: model must be a lorajax.models.llama model, got {type(model).__name__}")
    cfg = model.cfg
    windows = sorted({str(w) for i in range(cfg.num_hidden_layers) if (w := cfg.window(i)) is not None})
    if windows:
        raise ValueError(f"lragent_decode: sliding-window attention (window {windows}) is not supported")
    if not isinstance(pool, dict):
        raise TypeError(f"lragent_decode: pool must be the dict from lorajax.stack_adapters, got {type(pool).__name__}")
    out: dict[str, dict] = {}
    for keys, entry in adapter_paths(pool).items():
        k = keys[1:] if keys[:1] == ("params",) else keys
        ok = (
            len(k) == 6
            and k[:2] == ("model", "layers")
            and k[2].isdigit()
            and int(k[2]) < cfg.num_hidden_layers
            and (k[3], k[4]) in {("self_attn", p) for p in _ATTN} | {("mlp", p) for p in _MLP}
            and k[5] == "kernel"
        )
        if not ok:
            raise ValueError(
                f"lragent_decode: adapter at {'/'.join(keys)} is not supported: LRAgent decode adapts the decoder "
                f"layers' projections (model/layers/<i>/self_attn/{{q,k,v,o}}_proj, model/layers/<i>/mlp/"
                "{gate,up,down}_proj); drop it from the pool (e.g. targets without lm_head / embed_tokens)"
            )
        if set(entry) != {"lora_A", "lora_B", "scale"}:
            raise ValueError(
                f"lragent_decode: pool entry at {'/'.join(keys)} has {sorted(entry)}; want lora_A, lora_B, scale "
                "(a lorajax.stack_adapters pool)"
            )
        out[".".join(k[2:5])] = {n: jnp.asarray(v) for n, v in entry.items()}
    if not out:
        raise ValueError("lragent_decode: the pool has no adapters")
    sizes = {e["lora_A"].shape[0] for e in out.values()}
    if len(sizes) != 1:
        raise ValueError(f"lragent_decode: pool entries stack different numbers of adapters {sorted(sizes)}")
    return out


def _ids(agent_ids: Any, entries: dict) -> tuple[int, ...]:
    ids = np.asarray(agent_ids)
    if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"lragent_decode: agent_ids must be a non-empty 1-D list of integers, got {agent_ids!r}")
    g = next(iter(entries.values()))["lora_A"].shape[0]
    if ids.min() < 0 or ids.max() >= g:
        raise ValueError(f"lragent_decode: agent_ids {ids.tolist()} out of range for a pool of {g} adapters")
    return tuple(int(i) for i in ids)


def _context(context_ids: Any, cfg: llama.Config) -> jax.Array:
    c = jnp.asarray(context_ids)
    if c.ndim != 1 or c.shape[0] < 2 or not jnp.issubdtype(c.dtype, jnp.integer):
        raise ValueError(
            f"lragent_decode: context_ids must be a 1-D integer array of >= 2 tokens (one shared context), "
            f"got shape {c.shape} dtype {c.dtype}"
        )
    return c.astype(jnp.int32)


def _check_mode(mode: str, entries: dict, cfg: llama.Config) -> None:
    if mode not in MODES:
        raise ValueError(f"lragent_decode: mode must be one of {MODES}, got {mode!r}")
    last = cfg.num_hidden_layers - 1
    upstream = sorted(k for k in entries if int(k.split(".")[0]) != last)
    if mode == "exact" and upstream:
        raise ValueError(
            f"lragent_decode: mode='exact' needs every adapter in the last decoder layer ({last}), but "
            f"{upstream[0]} is adapted (it makes the context's hidden states differ per agent); "
            "use mode='approximate'"
        )


# ---------------------------------------------------------------------------- maths
def _dtype(model: Any, params: Any):
    if model.dtype is not None:
        return jnp.dtype(model.dtype)
    return jnp.dtype(params["model"]["embed_tokens"]["embedding"].dtype)


def _norm(cfg: llama.Config, w: jax.Array, x: jax.Array, dt) -> jax.Array:
    out: jax.Array = llama.RMSNorm(cfg.rms_norm_eps, w.dtype, dt).apply({"params": {"weight": w}}, x)  # type: ignore[assignment]
    return out


def _proj(x_nxI: jax.Array, p: dict, entry: dict | None, ids: jax.Array, dt) -> jax.Array:
    """``x W (+ b) + s_i (x A_i) B_i`` per row ``i`` (one row per agent): ``[n, in] -> [n, out]``."""
    y = x_nxI.astype(dt) @ p["kernel"].astype(dt)
    if "bias" in p:
        y = y + p["bias"].astype(dt)[None, :]
    if entry is not None:
        a, b = entry["lora_A"][ids], entry["lora_B"][ids] * entry["scale"][ids][:, None, None]
        lr = jnp.einsum("ni,nir->nr", x_nxI.astype(a.dtype), a)
        y = y + jnp.einsum("nr,nro->no", lr, b).astype(dt)
    return y


def _layer_cache(cfg, lp, entries, layer, ids, x_SxD, k_base, v_base, cos, sin):
    """The decomposed cache of one layer (module doc, step 2)."""
    ek, ev = entries.get(f"{layer}.self_attn.k_proj"), entries.get(f"{layer}.self_attn.v_proj")
    n, (_, sc, hkv, d) = len(ids), k_base.shape
    k = k_base
    if ek is not None:  # rope(X W_k + b) + rope(s (X A) B): RoPE is linear
        lr = jnp.einsum("si,nir->nsr", x_SxD.astype(ek["lora_A"].dtype), ek["lora_A"][np.asarray(ids)])
        b = ek["lora_B"][np.asarray(ids)] * ek["scale"][np.asarray(ids)][:, None, None]
        dk = jnp.einsum("nsr,nro->nso", lr, b).astype(k_base.dtype).reshape(n, sc, hkv, d)
        k = k_base + llama.apply_rope(dk, cos, sin)
    if ev is None:
        return {"k": k, "v": v_base}
    pv = lp["self_attn"]["v_proj"]
    cache = lragent.build_cache(
        x_SxD.astype(v_base.dtype), pv["kernel"].astype(v_base.dtype), ev, ids, k=k, bias=pv.get("bias")
    )
    return cache


def _prefill(model, params, entries, ids, ctx_S):
    """Base prefill of ``ctx`` and the decomposed caches (tuple over layers)."""
    cfg, dt = model.cfg, _dtype(model, params)
    sc = ctx_S.shape[0]
    pos = jnp.arange(sc, dtype=jnp.int32)[None, :]
    (_, base), state = model.apply(
        {"params": params},
        ctx_S[None, :],
        position_ids=pos,
        cache=llama.init_cache(cfg, 1, sc, dt),
        cache_index=0,
        capture_intermediates=lambda mdl, _: isinstance(mdl, llama.RMSNorm) and mdl.name == "input_layernorm",
        mutable=["intermediates"],
    )
    xs = state["intermediates"]["model"]["layers"]
    cos, sin = llama.rope_tables(cfg, pos, dt)
    layers = params["model"]["layers"]
    return tuple(
        _layer_cache(
            cfg,
            layers[str(i)],
            entries,
            i,
            ids,
            xs[str(i)]["input_layernorm"]["__call__"][0],
            base[i]["k"],
            base[i]["v"],
            cos,
            sin,
        )
        for i in range(cfg.num_hidden_layers)
    )


def _attend(q_nxHxd, cache, entry_v, ids, tail_k, tail_v, t):
    """One query per agent over the decomposed context cache and the agent's own tail (slots ``<= t``)."""
    n, h, d = q_nxHxd.shape
    ctx_k, ctx_v = cache["k"], cache["v"]
    hkv = ctx_v.shape[2]
    g = h // hkv
    q = q_nxHxd.reshape(n, hkv, g, d)
    kc = jnp.broadcast_to(ctx_k, (n,) + ctx_k.shape[1:])
    s_ctx = jnp.einsum("nkgd,ntkd->nkgt", q, kc) * (d**-0.5)
    s_tail = jnp.einsum("nkgd,ntkd->nkgt", q, tail_k) * (d**-0.5)
    live = jnp.arange(tail_k.shape[1]) <= t
    s_tail = jnp.where(live[None, None, None, :], s_tail.astype(jnp.float32), _NEG)
    p = jax.nn.softmax(jnp.concatenate([s_ctx.astype(jnp.float32), s_tail], axis=-1), axis=-1)
    sc = ctx_k.shape[1]
    p_ctx, p_tail = p[..., :sc].astype(ctx_v.dtype), p[..., sc:].astype(tail_v.dtype)
    o = jnp.einsum("nkgt,tkd->nkgd", p_ctx, ctx_v[0]) + jnp.einsum("nkgt,ntkd->nkgd", p_tail, tail_v)
    if "lr_v" in cache:  # s_i (P_ctx X A_i) B_i, B_i as [Hkv, R, d]
        r = cache["lr_v"].shape[-1]
        b = (entry_v["lora_B"][ids] * entry_v["scale"][ids][:, None, None]).reshape(n, r, hkv, d)
        plr = jnp.einsum("nkgt,ntr->nkgr", p_ctx.astype(cache["lr_v"].dtype), cache["lr_v"])
        o = o + jnp.einsum("nkgr,nrkd->nkgd", plr, b).astype(o.dtype)
    return o.reshape(n, h * d)


def _step(model, params, entries, ids, caches, tails, tok_n, t, pos):
    """One decode step of the ``n`` agents: logits ``[n, V]`` and the tails with this step's K/V."""
    cfg, dt = model.cfg, _dtype(model, params)
    h, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    n = tok_n.shape[0]
    m = params["model"]
    x = m["embed_tokens"]["embedding"][tok_n].astype(dt)
    cos, sin = llama.rope_tables(cfg, jnp.full((1, 1), pos, jnp.int32), dt)
    new_tails = []
    for i in range(cfg.num_hidden_layers):
        lp, pre = m["layers"][str(i)], f"{i}."
        a = lp["self_attn"]
        hx = _norm(cfg, lp["input_layernorm"]["weight"], x, dt)
        q = _proj(hx, a["q_proj"], entries.get(pre + "self_attn.q_proj"), ids, dt).reshape(n, 1, h, d)
        k = _proj(hx, a["k_proj"], entries.get(pre + "self_attn.k_proj"), ids, dt).reshape(n, 1, kv, d)
        v = _proj(hx, a["v_proj"], entries.get(pre + "self_attn.v_proj"), ids, dt).reshape(n, 1, kv, d)
        q, k = llama.apply_rope(q, cos, sin), llama.apply_rope(k, cos, sin)
        tk, tv = tails[i]
        tk = jax.lax.dynamic_update_slice(tk, k.astype(tk.dtype), (0, t, 0, 0))
        tv = jax.lax.dynamic_update_slice(tv, v.astype(tv.dtype), (0, t, 0, 0))
        new_tails.append((tk, tv))
        o = _attend(q[:, 0], caches[i], entries.get(pre + "self_attn.v_proj"), ids, tk, tv, t)
        x = x + _proj(o, a["o_proj"], entries.get(pre + "self_attn.o_proj"), ids, dt)
        mp = lp["mlp"]
        hx = _norm(cfg, lp["post_attention_layernorm"]["weight"], x, dt)
        gate = _proj(hx, mp["gate_proj"], entries.get(pre + "mlp.gate_proj"), ids, dt)
        up = _proj(hx, mp["up_proj"], entries.get(pre + "mlp.up_proj"), ids, dt)
        x = x + _proj(jax.nn.silu(gate) * up, mp["down_proj"], entries.get(pre + "mlp.down_proj"), ids, dt)
    hx = _norm(cfg, m["norm"]["weight"], x, dt)
    logits = hx @ llama.output_kernel(cfg, params).astype(dt)
    return logits, tuple(new_tails)


@functools.partial(jax.jit, static_argnames=("model", "ids", "max_new"))
def _decode(params, entries, ctx_S, *, model, ids, max_new):
    cfg, dt = model.cfg, _dtype(model, params)
    n, sc = len(ids), ctx_S.shape[0] - 1
    caches = _prefill(model, params, entries, ids, ctx_S[:sc])
    ids_n = jnp.asarray(ids, jnp.int32)
    tail_shape = (n, max_new, cfg.num_key_value_heads, cfg.head_dim)
    tails = tuple((jnp.zeros(tail_shape, dt), jnp.zeros(tail_shape, dt)) for _ in range(cfg.num_hidden_layers))

    def body(carry, t):
        tok, tails = carry
        logits, tails = _step(model, params, entries, ids_n, caches, tails, tok, t, sc + t)
        nxt = jnp.argmax(logits.astype(jnp.float32), axis=-1).astype(jnp.int32)
        return (nxt, tails), (nxt, logits.astype(jnp.float32))

    tok0 = jnp.full((n,), ctx_S[sc], jnp.int32)
    _, (toks_NxN, logits) = jax.lax.scan(body, (tok0, tails), jnp.arange(max_new, dtype=jnp.int32))
    out = jnp.concatenate([jnp.broadcast_to(ctx_S[None, :], (n, ctx_S.shape[0])), toks_NxN.T], axis=1)
    return out, logits.transpose(1, 0, 2)


# ---------------------------------------------------------------------------- API
def decode(
    model: Any,
    params: Any,
    pool: dict,
    agent_ids: Any,
    context_ids: Any,
    max_new: int,
    *,
    mode: str = "approximate",
    return_logits: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Greedy decode of ``n = len(agent_ids)`` agents from one shared context, in one batch (module doc).

    Args:
      model: a `lorajax.models.llama` model; params: its (base) params.
      pool: a `lorajax.stack_adapters` pool of plain LoRA adapters on the decoder layers' projections.
      agent_ids: ``[n]`` host integers, one pool index per agent (static: a new tuple compiles again).
      context_ids: ``[S]`` int, the shared context (``S >= 2``, no padding).
      max_new: new tokens per agent (``>= 1``).
      mode: ``"approximate"`` (LRAgent: every agent reads the base prefill's hidden states) or
        ``"exact"`` (checks that every adapter is in the last decoder layer, where that is exact).
      return_logits: also return each step's logits.

    Returns ``tokens [n, S + max_new]`` int32 (the context, then each agent's tokens), and with
    ``return_logits`` also ``logits [n, max_new, V]`` float32 (step 0: after the context's last token).
    """
    entries = _entries(model, pool)
    ids = _ids(agent_ids, entries)
    ctx = _context(context_ids, model.cfg)
    _check_mode(mode, entries, model.cfg)
    if isinstance(max_new, bool) or not isinstance(max_new, (int, np.integer)) or max_new < 1:
        raise ValueError(f"lragent_decode: max_new must be an integer >= 1, got {max_new!r}")
    toks, logits = _decode(params, entries, ctx, model=model, ids=ids, max_new=int(max_new))
    return (toks, logits) if return_logits else toks


@functools.partial(jax.jit, static_argnames=("model", "ids"))
def _caches(params, entries, ctx_S, *, model, ids):
    return _prefill(model, params, entries, ids, ctx_S)


def build_caches(model: Any, params: Any, pool: dict, agent_ids: Any, context_ids: Any) -> tuple:
    """The decomposed context caches `decode` builds (per layer a `lorajax.lragent.build_cache` dict, or
    ``{"k", "v"}`` where the layer's value projection has no adapter), over ``context_ids[:-1]``."""
    entries = _entries(model, pool)
    ctx = _context(context_ids, model.cfg)
    return _caches(params, entries, ctx[:-1], model=model, ids=_ids(agent_ids, entries))


def memory(model: Any, caches: tuple, n: int) -> dict:
    """Bytes of the decomposed caches against ``n`` agents' full K/V caches of the same context length.

    Returns ``{"decomposed_bytes", "full_bytes", "ratio"}``.
    """
    cfg, v = model.cfg, caches[0]["v"]
    full = cfg.num_hidden_layers * lragent.full_cache_bytes(
        n, v.shape[1], cfg.num_key_value_heads, cfg.head_dim, v.dtype
    )
    got = sum(lragent.cache_bytes(c) for c in caches)
    return {"decomposed_bytes": got, "full_bytes": full, "ratio": got / full}


def merged_params(params: Any, pool: dict, index: int) -> Any:
    """``params`` with adapter ``index`` of ``pool`` merged: ``W + s (A B)`` at every pooled kernel."""
    out = jax.tree.map(lambda x: x, params)
    for keys, e in adapter_paths(pool).items():
        k = keys[1:] if keys[:1] == ("params",) else keys
        node = out
        for key in k[:-1]:
            node = node[key]
        w = node[k[-1]]
        node[k[-1]] = (w + e["scale"][index] * (e["lora_A"][index] @ e["lora_B"][index])).astype(w.dtype)
    return out


def reference(model: Any, params: Any, pool: dict, agent_ids: Any, context_ids: Any, max_new: int):
    """The exact per-agent decode: each agent's adapter merged, its own prefill, `llama.generate`.

    Returns ``tokens [n, S + max_new]`` and the first-step logits ``[n, V]`` (float32).
    """
    entries = _entries(model, pool)
    ctx = _context(context_ids, model.cfg)
    toks, first = [], []
    for i in _ids(agent_ids, entries):
        p = merged_params(params, pool, i)
        toks.append(llama.generate(model, p, ctx[None, :], max_new)[0])
        first.append(model.apply({"params": p}, ctx[None, :])[0, -1].astype(jnp.float32))
    return jnp.stack(toks), jnp.stack(first)


def report(model: Any, params: Any, pool: dict, agent_ids: Any, context_ids: Any, max_new: int, **kw) -> dict:
    """`decode` (``**kw``: its ``mode``) against `reference`: ``{"token_agreement"`` (fraction of new
    tokens equal, position by position), ``"prefix_agreement"`` (mean fraction of new tokens before the
    first difference), ``"first_token_agreement"``, ``"first_step_max_logit_diff"}``."""
    toks, logits = decode(model, params, pool, agent_ids, context_ids, max_new, return_logits=True, **kw)
    ref, first = reference(model, params, pool, agent_ids, context_ids, max_new)
    s = int(np.asarray(context_ids).shape[0])
    eq = np.asarray(toks[:, s:] == ref[:, s:])
    prefix = np.where(eq.all(1), max_new, np.argmin(eq, axis=1)) / max_new
    return {
        "token_agreement": float(eq.mean()),
        "prefix_agreement": float(prefix.mean()),
        "first_token_agreement": float(eq[:, 0].mean()),
        "first_step_max_logit_diff": float(jnp.max(jnp.abs(logits[:, 0] - first))),
    }
