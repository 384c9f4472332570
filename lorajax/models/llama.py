"""Llama-family decoder LMs (Llama 1/2/3, Qwen2, Mistral) in linen, named like Hugging Face.

Loads ``LlamaForCausalLM``, ``Qwen2ForCausalLM`` and ``MistralForCausalLM``
checkpoints through `lorajax.models.from_pretrained` and writes them back with
`lorajax.models.save_pretrained`. Module and parameter names equal HF's, so
the lorajax module name of a weight (its params path joined by ``.``, e.g.
``model.layers.0.self_attn.q_proj``) is PEFT's module name and PEFT adapters
load with `lorajax.peft.load`. Every projection is an ``nn.Dense`` (so the
``factored`` mode of `lorajax.adapt` reaches it) applied to 2-D token
activations ``[B·S, D]`` (3-D activations cost ~1.4x on XLA-CPU).

Maths (one decoder layer, pre-norm; ``x`` is the residual stream)::

    h = x + o_proj(Attn(RMSNorm(x)))
    y = h + down_proj(silu(gate_proj(RMSNorm(h))) * up_proj(RMSNorm(h)))

* **RMSNorm** (computed in float32, as HF):
  ``RMSNorm(x) = weight * (x / sqrt(mean(x²) + eps)).astype(x.dtype)``.
* **RoPE** with HF's *rotate-half* convention: for head dim ``d`` and position
  ``p``, ``θ_i = p · inv_freq_i`` with ``inv_freq_i = theta^(-2i/d)``
  (``i < d/2``), ``cos = cos([θ, θ])``, ``sin = sin([θ, θ])`` and
  ``rope(q) = q·cos + rotate_half(q)·sin`` where
  ``rotate_half([q₁, q₂]) = [-q₂, q₁]`` (halves, not interleaved pairs).
  Scaling: ``linear`` divides ``inv_freq`` by ``factor``; ``dynamic`` (NTK)
  raises ``theta`` to ``theta·(factor·L/L₀ − (factor−1))^(d/(d−2))`` when the
  longest position ``L`` exceeds ``L₀ = max_position_embeddings``;
  ``llama3`` divides low frequencies (wavelength ``> L_orig/low_freq_factor``)
  by ``factor``, keeps high ones (``< L_orig/high_freq_factor``) and
  interpolates in between with ``s = (L_orig/λ − low)/(high − low)``:
  ``(1−s)·f/factor + s·f`` (``modeling_rope_utils._compute_llama3_parameters``).
* **Attention with GQA**: ``H`` query heads share ``K`` key/value heads
  (``G = H/K`` query heads per kv head; query head ``h`` reads kv head
  ``h // G``, like HF's ``repeat_kv``):
  ``softmax(q kᵀ / sqrt(d) + mask) v``, the softmax in float32. The mask is
  causal, drops padded keys (``attention_mask == 0``) and, for Mistral and
  Qwen2's sliding layers, keys ``window`` or more slots behind the query
  (``kv_slot > q_slot − window``, as ``masking_utils.sliding_window_overlay``).
* **SwiGLU** MLP: ``down_proj(silu(gate_proj(x)) * up_proj(x))``.

Family differences: Llama has ``attention_bias`` (q/k/v/o) and ``mlp_bias``
flags; Qwen2 always has q/k/v biases and never an o_proj bias (its
``Config.attention_bias`` is True and means q/k/v only) and may use sliding
windows on the layers ``layer_types`` names; Mistral has no biases and one
``sliding_window`` for every layer.

Shapes: ``input_ids [B, S]`` int32 -> logits ``[B, S, V]`` in the params'
dtype (bf16 params compute in bf16; norms and softmax in float32).

KV cache: an explicit pytree, ``init_cache(cfg, B, T)`` = one
``{"k", "v"}`` dict of ``[B, T, K, d]`` arrays per layer.
``model.apply(vars, ids, attention_mask=mask_BxT, position_ids=pos,
cache=cache, cache_index=i)`` writes the new keys/values at slots
``i .. i+S-1``, attends over all ``T`` slots (causal in slot order, padding
from ``mask_BxT`` which covers the whole cache) and returns
``(logits, new_cache)``. `generate` uses it: one jitted prefill, then a
``lax.while_loop`` of one-token decode steps.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from lorajax.models import llama
  >>> cfg = llama.Config(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
  ...                    num_attention_heads=4, num_key_value_heads=2)
  >>> model = llama.build(cfg)
  >>> params = model.init(jax.random.key(0), *llama.example_inputs(cfg))["params"]
  >>> sorted(params["model"]["layers"]["0"]["self_attn"])
  ['k_proj', 'o_proj', 'q_proj', 'v_proj']
  >>> ids = jnp.array([[1, 2, 3]], jnp.int32)
  >>> model.apply({"params": params}, ids).shape
  (1, 3, 32)
  >>> llama.generate(model, params, ids, max_new_tokens=4).shape
  (1, 7)
  >>> sorted(llama.param_map(cfg))[:2]
  ['lm_head.weight', 'model.embed_tokens.weight']

References:
  H. Touvron et al., "LLaMA: Open and Efficient Foundation Language Models",
  arXiv:2302.13971 (2023). J. Su et al., "RoFormer: Enhanced Transformer with
  Rotary Position Embedding", arXiv:2104.09864. J. Ainslie et al., "GQA",
  arXiv:2305.13245. Hugging Face transformers ``models/llama/modeling_llama.py``,
  ``models/qwen2/modeling_qwen2.py``, ``models/mistral/modeling_mistral.py``,
  ``modeling_rope_utils.py``, ``masking_utils.py`` (v5).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lorajax import layer_scan
from lorajax.models.attention import IMPLEMENTATIONS, dense_attention, self_attention

__all__ = [
    "Config",
    "LlamaForCausalLM",
    "build",
    "param_map",
    "IGNORED",
    "PREFIXES",
    "example_inputs",
    "init_cache",
    "generate",
    "rope_inv_freq",
    "rope_tables",
    "apply_rope",
    "output_kernel",
]

#: HF ``model_type`` -> the ``architectures`` entry written by `Config.to_hf`.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
LAYER_TYPES = ("full_attention", "sliding_attention")

#: Checkpoint tensors that are not parameters: rotary buffers of old checkpoints, and a
#: ``lm_head.weight`` saved next to tied embeddings (HF ties it to the embedding and ignores it).
IGNORED = r"model\.(layers\.\d+\.self_attn\.)?rotary_emb\.(original_)?inv_freq|lm_head\.weight"
PREFIXES = ()

# config.json keys that describe the file, not the model; dropped on load, not written back.
_DROPPED = {"torch_dtype", "dtype", "transformers_version", "_name_or_path"}
# config.json keys that `Config` models (everything else is kept verbatim in `Config.extra`).
_MODELLED = {
    "model_type",
    "architectures",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "partial_rotary_factor",
    "max_position_embeddings",
    "tie_word_embeddings",
    "attention_bias",
    "mlp_bias",
    "sliding_window",
    "use_sliding_window",
    "layer_types",
    "hidden_act",
}


@dataclasses.dataclass(frozen=True)
class Config:
    """Architecture of a Llama-family model (the fields of HF's config that change the maths).

    ``num_key_value_heads`` defaults to ``num_attention_heads`` and ``head_dim``
    to ``hidden_size // num_attention_heads``. ``sliding_window`` is the
    effective window (None: full attention); with ``layer_types`` (Qwen2) it
    applies only to layers marked ``"sliding_attention"``, without (Mistral) to
    every layer. ``attention_bias`` is HF's flag for Llama (q/k/v/o biases); for
    Qwen2 it is True and means q/k/v only; Mistral has no biases (see
    ``qkv_bias`` / ``o_bias`` / ``use_mlp_bias``). ``extra`` keeps the other
    config.json entries (token ids, ...) as ``(key, json)`` pairs so `to_hf`
    writes them back.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    model_type: str = "llama"
    architectures: tuple[str, ...] | None = None
    extra: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.layer_types is not None:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if self.model_type not in ARCHITECTURES:
            raise ValueError(
                f"unsupported model_type {self.model_type!r}; lorajax.models.llama supports {sorted(ARCHITECTURES)}"
            )
        object.__setattr__(self, "architectures", tuple(self.architectures or (ARCHITECTURES[self.model_type],)))
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"unsupported RoPE type {self.rope_type!r}; supported: {list(ROPE_TYPES)}")
        assert self.num_key_value_heads is not None and self.head_dim is not None  # filled in above
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None, got {self.sliding_window}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_hidden_layers:
                raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
            bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if bad:
                raise ValueError(f"unsupported layer_types {bad}; supported: {list(LAYER_TYPES)}")

    # ------------------------------------------------------------------ derived
    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias and self.model_type != "mistral"

    @property
    def o_bias(self) -> bool:
        return self.attention_bias and self.model_type == "llama"

    @property
    def use_mlp_bias(self) -> bool:
        return self.mlp_bias and self.model_type == "llama"

    def window(self, layer: int) -> int | None:
        """Sliding window of ``layer`` (None: full causal attention)."""
        if self.sliding_window is None:
            return None
        if self.layer_types is None:
            return self.sliding_window
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None

    # ------------------------------------------------------------------ HF config
    @classmethod
    def from_hf(cls, config: dict) -> "Config":
        """The Config of a HF ``config.json`` dict (transformers 4 or 5 layout).

        Raises ValueError for a missing required field or a feature this
        module does not implement (RoPE types other than default / linear /
        dynamic / llama3, partial rotary, activations other than SiLU,
        quantised weights, per-layer RoPE).
        """
        c = dict(config)
        model_type = c.get("model_type")
        if model_type not in ARCHITECTURES:
            raise ValueError(
                f"unsupported model_type {model_type!r}; lorajax.models.llama supports {sorted(ARCHITECTURES)}"
            )
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if c.get(k) is None]
        if missing:
            raise ValueError(f"{model_type} config lacks {missing}")
        act = c.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"unsupported hidden_act {act!r}: Llama-family MLPs here use SiLU")
        if c.get("quantization_config"):
            raise ValueError("quantized checkpoints (quantization_config) are not supported")
        max_pos = int(c.get("max_position_embeddings", {"llama": 2048, "qwen2": 32768, "mistral": 131072}[model_type]))

        # RoPE. transformers 5 gives `rope_scaling` (old name) priority over `rope_parameters`;
        # rope_theta comes from the dict, else the top level, else 10000.
        rope: Any = c.get("rope_scaling") or c.get("rope_parameters") or {}
        if not isinstance(rope, dict):
            raise ValueError(f"rope_parameters must be a dict, got {rope!r}")
        if any(isinstance(v, dict) or v is None and k in LAYER_TYPES for k, v in rope.items()):
            raise ValueError(f"per-layer-type rope_parameters are not supported: {sorted(rope)}")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ValueError(
                f"unsupported RoPE type {rope_type!r} (rope_parameters={rope}); supported: {list(ROPE_TYPES)}"
            )
        partial = rope.get("partial_rotary_factor", c.get("partial_rotary_factor"))
        if partial is not None and float(partial) != 1.0:
            raise ValueError(f"partial_rotary_factor={partial} is not supported")
        top_theta: float = c.get("rope_theta") or 10000.0
        theta = float(rope.get("rope_theta", top_theta))
        kw: dict[str, Any] = {"rope_type": rope_type, "rope_theta": theta}
        if rope_type != "default":
            if "factor" not in rope:
                raise ValueError(f"RoPE type {rope_type!r} needs a 'factor' (rope_parameters={rope})")
            kw["rope_factor"] = float(rope["factor"])
        if rope_type == "llama3":
            for k in ("low_freq_factor", "high_freq_factor"):
                if k not in rope:
                    raise ValueError(f"RoPE type 'llama3' needs {k!r} (rope_parameters={rope})")
            kw["rope_low_freq_factor"] = float(rope["low_freq_factor"])
            kw["rope_high_freq_factor"] = float(rope["high_freq_factor"])
            # HF: a top-level original_max_position_embeddings wins over the dict's
            kw["rope_original_max_position_embeddings"] = int(
                c["original_max_position_embeddings"]
                if c.get("original_max_position_embeddings")
                else rope.get("original_max_position_embeddings", max_pos)
            )

        layer_types = None
        if model_type == "mistral":
            window = c.get("sliding_window", 4096)
            attention_bias = mlp_bias = False
        elif model_type == "qwen2":
            window = c.get("sliding_window", 4096) if c.get("use_sliding_window", False) else None
            n = int(c["num_hidden_layers"])
            layer_types = c.get("layer_types") or [
                "sliding_attention"
                if window is not None and i >= int(c.get("max_window_layers", 28))
                else "full_attention"
                for i in range(n)
            ]
            attention_bias, mlp_bias = True, False
        else:
            window = None
            attention_bias, mlp_bias = bool(c.get("attention_bias", False)), bool(c.get("mlp_bias", False))
        extra = tuple(sorted((k, json.dumps(v)) for k, v in c.items() if k not in _MODELLED | _DROPPED))
        return cls(
            vocab_size=int(c["vocab_size"]),
            hidden_size=int(c["hidden_size"]),
            intermediate_size=int(c["intermediate_size"]),
            num_hidden_layers=int(c["num_hidden_layers"]),
            num_attention_heads=int(c["num_attention_heads"]),
            num_key_value_heads=None if c.get("num_key_value_heads") is None else int(c["num_key_value_heads"]),
            head_dim=None if c.get("head_dim") is None else int(c["head_dim"]),
            rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            mlp_bias=mlp_bias,
            sliding_window=None if window is None else int(window),
            layer_types=None if layer_types is None else tuple(layer_types),
            model_type=model_type,
            architectures=c.get("architectures"),
            extra=extra,
            **kw,
        )

    def rope_parameters(self) -> dict:
        """HF's ``rope_parameters`` dict for this config."""
        rope: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_type != "default":
            rope["factor"] = self.rope_factor
        if self.rope_type == "llama3":
            rope.update(
                low_freq_factor=self.rope_low_freq_factor,
                high_freq_factor=self.rope_high_freq_factor,
                original_max_position_embeddings=self.rope_original_max_position_embeddings
                or self.max_position_embeddings,
            )
        return rope

    def to_hf(self) -> dict:
        """A ``config.json`` dict that transformers loads as the same model (``Config.from_hf`` inverts it)."""
        out = {k: json.loads(v) for k, v in self.extra}
        assert self.architectures is not None  # filled in by __post_init__
        rope = self.rope_parameters()
        out.update(
            model_type=self.model_type,
            architectures=list(self.architectures),
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            hidden_act="silu",
            rope_parameters=rope,
            rope_theta=self.rope_theta,  # transformers 4 reads these two
            rope_scaling=None if self.rope_type == "default" else dict(rope),
        )
        if self.model_type == "qwen2" and self.head_dim == self.hidden_size // self.num_attention_heads:
            del out["head_dim"]  # Qwen2Config has no head_dim field; HF derives it the same way
        if self.model_type == "llama":
            out.update(attention_bias=self.attention_bias, mlp_bias=self.mlp_bias)
        elif self.model_type == "mistral":
            out.update(sliding_window=self.sliding_window)
        else:
            out.update(
                use_sliding_window=self.sliding_window is not None,
                sliding_window=self.sliding_window,
                layer_types=list(self.layer_types or ["full_attention"] * self.num_hidden_layers),
            )
        return out


# ---------------------------------------------------------------------------- RoPE
def rope_inv_freq(cfg: Config) -> np.ndarray:
    """``inv_freq [head_dim/2]`` (float32) as HF computes it at init (for ``dynamic``: up to L₀)."""
    dim = cfg.head_dim
    assert dim is not None  # filled in by Config.__post_init__
    exps = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    base = cfg.rope_theta
    if cfg.rope_type == "dynamic":  # HF's init value, seq_len = max_position_embeddings
        f = cfg.rope_factor
        base = base * ((f * cfg.max_position_embeddings / cfg.max_position_embeddings) - (f - 1)) ** (dim / (dim - 2))
    inv = (np.float32(1.0) / (np.float32(base) ** exps)).astype(np.float32)
    if cfg.rope_type == "linear":
        inv = (inv / np.float32(cfg.rope_factor)).astype(np.float32)
    elif cfg.rope_type == "llama3":
        factor = np.float32(cfg.rope_factor)
        low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        old = cfg.rope_original_max_position_embeddings or cfg.max_position_embeddings
        low_wavelen, high_wavelen = old / low, old / high
        wavelen = (np.float32(2 * math.pi) / inv).astype(np.float32)
        inv_l = np.where(wavelen > low_wavelen, inv / factor, inv).astype(np.float32)
        smooth = ((np.float32(old) / wavelen - np.float32(low)) / np.float32(high - low)).astype(np.float32)
        smoothed = ((1 - smooth) * inv_l / factor + smooth * inv_l).astype(np.float32)
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(medium, smoothed, inv_l).astype(np.float32)
    return inv


def _inv_freq(cfg: Config, pos_BxS: jax.Array) -> jax.Array:
    inv = jnp.asarray(rope_inv_freq(cfg))
    if cfg.rope_type != "dynamic":
        return inv
    # dynamic NTK: theta recomputed from the longest position of this call when it exceeds L₀, as HF's
    # dynamic_rope_update does for a fresh model and in generate (with a cache, earlier keys keep the rotation
    # they were cached with, as in HF). Stateless: HF's module also keeps the grown frequencies for later
    # calls with L between L₀ and the longest length seen, which lorajax does not imitate.
    dim, f, l0 = cfg.head_dim, cfg.rope_factor, cfg.max_position_embeddings
    assert dim is not None  # filled in by Config.__post_init__
    seq_len = jnp.max(pos_BxS).astype(jnp.float32) + 1
    base = cfg.rope_theta * ((f * seq_len / l0) - (f - 1)) ** (dim / (dim - 2))
    exps = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
    dyn = 1.0 / (base**exps)
    return jnp.where(seq_len > l0, dyn, inv)


def _rope_tables(cfg: Config, pos_BxS: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """``cos, sin [B, S, d]`` (HF: ``emb = cat(freqs, freqs)``), cast to ``dtype``."""
    inv_h = _inv_freq(cfg, pos_BxS)
    freqs_BxSxh = pos_BxS.astype(jnp.float32)[:, :, None] * inv_h[None, None, :]
    emb_BxSxd = jnp.concatenate([freqs_BxSxh, freqs_BxSxh], axis=-1)
    return jnp.cos(emb_BxSxd).astype(dtype), jnp.sin(emb_BxSxd).astype(dtype)


def _rope_constants(cfg: Config, S: int, dtype) -> tuple[jax.Array, jax.Array]:
    """``cos, sin [1, S, d]`` for the default positions ``0 .. S-1`` as compile-time constants.

    `_rope_tables` itself, evaluated eagerly while tracing (``jax.ensure_compile_time_eval``): the same
    arithmetic, and the step carries two constant tables instead of recomputing sin/cos in every layer.
    """
    with jax.ensure_compile_time_eval():
        return _rope_tables(cfg, jnp.arange(S, dtype=jnp.int32)[None, :], dtype)


def _rotate_half(x: jax.Array) -> jax.Array:
    h = x.shape[-1] // 2
    return jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def _apply_rope(x_BxSxHxd: jax.Array, cos_BxSxd: jax.Array, sin_BxSxd: jax.Array) -> jax.Array:
    """``x·cos + rotate_half(x)·sin``; ``cos, sin`` are ``[B, S, d]`` or ``[1, S, d]`` (default positions)."""
    cos, sin = cos_BxSxd[:, :, None, :], sin_BxSxd[:, :, None, :]
    return x_BxSxHxd * cos + _rotate_half(x_BxSxHxd) * sin


# public names for decoders built outside the module (lorajax.lragent_decode), so RoPE stays one implementation
rope_tables = _rope_tables
apply_rope = _apply_rope


# ---------------------------------------------------------------------------- modules
class RMSNorm(nn.Module):
    """HF's ``LlamaRMSNorm``: float32 statistics, ``weight * x_normed.astype(x.dtype)``; param ``weight``."""

    eps: float = 1e-6
    param_dtype: Any = jnp.float32
    #: compute dtype: the weight and the normalised x are cast to it (None: x's dtype, weight as stored)
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        h = x.astype(jnp.float32)
        var = jnp.mean(h * h, axis=-1, keepdims=True)
        h = h * jax.lax.rsqrt(var + self.eps)
        if self.dtype is not None:
            w = w.astype(self.dtype)
        return w.reshape((1,) * (x.ndim - 1) + w.shape) * h.astype(self.dtype or x.dtype)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE; ``q_proj/k_proj/v_proj/o_proj`` on ``[B·S, D]``.

    ``attention`` without a cache: `lorajax.models.attention.self_attention` (``"auto"`` = the fused CPU
    kernel where it runs, else ``"blockwise"``: query blocks of ``block`` rows skip the keys no query of
    the block can see; ``"fused"``; ``"dense"`` forms the whole score matrix, the reference). With a
    cache: always dense.
    """

    cfg: Config
    param_dtype: Any = jnp.float32
    dtype: Any = None
    attention: str = "auto"
    block: int | None = None
    window: int | None = None

    @nn.compact
    def __call__(self, x_TxD, cos_BxSxd, sin_BxSxd, mask_BxSxT, cache=None, cache_index=None):
        cfg = self.cfg
        _, S, d = cos_BxSxd.shape
        B = x_TxD.shape[0] // S
        H, K = cfg.num_attention_heads, cfg.num_key_value_heads
        assert K is not None  # filled in by Config.__post_init__
        G = H // K
        dense = functools.partial(nn.Dense, param_dtype=self.param_dtype, dtype=self.dtype)
        q = dense(H * d, use_bias=cfg.qkv_bias, name="q_proj")(x_TxD).reshape(B, S, H, d)
        k = dense(K * d, use_bias=cfg.qkv_bias, name="k_proj")(x_TxD).reshape(B, S, K, d)
        v = dense(K * d, use_bias=cfg.qkv_bias, name="v_proj")(x_TxD).reshape(B, S, K, d)
        q = _apply_rope(q, cos_BxSxd, sin_BxSxd)
        k = _apply_rope(k, cos_BxSxd, sin_BxSxd)
        new_cache = None
        if cache is not None:
            start = (0, jnp.asarray(cache_index, jnp.int32), 0, 0)
            k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), start)
            v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), start)
            new_cache = {"k": k, "v": v}
            k, v = k.astype(q.dtype), v.astype(q.dtype)
        q_BxSxKxGxd = q.reshape(B, S, K, G, d)
        if cache is None:
            o = self_attention(
                q_BxSxKxGxd, k, v, mask_BxSxT, implementation=self.attention, window=self.window, block=self.block
            )
        else:
            o = dense_attention(q_BxSxKxGxd, k, v, mask_BxSxT)
        o_TxHd = o.reshape(B * S, H * d)
        out = dense(cfg.hidden_size, use_bias=cfg.o_bias, name="o_proj")(o_TxHd)
        return out, new_cache


class MLP(nn.Module):
    """SwiGLU: ``down_proj(silu(gate_proj(x)) * up_proj(x))`` on ``[B·S, D]``."""

    cfg: Config
    param_dtype: Any = jnp.float32
    dtype: Any = None

    @nn.compact
    def __call__(self, x_TxD: jax.Array) -> jax.Array:
        cfg = self.cfg
        dense = functools.partial(nn.Dense, use_bias=cfg.use_mlp_bias, param_dtype=self.param_dtype, dtype=self.dtype)
        gate_TxF = dense(cfg.intermediate_size, name="gate_proj")(x_TxD)
        up_TxF = dense(cfg.intermediate_size, name="up_proj")(x_TxD)
        return dense(cfg.hidden_size, name="down_proj")(jax.nn.silu(gate_TxF) * up_TxF)


class DecoderLayer(nn.Module):
    cfg: Config
    param_dtype: Any = jnp.float32
    dtype: Any = None
    attention: str = "auto"
    attention_block: int | None = None
    window: int | None = None

    @nn.compact
    def __call__(self, x_TxD, cos, sin, mask_BxSxT, cache=None, cache_index=None):
        cfg = self.cfg
        pd, dt = self.param_dtype, self.dtype
        h = RMSNorm(cfg.rms_norm_eps, pd, dt, name="input_layernorm")(x_TxD)
        attn = Attention(cfg, pd, dt, self.attention, self.attention_block, self.window, name="self_attn")
        a, new_cache = attn(h, cos, sin, mask_BxSxT, cache, cache_index)
        x_TxD = x_TxD + a
        h = RMSNorm(cfg.rms_norm_eps, pd, dt, name="post_attention_layernorm")(x_TxD)
        return x_TxD + MLP(cfg, pd, dt, name="mlp")(h), new_cache


#: ``remat`` names -> ``jax.checkpoint_policies`` (what a recomputed layer may keep from its forward pass)
REMAT_POLICIES = {
    "nothing_saveable": "nothing_saveable",
    "dots_saveable": "dots_saveable",
    "dots_with_no_batch_dims_saveable": "dots_with_no_batch_dims_saveable",
    "everything_saveable": "everything_saveable",
}


def remat_policy(remat: bool | str):
    """``False`` (no remat), or the ``jax.checkpoint_policies`` function of ``remat`` (True = nothing_saveable)."""
    if remat is False or remat is None or remat == "none":
        return False
    name = "nothing_saveable" if remat is True else remat
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat={remat!r}; choose False, True, 'none' or one of {sorted(REMAT_POLICIES)}")
    return getattr(jax.checkpoint_policies, REMAT_POLICIES[name])


def check_compute_options(attention: str, attention_block: int | None, remat: bool | str) -> None:
    """A model's ``attention`` (a `lorajax.models.attention.IMPLEMENTATIONS` name), ``attention_block`` (None or
    >= 1) and ``remat`` (see `remat_policy`): ValueError naming the bad one (Llama, BERT and ViT share it)."""
    if attention not in IMPLEMENTATIONS:
        raise ValueError(f"attention={attention!r}; choose one of {list(IMPLEMENTATIONS)}")
    if attention_block is not None and attention_block < 1:
        raise ValueError(f"attention_block must be >= 1, got {attention_block}")
    remat_policy(remat)  # raises for an unknown policy name


def _constrain(x: jax.Array, sharding: Any) -> jax.Array:
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


class Layers(nn.Module):
    """The ``layers`` container: children named ``"0"``, ``"1"``, ... like HF's ModuleList.

    ``remat`` (True or a policy name of `REMAT_POLICIES`) recomputes each layer in the backward pass
    (``nn.remat``; True = ``"nothing_saveable"``, ``"dots_saveable"`` keeps the matmul outputs):
    only the layer inputs are kept, and under FSDP the all-gathered weights are
    gathered again instead of living from the forward to the backward pass.
    ``token_sharding`` (a ``jax.sharding.Sharding`` of the ``[B·S, D]`` hidden
    states, e.g. `lorajax.sharding.token_sharding`) pins the token axis to the
    batch mesh axes at every layer boundary, so that XLA's propagation gathers
    FSDP-sharded weights instead of the activations.
    """

    cfg: Config
    param_dtype: Any = jnp.float32
    remat: bool | str = False
    token_sharding: Any = None
    attention: str = "auto"
    attention_block: int | None = None
    dtype: Any = None
    scan: bool = False

    @nn.compact
    def __call__(self, x_TxD, cos, sin, masks: dict, cache=None, cache_index=None):
        if self.scan and cache is None and not self.is_initializing():
            return self._scanned(x_TxD, cos, sin, masks), None
        new_cache = []
        policy = remat_policy(self.remat)
        layer_cls = DecoderLayer if policy is False else nn.remat(DecoderLayer, policy=policy)
        for i in range(self.cfg.num_hidden_layers):
            x_TxD = _constrain(x_TxD, self.token_sharding)
            layer = layer_cls(
                self.cfg,
                self.param_dtype,
                self.dtype,
                self.attention,
                self.attention_block,
                self.cfg.window(i),
                name=str(i),
            )
            x_TxD, c = layer(
                x_TxD, cos, sin, masks[self.cfg.window(i)], None if cache is None else cache[i], cache_index
            )
            new_cache.append(c)
        return x_TxD, (None if cache is None else tuple(new_cache))

    def _scanned(self, x_TxD, cos, sin, masks: dict) -> jax.Array:
        """The layers as one `lorajax.layer_scan.scan` over their stacked parameters (no cache)."""
        cfg = self.cfg
        windows = {cfg.window(i) for i in range(cfg.num_hidden_layers)}
        if len(windows) > 1:
            raise ValueError(
                "scan_layers needs every layer alike, but this config mixes attention windows "
                f"{sorted(windows, key=str)} (sliding window on some layers); use scan_layers=False"
            )
        window = windows.pop()
        layer = DecoderLayer(
            cfg, self.param_dtype, self.dtype, self.attention, self.attention_block, window, parent=None
        )
        params = self.variables["params"]

        def apply_layer(p, x):
            return layer.apply({"params": p}, x, cos, sin, masks[window])[0]

        return layer_scan.scan(
            apply_layer,
            [params[str(i)] for i in range(cfg.num_hidden_layers)],
            x_TxD,
            prefix=".".join(str(p) for p in self.path),
            policy=remat_policy(self.remat),
            between=lambda h: _constrain(h, self.token_sharding),
        )


class LlamaModel(nn.Module):
    """HF's ``LlamaModel``: ``embed_tokens``, ``layers``, ``norm``. Returns hidden states ``[B·S, D]``."""

    cfg: Config
    param_dtype: Any = jnp.float32
    remat: bool | str = False
    token_sharding: Any = None
    attention: str = "auto"
    attention_block: int | None = None
    dtype: Any = None
    scan_layers: bool = False

    def setup(self):
        cfg = self.cfg
        self.embed_tokens = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            embedding_init=nn.initializers.normal(0.02),
        )
        self.layers = Layers(
            cfg,
            self.param_dtype,
            self.remat,
            self.token_sharding,
            self.attention,
            self.attention_block,
            self.dtype,
            self.scan_layers,
        )
        self.norm = RMSNorm(cfg.rms_norm_eps, self.param_dtype, self.dtype)

    def __call__(self, input_ids, attention_mask=None, position_ids=None, cache=None, cache_index=None):
        cfg = self.cfg
        B, S = input_ids.shape
        if cache is None:
            T, q_slots = S, jnp.arange(S, dtype=jnp.int32)
        else:
            if cache_index is None:
                raise ValueError("cache_index is required with cache")
            if len(cache) != cfg.num_hidden_layers:
                raise ValueError(f"cache has {len(cache)} layers, the model {cfg.num_hidden_layers}")
            T = cache[0]["k"].shape[1]
            q_slots = jnp.asarray(cache_index, jnp.int32) + jnp.arange(S, dtype=jnp.int32)
        if attention_mask is None:
            valid_BxT = jnp.ones((B, T), bool)
        else:
            if attention_mask.shape != (B, T):
                raise ValueError(
                    f"attention_mask has shape {attention_mask.shape}, expected {(B, T)} "
                    "(with a cache it covers every cache slot)"
                )
            valid_BxT = attention_mask.astype(bool)
        default_positions = position_ids is None and cache is None
        if position_ids is None:
            position_ids = jnp.broadcast_to(q_slots[None, :], (B, S))
        elif position_ids.shape != (B, S):
            position_ids = jnp.broadcast_to(position_ids, (B, S))
        k_slots = jnp.arange(T, dtype=jnp.int32)
        causal_SxT = k_slots[None, :] <= q_slots[:, None]
        masks: dict[int | None, jax.Array] = {None: causal_SxT[None, :, :] & valid_BxT[:, None, :]}
        for w in {w for i in range(cfg.num_hidden_layers) if (w := cfg.window(i)) is not None}:
            win_SxT = k_slots[None, :] > q_slots[:, None] - w
            masks[w] = masks[None] & win_SxT[None, :, :]

        x_BxSxD = self.embed_tokens(input_ids)
        if default_positions:
            cos, sin = _rope_constants(cfg, S, x_BxSxD.dtype)
        else:
            cos, sin = _rope_tables(cfg, position_ids, x_BxSxD.dtype)
        x_TxD = x_BxSxD.reshape(B * S, cfg.hidden_size)
        x_TxD, new_cache = self.layers(x_TxD, cos, sin, masks, cache, cache_index)
        return _constrain(self.norm(x_TxD), self.token_sharding), new_cache

    def attend(self, h_TxD: jax.Array) -> jax.Array:
        """Tied output head: ``h @ embed_tokens.embeddingᵀ``."""
        return self.embed_tokens.attend(h_TxD)


class LlamaForCausalLM(nn.Module):
    """``model`` + ``lm_head`` (absent when ``tie_word_embeddings``).

    ``__call__(input_ids [B,S] int32, attention_mask=None [B,S] (1 keep, 0 pad),
    position_ids=None [B,S], cache=None, cache_index=None)`` returns logits
    ``[B, S, V]``; with a ``cache`` (see `init_cache`) it returns
    ``(logits, new_cache)`` and ``attention_mask`` must cover the cache,
    ``[B, T]``. Default positions are the slot indices (HF: ``arange`` plus
    the cache length), whatever the padding.
    """

    cfg: Config
    param_dtype: Any = jnp.float32
    #: recompute each decoder layer in the backward pass (activation checkpointing): False, True, or a
    #: policy name of `REMAT_POLICIES` (see `Layers`)
    remat: bool | str = False
    #: sharding of the [B·S, D] hidden states at layer boundaries (see `Layers`); None = XLA decides
    token_sharding: Any = None
    #: attention core without a cache (`lorajax.models.attention.self_attention`): "auto" (the fused CPU
    #: kernel where it runs: one CPU device, float32; else blockwise), "blockwise" (query blocks skip the
    #: keys they cannot see), "fused" (`lorajax.models.attention_cpu`) or "dense" (the reference)
    attention: str = "auto"
    #: query rows per block of the blockwise path (None: `lorajax.models.attention.auto_block`: 64, or
    #: S/8 rounded up to a multiple of 64 for long sequences)
    attention_block: int | None = None
    #: compute dtype (e.g. ``jnp.bfloat16``) of the matmuls, embeddings and norms' outputs; parameters stay in
    #: their own dtype (f32 master weights and adapters are cast inside the step, gradients flow back in f32).
    #: Norm statistics and the softmax stay float32. None: compute in the parameters' dtype.
    dtype: Any = None
    #: run the decoder layers (without a cache) as one ``jax.lax.scan`` over their stacked parameters
    #: (`lorajax.layer_scan`): with ``remat`` each layer is recomputed inside its own backward iteration, so
    #: activation memory stays one layer deep, and the layer compiles once. The parameter tree is unchanged
    #: (``layers.0``, ``layers.1``, ...); the step holds one stacked copy of the layer weights (of the shards
    #: under FSDP). Decoding with a cache runs the layers unscanned.
    scan_layers: bool = False

    def __post_init__(self):
        check_compute_options(self.attention, self.attention_block, self.remat)
        super().__post_init__()

    @nn.compact
    def __call__(
        self, input_ids, attention_mask=None, position_ids=None, cache=None, cache_index=None, return_hidden=False
    ):
        cfg = self.cfg
        B, S = input_ids.shape
        model = LlamaModel(
            cfg,
            self.param_dtype,
            self.remat,
            self.token_sharding,
            self.attention,
            self.attention_block,
            self.dtype,
            self.scan_layers,
            name="model",
        )
        h_TxD, new_cache = model(input_ids, attention_mask, position_ids, cache, cache_index)
        if return_hidden:  # the final-norm hidden states, for a chunked loss over `output_kernel`
            if cache is not None:
                raise ValueError("return_hidden is for training losses: not with a cache")
            return h_TxD.reshape(B, S, cfg.hidden_size)
        if cfg.tie_word_embeddings:
            logits_TxV = model.attend(h_TxD)
        else:
            head = nn.Dense(
                cfg.vocab_size, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, name="lm_head"
            )
            logits_TxV = head(h_TxD)
        logits = logits_TxV.reshape(B, S, cfg.vocab_size)
        return logits if cache is None else (logits, new_cache)


def output_kernel(cfg: Config, params: dict) -> jax.Array:
    """The output head as ``[D, V]``: ``lm_head.kernel``, or the transposed embedding when tied.

    With ``model.apply(..., return_hidden=True)`` and `lorajax.train.losses.chunked_cross_entropy` it gives
    the next-token loss without the ``[T, V]`` logits (the head must not be adapted: its adapter would be
    bypassed).
    """
    if cfg.tie_word_embeddings:
        return params["model"]["embed_tokens"]["embedding"].T
    return params["lm_head"]["kernel"]


# ---------------------------------------------------------------------------- family contract
def build(cfg: Config) -> LlamaForCausalLM:
    """The linen model of ``cfg`` (``model.cfg is cfg``)."""
    return LlamaForCausalLM(cfg)


def example_inputs(cfg: Config) -> tuple:
    """Tiny inputs for ``model.init``: ``(input_ids [1, 4] int32,)``."""
    return (jnp.zeros((1, 4), jnp.int32),)


def param_map(cfg: Config) -> dict[str, tuple[tuple[str, ...], str]]:
    """``{hf_tensor_name: (flax_path, "linear" | "copy")}`` for every parameter of ``cfg``'s model."""
    out: dict[str, tuple[tuple[str, ...], str]] = {
        "model.embed_tokens.weight": (("model", "embed_tokens", "embedding"), "copy"),
        "model.norm.weight": (("model", "norm", "weight"), "copy"),
    }
    for i in range(cfg.num_hidden_layers):
        hf, fx = f"model.layers.{i}.", ("model", "layers", str(i))
        for block, names, bias in (
            ("self_attn", ("q_proj", "k_proj", "v_proj"), cfg.qkv_bias),
            ("self_attn", ("o_proj",), cfg.o_bias),
            ("mlp", ("gate_proj", "up_proj", "down_proj"), cfg.use_mlp_bias),
        ):
            for n in names:
                out[f"{hf}{block}.{n}.weight"] = ((*fx, block, n, "kernel"), "linear")
                if bias:
                    out[f"{hf}{block}.{n}.bias"] = ((*fx, block, n, "bias"), "copy")
        for n in ("input_layernorm", "post_attention_layernorm"):
            out[f"{hf}{n}.weight"] = ((*fx, n, "weight"), "copy")
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (("lm_head", "kernel"), "linear")
    return out


# ---------------------------------------------------------------------------- generation
def init_cache(cfg: Config, batch: int, max_len: int, dtype: Any = jnp.float32) -> tuple:
    """An empty KV cache: per layer ``{"k", "v"}`` of zeros ``[batch, max_len, kv_heads, head_dim]``."""
    shape = (batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
    return tuple({"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.num_hidden_layers))


def _params_dtype(params: Any):
    try:
        return jnp.dtype(params["model"]["embed_tokens"]["embedding"].dtype)
    except (KeyError, TypeError, IndexError):
        pass
    for leaf in jax.tree_util.tree_leaves(params):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            return jnp.dtype(leaf.dtype)
    return jnp.dtype(jnp.float32)


def _top_p_filter(logits_BxV: jax.Array, top_p: jax.Array) -> jax.Array:
    """Nucleus filter: keep the smallest set of most likely tokens whose mass reaches ``top_p`` (>= 1 token)."""
    order_BxV = jnp.argsort(-logits_BxV, axis=-1)
    sorted_BxV = jnp.take_along_axis(logits_BxV, order_BxV, axis=-1)
    probs = jax.nn.softmax(sorted_BxV, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
    keep_sorted = (before < top_p) | (jnp.arange(logits_BxV.shape[-1])[None, :] == 0)
    keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order_BxV, axis=-1), axis=-1)
    return jnp.where(keep, logits_BxV, -jnp.inf)


@functools.partial(
    jax.jit, static_argnames=("model", "apply_fn", "max_new_tokens", "greedy", "use_top_p", "eos", "pad", "cache_dtype")
)
def _generate(
    params,
    input_ids,
    attention_mask,
    temperature,
    top_p,
    key,
    *,
    model,
    apply_fn,
    max_new_tokens,
    greedy,
    use_top_p,
    eos,
    pad,
    cache_dtype,
):
    cfg = model.cfg
    B, S = input_ids.shape
    N = max_new_tokens
    T = S + N
    call = apply_fn or (lambda p, ids, **kw: model.apply({"params": p}, ids, **kw))
    mask_BxT = jnp.concatenate([attention_mask, jnp.ones((B, N), attention_mask.dtype)], axis=1)
    # HF: positions count real tokens (cumsum of the mask), pads get 0
    pos_BxS = jnp.where(attention_mask == 0, 0, jnp.cumsum(attention_mask, axis=1) - 1).astype(jnp.int32)
    eos_arr = jnp.asarray(eos if eos else (-1,), jnp.int32)

    def pick(logits_BxV, step):
        logits_BxV = logits_BxV.astype(jnp.float32)
        if greedy:
            return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
        logits_BxV = logits_BxV / temperature
        if use_top_p:
            logits_BxV = _top_p_filter(logits_BxV, top_p)
        return jax.random.categorical(jax.random.fold_in(key, step), logits_BxV, axis=-1).astype(jnp.int32)

    def finish(tok_B, done_B):
        tok_B = jnp.where(done_B, pad, tok_B)
        return tok_B, done_B | jnp.any(tok_B[:, None] == eos_arr[None, :], axis=1)

    cache = init_cache(cfg, B, T, cache_dtype)
    logits, cache = call(params, input_ids, attention_mask=mask_BxT, position_ids=pos_BxS, cache=cache, cache_index=0)
    tok, done = finish(pick(logits[:, -1], 0), jnp.zeros((B,), bool))
    out = jnp.concatenate([input_ids, jnp.full((B, N), pad, jnp.int32)], axis=1).at[:, S].set(tok)
    last_pos = pos_BxS[:, -1]

    def cond(carry):
        i, _, _, _, done = carry
        return (i < N - 1) & ~jnp.all(done)

    def body(carry):
        i, out, cache, tok, done = carry
        logits, cache = call(
            params,
            tok[:, None],
            attention_mask=mask_BxT,
            position_ids=(last_pos + 1 + i)[:, None],
            cache=cache,
            cache_index=S + i,
        )
        tok, done = finish(pick(logits[:, -1], i + 1), done)
        out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, S + 1 + i))
        return i + 1, out, cache, tok, done

    return jax.lax.while_loop(cond, body, (jnp.int32(0), out, cache, tok, done))[1]


def generate(
    model: LlamaForCausalLM,
    params: Any,
    input_ids: jax.Array,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    key: jax.Array | None = None,
    attention_mask: jax.Array | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    apply_fn: Callable | None = None,
) -> jax.Array:
    """Autoregressive decoding with a KV cache, jit-compiled: ``[B, S] -> [B, S + max_new_tokens]``.

    One prefill over the prompt, then a ``lax.while_loop`` of one-token steps
    (compiled once per shape and setting). Greedy when ``temperature == 0``,
    else samples from ``softmax(logits / temperature)`` restricted to the
    top-``top_p`` nucleus (``key`` required; step ``t`` uses
    ``fold_in(key, t)``). Left-padded batches: pass ``attention_mask``
    (0 = pad, left side); positions are counted from each row's first real
    token, as HF's ``generate``. After a row emits an ``eos_token_id`` it is
    filled with ``pad_token_id`` (default: the first eos id, else 0), and
    decoding stops early once every row has; the output keeps its full length.

    Args:
      model: a model from `build` / `lorajax.models.from_pretrained`.
      params: its params, e.g. ``lorajax.merge(spec, params, adapters)`` for a
        merged LoRA model; or anything ``apply_fn`` takes.
      apply_fn: optional ``apply_fn(params, input_ids, *, attention_mask,
        position_ids, cache, cache_index) -> (logits, cache)`` replacing
        ``model.apply({"params": params}, ...)``, e.g. a factored LoRA forward
        ``lambda pa, ids, **kw: fwd({"params": pa[0]}, pa[1], ids, **kw)`` with
        ``params=(params, adapters)`` and ``fwd = lorajax.adapt(model.apply, spec)``.
        Must be hashable and stable (it keys the compilation cache).
    """
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
    max_new_tokens = int(max_new_tokens)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if max_new_tokens == 0:
        return input_ids
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1], got {top_p}")
    greedy = temperature == 0
    if not greedy and key is None:
        raise ValueError("sampling (temperature > 0) needs a PRNG key")
    if key is None:
        key = jax.random.key(0)
    mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {mask.shape}, input_ids {input_ids.shape}")
    eos = () if eos_token_id is None else tuple(int(e) for e in np.atleast_1d(eos_token_id))
    pad = int(pad_token_id) if pad_token_id is not None else (eos[0] if eos else 0)
    return _generate(
        params,
        input_ids,
        mask,
        jnp.float32(temperature if not greedy else 1.0),
        jnp.float32(top_p),
        key,
        model=model,
        apply_fn=apply_fn,
        max_new_tokens=max_new_tokens,
        greedy=greedy,
        use_top_p=(not greedy) and top_p < 1.0,
        eos=eos,
        pad=pad,
        cache_dtype=_params_dtype(params),
    )
