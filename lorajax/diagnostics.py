"""The LoRA-gradient regime diagnostic of "Computational Limits of LoRA" (Hu et al., arXiv 2406.03136).

The paper ties the cost of computing the LoRA gradient of attention to the size of the entries of
the query/key-side products. With ``X: [L, D]`` a layer's attention input (the normalised residual
stream of a Llama layer, the hidden states entering a BERT layer), the frozen kernels ``W_Q, W_K``
(Flax layout ``[D, H·d]``) and the adapters' updates ``ΔW = s·A·B`` (``A: [D, r]``, ``B: [r, H·d]``;
PyTorch writes ``s·B·A`` on ``[out, in]`` weights, the same update), the quantities are the
max-entry norms::

    ‖X W_Q‖_max,  ‖X W_K‖_max,  ‖X s A_Q B_Q‖_max,  ‖X s A_K B_K‖_max      (‖M‖_max = max_ij |M_ij|)

Below a threshold ``Γ = o(√log L)`` on all four the gradient has almost-linear-time approximations
(low-rank factors of the attention matrix, applied term by term through the gradient chain); at
``Γ = Ω(√log L)`` no sub-quadratic algorithm exists under SETH. With entries bounded by ``Γ`` every
attention logit is bounded by ``Γ²`` (times the logit scale), so a convention-free reading is the
max |attention logit| against ``log L``. `attention_regime` reports, per layer::

    q_base = ‖X W_Q‖_max   q_lora = ‖X ΔW_Q‖_max   q_adapted = ‖X (W_Q + ΔW_Q)‖_max   (k_* alike)
    gamma       = max(q_base, k_base, q_lora, k_lora)
    max_logit   = max |logit| over the (query, key) pairs the model attends, under the model's own
                  scaling (bias and RoPE included: the logits the layer really computes)
    log_len     = log L (natural log; L = the number of keys; NaN for L = 1)
    rho         = max_logit / log_len          gamma_ratio = gamma / sqrt(log_len)

**The theorem is asymptotic** (``L → ∞``, ``d = O(log L)``): ``rho`` and ``gamma_ratio`` are
heuristic "which side of the threshold" indicators for one batch, not a pass/fail test; no constant
separates the regimes at a finite ``L``.

`lora_norm_regime` runs it on every attention layer of a lorajax Llama (`lorajax.models.llama`) or
BERT (`lorajax.models.bert`) model with adapters: ``X`` comes from Flax's ``capture_intermediates``
(the Llama ``input_layernorm`` outputs; BERT's embeddings and layer outputs) on the adapted model,
so no module is changed, and the products are recomputed from the parameters. For variants that
declare an exact ``s·A·B`` (`lorajax.variants.base.Factors`) the update is applied factored,
``s·(X A) B``; for other mergeable variants ``ΔW = W' - W`` from `lorajax.merge`. Everything is a
pure function of arrays and safe under ``jax.jit`` (close over the model and the spec).

Research extra (no wall-clock speed-up is promised on any accelerator): the polynomial method's
low-rank factorisation ``exp(Q Kᵀ) ≈ φ(Q) φ(K)ᵀ`` with degree-``g`` Taylor features
``φ(x) = [x^{⊗j} / √(j!)]_{j=0..g}`` (rank ``Σ_{j≤g} d^j``): `taylor_features`, `lowrank_attention`
(softmax attention through the factors, O(L·k·d) instead of O(L²·d)) and `taylor_error_table`
(relative max error ``max|φ(Q)φ(K)ᵀ − exp(QKᵀ)| / max exp(QKᵀ)`` with entries uniform in
``[−B, B]``). It shows the transition: small entries give accurate low-rank factors, large ones
need a rank that blows up (L=256, d=4; applications.md §1)::

    B      g=2    g=4     g=6
    0.25   7e-4   1e-6    7e-10
    2.0    1.0    0.97    0.87

Example:
  >>> import jax, jax.numpy as jnp
  >>> from lorajax import diagnostics
  >>> k0, k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 5)
  >>> x = jax.random.normal(k0, (1, 8, 16))                                   # [B, S, D]
  >>> wq, wk = jax.random.normal(k1, (16, 16)) / 4, jax.random.normal(k2, (16, 8)) / 4
  >>> a, b = jax.random.normal(k3, (16, 2)), jax.random.normal(k4, (2, 16))   # LoRA on W_Q, r=2
  >>> out = diagnostics.attention_regime(x, wq, wk, (a, b, 0.5), num_heads=4, num_kv_heads=2)
  >>> sorted(out)[:4]
  ['gamma', 'gamma_ratio', 'k_adapted', 'k_base']
  >>> bool(jnp.isclose(out["q_lora"], jnp.abs(0.5 * (x @ a) @ b).max()))
  True
  >>> diagnostics.taylor_features(jnp.ones((3, 4)), 2).shape                # 1 + 4 + 16 features
  (3, 21)

References:
  J. Y.-C. Hu, M. Su, E.-J. Kuo, Z. Song, H. Liu, "Computational Limits of Low-Rank Adaptation
  (LoRA) Fine-Tuning for Transformer Models", arXiv:2406.03136 (ICLR 2025). J. Alman, Z. Song,
  "Fast Attention Requires Bounded Entries", NeurIPS 2023 (arXiv:2302.13214). Official code: "on
  OpenReview" per the paper; not obtainable here (no repository snapshot), so none was read.

UNVERIFIED (what was and was not read: only the abstract and the paper's section list, through
``specs/applications.md`` §1; neither the theorem statements nor the official code could be read):
  * which products set the threshold (here: X W_Q, X W_K and the Q/K adapter updates; the value side
    is reported by nobody here, as we recall it enters only polynomially) and the form
    ``Γ = o(√log L)`` vs ``Ω(√log L)``, with no constant;
  * the logit reading ``max|logit| = o(log L)`` is our restatement (Alman-Song's logits are
    ``q·k/d``; we report the model's own ``q·k/√d`` plus RoPE and biases, which the theorem ignores);
  * ``L`` is the number of key slots of the batch (padding included), ``log`` natural;
  * the Taylor-feature factorisation is one instance of the polynomial method (the paper's chain of
    low-rank approximations may use other features); the error table is CHECKED in numpy only.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lorajax import plan as plan_lib
from lorajax import quant, registry
from lorajax.adapters import merge
from lorajax.models import bert, llama

__all__ = [
    "QUANTITIES",
    "max_norm",
    "lora_update",
    "attention_regime",
    "lora_norm_regime",
    "flat_metrics",
    "taylor_features",
    "taylor_rank",
    "lowrank_attention",
    "taylor_error_table",
]

#: the per-layer quantities `attention_regime` returns, in a fixed order
QUANTITIES = (
    "q_base",
    "q_lora",
    "q_adapted",
    "k_base",
    "k_lora",
    "k_adapted",
    "gamma",
    "max_logit",
    "log_len",
    "rho",
    "gamma_ratio",
)

#: largest Taylor feature count `taylor_features` builds (``Σ_{j≤g} d^j``): beyond it, memory explodes
MAX_FEATURES = 1 << 20


def max_norm(m: jax.Array) -> jax.Array:
    """``‖M‖_max = max_ij |M_ij|`` (a float32 scalar; 0 for an empty array)."""
    m = jnp.asarray(m, jnp.float32)
    return jnp.max(jnp.abs(m), initial=0.0)


def lora_update(x: jax.Array, a: jax.Array, b: jax.Array, scale: float | jax.Array) -> jax.Array:
    """``s·(X A) B``: the LoRA update's contribution ``[..., out]`` for ``x [..., in]``, ``A [in, r]``, ``B [r, out]``.

    Never forms ``ΔW``. Raises ValueError when the shapes do not chain.
    """
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"LoRA factors must be A [in, r] and B [r, out], got A {a.shape}, B {b.shape}")
    if x.shape[-1] != a.shape[0] or a.shape[1] != b.shape[0]:
        raise ValueError(
            f"shapes do not chain: x [..., {x.shape[-1]}], A {a.shape}, B {b.shape} (need x [..., in], A [in, r], "
            "B [r, out])"
        )
    return jnp.asarray(scale, jnp.float32) * ((x @ a) @ b)


def _update(x: jax.Array, delta: Any, w: jax.Array, name: str) -> jax.Array:
    """``X ΔW`` for ``delta`` = None (zeros), a ``[in, out]`` array, or factors ``(A, B, s)``."""
    if delta is None:
        return jnp.zeros(x.shape[:-1] + (w.shape[1],), jnp.float32)
    if isinstance(delta, (tuple, list)):
        if len(delta) != 3:
            raise ValueError(f"{name}: factored update must be (A, B, scale), got a {len(delta)}-tuple")
        a, b, s = delta
        a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
        if a.shape[0] != w.shape[0] or b.ndim != 2 or b.shape[1] != w.shape[1]:
            raise ValueError(
                f"{name}: A {a.shape}, B {b.shape} do not fit the weight {w.shape} (A [in, r], B [r, out])"
            )
        return lora_update(x, a, b, s)
    d = jnp.asarray(delta, jnp.float32)
    if d.shape != w.shape:
        raise ValueError(f"{name}: ΔW has shape {d.shape}, the weight {w.shape}")
    return x @ d


def attention_regime(
    x_BxSxD: jax.Array,
    w_q: jax.Array,
    w_k: jax.Array,
    delta_q: Any = None,
    delta_k: Any = None,
    *,
    num_heads: int,
    num_kv_heads: int | None = None,
    b_q: jax.Array | None = None,
    b_k: jax.Array | None = None,
    rope: tuple[jax.Array, jax.Array] | None = None,
    mask_BxSxS: jax.Array | None = None,
    logit_scale: float | None = None,
) -> dict[str, jax.Array]:
    """The regime quantities (`QUANTITIES`, float32 scalars) of one attention layer.

    Args:
      x_BxSxD: the layer's attention input ``X`` (what ``q_proj`` / ``k_proj`` read).
      w_q, w_k: frozen kernels ``[D, H·d]``, ``[D, K·d]`` (Flax layout).
      delta_q, delta_k: the adapters' updates: None (not adapted), ``ΔW [D, out]``, or factors
        ``(A [D, r], B [r, out], s)`` applied as ``s·(X A) B``.
      num_heads, num_kv_heads: ``H`` query heads reading ``K`` key heads (GQA; default ``K = H``;
        query head ``h`` reads key head ``h // (H/K)``).
      b_q, b_k: projection biases (enter the logits only, not the ``X W`` norms).
      rope: ``(cos, sin)`` of shape ``[1 | B, S, d]`` (rotate-half RoPE, as
        `lorajax.models.llama.apply_rope`), applied to queries and keys before the logits.
      mask_BxSxS: True where query ``i`` attends key ``j`` (default: every pair); the max |logit| is
        over these pairs only.
      logit_scale: logits are ``scale·q·k`` (default ``1/√d``).

    Returns ``{name: scalar}`` for every name in `QUANTITIES` (see the module docstring).
    Raises ValueError for mismatched shapes or head counts.
    """
    x = jnp.asarray(x_BxSxD, jnp.float32)
    if x.ndim != 3:
        raise ValueError(f"x must be [batch, seq, dim], got shape {x.shape}")
    B, S, D = x.shape
    w_q, w_k = jnp.asarray(w_q, jnp.float32), jnp.asarray(w_k, jnp.float32)
    for name, w in (("w_q", w_q), ("w_k", w_k)):
        if w.ndim != 2 or w.shape[0] != D:
            raise ValueError(f"{name} must be [D={D}, out] (Flax layout [in, out]), got shape {w.shape}")
    H = int(num_heads)
    K = H if num_kv_heads is None else int(num_kv_heads)
    if H < 1 or K < 1 or H % K:
        raise ValueError(f"num_heads={num_heads} must be a positive multiple of num_kv_heads={num_kv_heads}")
    if w_q.shape[1] % H:
        raise ValueError(f"w_q has {w_q.shape[1]} outputs, not divisible by num_heads={H}")
    d = w_q.shape[1] // H
    if w_k.shape[1] != K * d:
        raise ValueError(f"w_k has {w_k.shape[1]} outputs; expected num_kv_heads·head_dim = {K}·{d} = {K * d}")
    xw_q, xw_k = x @ w_q, x @ w_k
    xd_q, xd_k = _update(x, delta_q, w_q, "delta_q"), _update(x, delta_k, w_k, "delta_k")
    q_full, k_full = xw_q + xd_q, xw_k + xd_k
    out = {
        "q_base": max_norm(xw_q),
        "q_lora": max_norm(xd_q),
        "q_adapted": max_norm(q_full),
        "k_base": max_norm(xw_k),
        "k_lora": max_norm(xd_k),
        "k_adapted": max_norm(k_full),
    }
    for name, bias, n in (("b_q", b_q, H * d), ("b_k", b_k, K * d)):
        if bias is not None and tuple(jnp.shape(bias)) != (n,):
            raise ValueError(f"{name} must have shape ({n},), got {jnp.shape(bias)}")
    if b_q is not None:
        q_full = q_full + jnp.asarray(b_q, jnp.float32)[None, None, :]
    if b_k is not None:
        k_full = k_full + jnp.asarray(b_k, jnp.float32)[None, None, :]
    q = q_full.reshape(B, S, H, d)
    k = k_full.reshape(B, S, K, d)
    if rope is not None:
        cos, sin = (jnp.asarray(t, jnp.float32) for t in rope)
        if cos.shape != sin.shape or cos.ndim != 3 or cos.shape[1:] != (S, d) or cos.shape[0] not in (1, B):
            raise ValueError(f"rope (cos, sin) must be [1 or {B}, {S}, {d}], got {cos.shape} and {sin.shape}")
        q, k = llama.apply_rope(q, cos, sin), llama.apply_rope(k, cos, sin)
    scale = 1.0 / math.sqrt(d) if logit_scale is None else float(logit_scale)
    logits = jnp.einsum("bskgd,btkd->bkgst", q.reshape(B, S, K, H // K, d), k) * scale
    if mask_BxSxS is None:
        mask = jnp.ones((B, S, S), bool)
    else:
        mask = jnp.asarray(mask_BxSxS, bool)
        if mask.shape != (B, S, S):
            raise ValueError(f"mask must be [B, S, S] = {(B, S, S)}, got {mask.shape}")
    out["max_logit"] = jnp.max(jnp.where(mask[:, None, None, :, :], jnp.abs(logits), 0.0))
    log_len = jnp.float32(math.log(S)) if S > 1 else jnp.float32(math.nan)
    out["gamma"] = jnp.max(jnp.stack([out["q_base"], out["k_base"], out["q_lora"], out["k_lora"]]))
    out["log_len"] = log_len
    out["rho"] = out["max_logit"] / log_len
    out["gamma_ratio"] = out["gamma"] / jnp.sqrt(log_len)
    return {name: out[name] for name in QUANTITIES}


# ----------------------------------------------------------------------------- whole models


def _updates(spec: Any, variables: dict, adapters: Any, kernels: dict[tuple, jax.Array]) -> dict[tuple, Any]:
    """``{kernel keys: (A, B, s) | ΔW}`` for the targeted q/k kernels among ``kernels`` (keys as in the plan)."""
    if spec is None and adapters is None:
        return {}
    if spec is None or adapters is None:
        raise ValueError("pass both spec and adapters (or neither, for the base model alone)")
    variant = registry.get(spec.variant)
    plan = plan_lib.make_plan(spec, variables, adapters, variant)
    wanted = {t.keys: t for t in plan.targets if t.keys in kernels}
    if not wanted:
        return {}
    f = variant.factors
    if f is not None and f.exact and f.scale is not None:
        return {keys: (plan.adapter(t)[f.a], plan.adapter(t)[f.b], f.scale(t)) for keys, t in wanted.items()}
    if not variant.mergeable:
        raise ValueError(
            f"variant {spec.variant!r} is input-dependent (factored-only): its update is not one matrix ΔW, so "
            "the regime diagnostic cannot read it; use a mergeable variant"
        )
    merged = merge(spec, variables, adapters, variant=variant)
    f32 = jnp.float32
    return {keys: _leaf(merged, keys, "merged").astype(f32) - kernels[keys].astype(f32) for keys in wanted}


def _leaf(variables: dict, keys: tuple, what: str) -> jax.Array:
    node: Any = variables
    for k in keys:
        if not isinstance(node, dict) or k not in node:
            raise ValueError(f"{what}: no parameter at {'/'.join(keys)}; is this the model's variables dict?")
        node = node[k]
    return node


#: the BERT modules whose outputs are attention inputs (the embeddings, then each layer's output)
_BERT_INPUTS = (bert.Embeddings, bert.Layer)


def _stack(rows: list[dict]) -> dict[str, jax.Array]:
    return {name: jnp.stack([r[name] for r in rows]) for name in QUANTITIES}


def _targets(spec, variables, adapters, names: dict, what: str) -> tuple[dict, dict, dict]:
    """For ``names`` (``{layer: {projection: parameter path}}``): the base kernels by path, their updates
    (`_updates`) and the variables to run (the adapters merged in, when there are any)."""
    kernels = {keys: _leaf(variables, keys, what) for row in names.values() for keys in row.values()}
    updates = _updates(spec, variables, adapters, kernels)
    run_vars = variables if spec is None else merge(spec, variables, adapters, dequantize=True)
    return kernels, updates, run_vars


def _llama_regime(model, variables, input_ids, spec, adapters, attention_mask) -> dict[str, jax.Array]:
    cfg = model.cfg
    B, S = input_ids.shape
    plain = model.clone(remat=False, scan_layers=False, attention="dense", token_sharding=None)
    names = {
        i: {p: ("params", "model", "layers", str(i), "self_attn", p, "kernel") for p in ("q_proj", "k_proj")}
        for i in range(cfg.num_hidden_layers)
    }
    kernels, updates, run_vars = _targets(spec, variables, adapters, names, "llama")
    _, state = plain.apply(
        run_vars,
        input_ids,
        attention_mask,
        capture_intermediates=lambda mdl, method: method == "__call__" and mdl.name == "input_layernorm",
        mutable=["intermediates"],
    )
    layers = state["intermediates"]["model"]["layers"]
    cos, sin = llama.rope_tables(cfg, jnp.arange(S, dtype=jnp.int32)[None, :], jnp.float32)
    valid = jnp.ones((B, S), bool) if attention_mask is None else jnp.asarray(attention_mask) != 0
    slots = jnp.arange(S)
    causal = slots[None, :] <= slots[:, None]
    rows = []
    for i, row in names.items():
        mask = causal[None, :, :] & valid[:, None, :] & valid[:, :, None]
        w = cfg.window(i)
        if w is not None:
            mask = mask & (slots[None, :] > slots[:, None] - w)[None, :, :]
        x = layers[str(i)]["input_layernorm"]["__call__"][0].reshape(B, S, cfg.hidden_size)
        attn = variables["params"]["model"]["layers"][str(i)]["self_attn"]
        rows.append(
            attention_regime(
                x,
                kernels[row["q_proj"]],
                kernels[row["k_proj"]],
                updates.get(row["q_proj"]),
                updates.get(row["k_proj"]),
                num_heads=cfg.num_attention_heads,
                num_kv_heads=cfg.num_key_value_heads,
                b_q=attn["q_proj"].get("bias") if cfg.qkv_bias else None,
                b_k=attn["k_proj"].get("bias") if cfg.qkv_bias else None,
                rope=(cos, sin),
                mask_BxSxS=mask,
            )
        )
    return _stack(rows)


def _bert_regime(model, variables, input_ids, spec, adapters, attention_mask, token_type_ids) -> dict[str, jax.Array]:
    cfg = model.cfg
    B, S = input_ids.shape
    plain = model.clone(remat=False, attention="dense", token_sharding=None)
    base = ("params", "encoder", "layer")
    names = {
        i: {p: base + (str(i), "attention", "self", p, "kernel") for p in ("query", "key")}
        for i in range(cfg.num_hidden_layers)
    }
    kernels, updates, run_vars = _targets(spec, variables, adapters, names, "bert")
    _, state = plain.apply(
        run_vars,
        input_ids,
        attention_mask,
        token_type_ids,
        capture_intermediates=lambda mdl, method: method == "__call__" and isinstance(mdl, _BERT_INPUTS),
        mutable=["intermediates"],
    )
    inter = state["intermediates"]
    inputs = [inter["embeddings"]["__call__"][0]]
    inputs += [inter["encoder"]["layer"][str(i)]["__call__"][0] for i in range(cfg.num_hidden_layers - 1)]
    valid = jnp.ones((B, S), bool) if attention_mask is None else jnp.asarray(attention_mask) != 0
    mask = valid[:, None, :] & valid[:, :, None]
    rows = []
    for i, row in names.items():
        sa = variables["params"]["encoder"]["layer"][str(i)]["attention"]["self"]
        rows.append(
            attention_regime(
                inputs[i].reshape(B, S, cfg.hidden_size),
                kernels[row["query"]],
                kernels[row["key"]],
                updates.get(row["query"]),
                updates.get(row["key"]),
                num_heads=cfg.num_attention_heads,
                b_q=sa["query"].get("bias"),
                b_k=sa["key"].get("bias"),
                mask_BxSxS=mask,
            )
        )
    return _stack(rows)


def lora_norm_regime(
    model: nn.Module,
    variables: dict,
    input_ids: jax.Array,
    spec: Any = None,
    adapters: Any = None,
    *,
    attention_mask: jax.Array | None = None,
    token_type_ids: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """`attention_regime` of every attention layer of a lorajax Llama or BERT model on one batch.

    Args:
      model: a `lorajax.models.llama.LlamaForCausalLM` or `lorajax.models.bert.BertModel` (its remat,
        layer scan and attention core are ignored: the diagnostic runs the plain dense forward).
      variables: ``{"params": ...}`` of the frozen base (quantised leaves are dequantised).
      input_ids: ``[B, S]`` int tokens.
      spec, adapters: the `lorajax.Spec` and adapters (both, or neither for the base alone). ``X``
        is taken from the adapted model; the updates of the targeted q/k kernels enter the norms.
      attention_mask: ``[B, S]`` (1 keep, 0 pad); padded positions are left out of the max |logit|.
      token_type_ids: BERT only.

    Returns ``{name: [n_layers] float32}`` for every name in `QUANTITIES`. Pure and jittable:
    ``jax.jit(lambda v, a, ids: lora_norm_regime(model, v, ids, spec, a))``.

    Raises:
      TypeError: for another model class.
      ValueError: for a bad ``input_ids`` / mask shape, spec without adapters (or the reverse), adapters
        that do not fit the params, or an input-dependent (factored-only) variant.
    """
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
    if attention_mask is not None and jnp.shape(attention_mask) != input_ids.shape:
        raise ValueError(
            f"attention_mask must have the shape of input_ids {input_ids.shape}, got {jnp.shape(attention_mask)}"
        )
    if not isinstance(variables, dict) or "params" not in variables:
        raise ValueError("variables must be the model's variables dict {'params': ...}")
    variables = quant.dequantize(variables)
    if isinstance(model, llama.LlamaForCausalLM):
        if token_type_ids is not None:
            raise ValueError("token_type_ids is for BERT models; a Llama model takes none")
        return _llama_regime(model, variables, input_ids, spec, adapters, attention_mask)
    if isinstance(model, bert.BertModel):
        return _bert_regime(model, variables, input_ids, spec, adapters, attention_mask, token_type_ids)
    raise TypeError(
        f"lora_norm_regime supports lorajax.models.llama.LlamaForCausalLM and lorajax.models.bert.BertModel, got "
        f"{type(model).__name__}; for another model capture X and call attention_regime per layer"
    )


def flat_metrics(regime: dict[str, Any], prefix: str = "diag") -> dict[str, float]:
    """``{"<prefix>/layer<i>/<name>": float}`` of a `lora_norm_regime` result (host floats, for logging)."""
    host = {k: np.asarray(v) for k, v in regime.items()}
    missing = [k for k in QUANTITIES if k not in host]
    if missing:
        raise ValueError(f"not a lora_norm_regime result: missing {missing}")
    n = host["gamma"].shape[0]
    return {f"{prefix}/layer{i}/{k}": float(host[k][i]) for i in range(n) for k in QUANTITIES}


# ----------------------------------------------------------------------------- Taylor features (research)


def taylor_rank(dim: int, degree: int) -> int:
    """Feature count ``Σ_{j=0..g} d^j`` of `taylor_features` (full tensor powers)."""
    return sum(dim**j for j in range(degree + 1))


def taylor_features(x: jax.Array, degree: int) -> jax.Array:
    """``φ(x) = [x^{⊗j} / √(j!)]_{j=0..g}``: ``x [..., d]`` -> ``[..., Σ_{j≤g} d^j]``.

    ``⟨φ(q), φ(k)⟩ = Σ_{j≤g} (q·k)^j / j!``, the degree-``g`` Taylor polynomial of ``exp(q·k)``; so
    ``exp(Q Kᵀ) ≈ φ(Q) φ(K)ᵀ`` with rank ``Σ_{j≤g} d^j``, accurate when the entries are small.
    Raises ValueError for a negative or non-integer degree, or more than `MAX_FEATURES` features.
    """
    if isinstance(degree, bool) or not isinstance(degree, (int, np.integer)) or degree < 0:
        raise ValueError(f"degree must be an integer >= 0, got {degree!r}")
    x = jnp.asarray(x)
    if x.ndim < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must be [..., d] with d >= 1, got shape {x.shape}")
    d = x.shape[-1]
    if taylor_rank(d, int(degree)) > MAX_FEATURES:
        raise ValueError(
            f"degree {degree} on d={d} gives {taylor_rank(d, int(degree))} features (> {MAX_FEATURES}); "
            "lower the degree"
        )
    lead = x.shape[:-1]
    term = jnp.ones(lead + (1,), x.dtype)
    parts = [term]
    for j in range(1, int(degree) + 1):
        term = (term[..., :, None] * x[..., None, :]).reshape(lead + (d**j,))
        parts.append(term / math.sqrt(math.factorial(j)))
    return jnp.concatenate(parts, axis=-1)


def lowrank_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, degree: int, *, scale: float | None = None, causal: bool = False
) -> jax.Array:
    """Softmax attention through Taylor features: ``q, k [..., L, d]``, ``v [..., L, e]`` -> ``[..., L, e]``.

    ``softmax(scale·q kᵀ) v ≈ φ(q') (φ(k')ᵀ v) / φ(q') (φ(k')ᵀ 1)`` with ``q' = √scale·q``,
    ``k' = √scale·k`` (default ``scale = 1/√d``), in O(L·k·e) for rank ``k``; ``causal`` sums keys up
    to each query (prefix sums, O(L·k·e) memory). Even degrees keep the kernel positive
    (``Σ_{j≤2m} t^j/j! > 0`` for all real t); odd degrees may give a near-zero denominator. Research
    use: accurate only in the small-entry regime, no speed-up promised.
    """
    if q.shape != k.shape or q.ndim < 2:
        raise ValueError(f"q and k must both be [..., L, d], got {q.shape} and {k.shape}")
    if v.ndim != q.ndim or v.shape[:-1] != q.shape[:-1]:
        raise ValueError(f"v must be [..., L, e] matching q's leading shape {q.shape[:-1]}, got {v.shape}")
    d = q.shape[-1]
    c = math.sqrt(1.0 / math.sqrt(d) if scale is None else float(scale))
    fq, fk = taylor_features(q * c, degree), taylor_features(k * c, degree)
    if causal:
        kv = jnp.cumsum(fk[..., :, :, None] * v[..., :, None, :], axis=-3)  # [..., L, k, e]
        num = jnp.einsum("...lk,...lke->...le", fq, kv)
        den = jnp.einsum("...lk,...lk->...l", fq, jnp.cumsum(fk, axis=-2))
    else:
        num = jnp.einsum("...lk,...ke->...le", fq, jnp.einsum("...lk,...le->...ke", fk, v))
        den = jnp.einsum("...lk,...k->...l", fq, jnp.sum(fk, axis=-2))
    return num / den[..., None]


def taylor_error_table(
    bounds: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0),
    degrees: tuple[int, ...] = (2, 4, 6),
    length: int = 256,
    dim: int = 4,
    seed: int = 0,
) -> list[dict[str, float]]:
    """Relative max error of ``exp(QKᵀ) ≈ φ(Q) φ(K)ᵀ``, entries of Q, K ``[L, d]`` uniform in ``[−B, B]``.

    One row per bound: ``{"bound": B, "g=<g>": max|φ(Q)φ(K)ᵀ − exp(QKᵀ)| / max exp(QKᵀ), ...}``
    (the same Q, K for every degree; numpy float64, seeded by ``seed``). Also gives ``"rank g=<g>"``.
    """
    if length < 1 or dim < 1:
        raise ValueError(f"length and dim must be >= 1, got length={length}, dim={dim}")
    rng = np.random.default_rng(seed)
    rows = []
    for bound in bounds:
        if not bound > 0:
            raise ValueError(f"bounds must be > 0, got {bound}")
        q = rng.uniform(-bound, bound, (length, dim))
        k = rng.uniform(-bound, bound, (length, dim))
        exact = np.exp(q @ k.T)
        row: dict[str, float] = {"bound": float(bound)}
        for g in degrees:
            approx = _np_features(q, g) @ _np_features(k, g).T
            row[f"g={g}"] = float(np.abs(approx - exact).max() / np.abs(exact).max())
            row[f"rank g={g}"] = float(taylor_rank(dim, g))
        rows.append(row)
    return rows


def _np_features(x: np.ndarray, degree: int) -> np.ndarray:
    """`taylor_features` in numpy float64 (the table's reference precision)."""
    if isinstance(degree, bool) or not isinstance(degree, (int, np.integer)) or degree < 0:
        raise ValueError(f"degree must be an integer >= 0, got {degree!r}")
    n, d = x.shape
    if taylor_rank(d, int(degree)) > MAX_FEATURES:
        raise ValueError(f"degree {degree} on d={d} gives too many features; lower the degree")
    term = np.ones((n, 1))
    parts = [term]
    for j in range(1, int(degree) + 1):
        term = (term[:, :, None] * x[:, None, :]).reshape(n, d**j)
        parts.append(term / math.sqrt(math.factorial(j)))
    return np.concatenate(parts, axis=1)
