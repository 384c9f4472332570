"""BERT-family encoders (BERT, RoBERTa) in linen, with Hugging Face's module names.

Maths (Devlin et al. 2019, post-norm transformer encoder). For tokens
``ids: [B, S]``, token types ``tt: [B, S]`` and a key mask ``m: [B, S]``::

    x     = LN(E_word[ids] + E_type[tt] + E_pos[pos])              # [T, D], T = B*S
    per layer:
      q, k, v = x Wq + bq, x Wk + bk, x Wv + bv                    # [T, D] -> [B, S, N, D/N]
      a     = softmax(q k^T / sqrt(D/N) + (m - 1) * inf) v         # keys with m = 0 ignored
      x     = LN(x + a Wo + bo)                                    # attention.output
      x     = LN(x + act(x Wi + bi) Wout + bout)                   # intermediate / output
    pooled  = tanh(x[:, 0] Wp + bp)                                # optional

``pos`` is ``0..S-1`` for BERT; for RoBERTa it is HF's
``create_position_ids_from_input_ids``: ``cumsum(ids != pad) * (ids != pad) + pad``,
so real tokens start at ``pad + 1`` and padding sits at ``pad``. ``act`` is
exact (erf) GELU for ``"gelu"`` as in transformers, tanh GELU for
``"gelu_new"`` / ``"gelu_pytorch_tanh"``, or ReLU / SiLU. LayerNorm is computed
in float32 with the config's ``layer_norm_eps`` (as ``torch.nn.LayerNorm``).

Attention is bidirectional: every query reads every key with ``m = 1``. Its
core is `lorajax.models.attention` on the ``[B, S, K, G, d]`` layout with
``K = N`` heads and ``G = 1``: ``BertModel(attention="dense")`` forms the whole
``[S, S]`` score matrix per head, ``"blockwise"`` / ``"auto"`` (the default)
cut the queries into blocks of ``attention_block`` rows (``None``:
`lorajax.models.attention.auto_block`, 64 or more), each reading all ``S``
keys, which is the dense path when ``S`` fits in one block. Scores and softmax
are float32 either way.

Compute dtype: ``BertModel(dtype=jnp.bfloat16)`` runs every ``nn.Dense`` /
``nn.Embed`` in bf16 (parameters keep their own dtype and are cast inside the
step, so f32 master weights and adapters get f32 gradients); LayerNorm
statistics and the attention softmax stay float32, and the outputs (hidden
states, pooled) are in ``dtype``. ``dtype=None``: compute in the params' dtype.

Every projection is an ``nn.Dense`` and the params tree mirrors HF's state
dict, so lorajax module names are PEFT's (``encoder.layer.0.attention.self.query``)::

    {"embeddings": {"word_embeddings": {"embedding"}, "position_embeddings": ...,
                    "token_type_embeddings": ..., "LayerNorm": {"weight", "bias"}},
     "encoder": {"layer": {"0": {"attention": {"self": {"query", "key", "value"},
                                               "output": {"dense", "LayerNorm"}},
                                 "intermediate": {"dense"},
                                 "output": {"dense", "LayerNorm"}}, ...}},
     "pooler": {"dense"}}

Token activations are kept 2-D ``[B*S, D]`` around every matmul.

Shapes: ``model.apply({"params": p}, input_ids [B, S], attention_mask=None,
token_type_ids=None)`` -> last hidden states ``[B, S, D]``; with
``output_pooled=True`` -> ``(hidden [B, S, D], pooled [B, D])``.

Checkpoints (`lorajax.models.from_pretrained`): ``model_type`` ``"bert"`` or
``"roberta"``, names with or without a ``bert.`` / ``roberta.`` prefix. Task
heads of ``*ForSequenceClassification`` / ``*ForMaskedLM`` / ... checkpoints
(``classifier.*``, ``cls.*``, ``lm_head.*``, ``qa_outputs.*``) are skipped on
load: this module is the encoder only, and the head is not loaded or saved.
Checkpoints without a pooler (``*ForMaskedLM``, ``*ForTokenClassification``,
``RobertaForSequenceClassification``, ...; read from ``architectures``) build a
model without one (``Config.add_pooling_layer=False``).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from lorajax.models import bert
  >>> cfg = bert.Config(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
  ...                   intermediate_size=24, max_position_embeddings=16)
  >>> model = bert.build(cfg)
  >>> ids = jnp.array([[2, 7, 9, 3], [2, 5, 3, 0]])
  >>> mask = (ids != 0).astype(jnp.int32)
  >>> params = model.init(jax.random.key(0), ids)["params"]
  >>> model.apply({"params": params}, ids, attention_mask=mask).shape
  (2, 4, 16)
  >>> emb = bert.sentence_embeddings(model, params, ids, mask)
  >>> emb.shape, bool(jnp.allclose(jnp.linalg.norm(emb, axis=-1), 1.0))
  ((2, 16), True)
  >>> "encoder.layer.1.attention.self.query.weight" in bert.param_map(cfg)
  True

References:
  Devlin et al., "BERT: Pre-training of Deep Bidirectional Transformers for
  Language Understanding", arXiv:1810.04805. Liu et al., "RoBERTa", arXiv:1907.11692.
  Hugging Face transformers ``models/bert/modeling_bert.py`` and
  ``models/roberta/modeling_roberta.py``. Reimers & Gurevych,
  "Sentence-BERT", arXiv:1908.10084 (mean pooling).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lorajax.models.attention import self_attention
from lorajax.models.llama import check_compute_options, remat_policy

__all__ = [
    "Config",
    "BertModel",
    "build",
    "param_map",
    "IGNORED",
    "PREFIXES",
    "example_inputs",
    "make_position_ids",
    "mean_pool",
    "l2_normalize",
    "sentence_embeddings",
    "embed_sentences",
]

#: ``hidden_act`` -> function (``"gelu"`` is the exact erf GELU, as transformers' ``ACT2FN["gelu"]``)
ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}

MODEL_TYPES = ("bert", "roberta")

#: HF architectures built with ``add_pooling_layer=False`` (their checkpoints have no ``pooler.*``)
NO_POOLER = frozenset(
    {
        "BertForMaskedLM",
        "BertLMHeadModel",
        "BertForTokenClassification",
        "BertForQuestionAnswering",
        "RobertaForMaskedLM",
        "RobertaForCausalLM",
        "RobertaForSequenceClassification",
        "RobertaForTokenClassification",
        "RobertaForQuestionAnswering",
    }
)

#: checkpoint names that are not encoder parameters: buffers, and task heads (skipped on load)
IGNORED = (
    r"(?:bert\.|roberta\.)?embeddings\.(?:position_ids|token_type_ids)"
    r"|(?:classifier|cls|lm_head|qa_outputs)\..*"
)

PREFIXES = ("bert.", "roberta.")
#: older checkpoints spell LayerNorm parameters gamma / beta
RENAMES = [(r"LayerNorm\.gamma$", "LayerNorm.weight"), (r"LayerNorm\.beta$", "LayerNorm.bias")]

# Config fields whose non-default values change the maths and are not implemented.
_REJECT = {
    "is_decoder": False,
    "add_cross_attention": False,
}


def check_sizes(cfg: Any, fields: tuple[str, ...]) -> None:
    """A model config's sizes: each of ``fields`` a positive int, ``hidden_size`` a multiple of
    ``num_attention_heads`` (BERT and ViT configs share these checks)."""
    for f in fields:
        v = getattr(cfg, f)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{f} must be a positive int, got {v!r}")
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ValueError(
            f"hidden_size {cfg.hidden_size} is not a multiple of num_attention_heads {cfg.num_attention_heads}"
        )


@dataclasses.dataclass(frozen=True)
class Config:
    """A ``BertModel`` / ``RobertaModel`` config (the fields that define the maths)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    model_type: str = "bert"
    add_pooling_layer: bool = True

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; supported: {sorted(ACTIVATIONS)}")
        check_sizes(
            self,
            (
                "vocab_size",
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "intermediate_size",
                "max_position_embeddings",
                "type_vocab_size",
            ),
        )
        if not (isinstance(self.layer_norm_eps, (int, float)) and self.layer_norm_eps > 0):
            raise ValueError(f"layer_norm_eps must be a positive number, got {self.layer_norm_eps!r}")
        if not isinstance(self.pad_token_id, int) or not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id must be an int in [0, vocab_size), got {self.pad_token_id!r}")
        if self.model_type == "roberta" and self.pad_token_id + 2 > self.max_position_embeddings:
            raise ValueError(
                f"roberta positions start at pad_token_id + 1 = {self.pad_token_id + 1}, "
                f"which max_position_embeddings={self.max_position_embeddings} cannot hold"
            )

    @property
    def max_length(self) -> int:
        """Longest input sequence the position table allows."""
        if self.model_type == "roberta":
            return self.max_position_embeddings - self.pad_token_id - 1
        return self.max_position_embeddings

    @classmethod
    def from_hf(cls, config: dict) -> "Config":
        """From a HF ``config.json`` dict; raises ValueError for settings that are not implemented."""
        model_type = config.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
        pos = config.get("position_embedding_type", "absolute")
        if pos not in (None, "absolute"):
            raise ValueError(f"position_embedding_type={pos!r} is not supported (only 'absolute')")
        for key, ok in _REJECT.items():
            if config.get(key, ok) != ok:
                raise ValueError(f"{key}={config[key]!r} is not supported by lorajax's {model_type} encoder")
        if config.get("embedding_size") not in (None, config.get("hidden_size")):
            raise ValueError(f"embedding_size={config['embedding_size']!r} != hidden_size is not supported")
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        if model_type == "roberta":
            defaults["pad_token_id"] = 1
        kw = {k: config.get(k, defaults[k]) for k in defaults if k not in ("model_type", "add_pooling_layer")}
        if kw["pad_token_id"] is None:
            raise ValueError("pad_token_id is null: BERT and RoBERTa need one")
        archs = config.get("architectures") or []
        pooler = config.get("add_pooling_layer", not any(a in NO_POOLER for a in archs))
        return cls(model_type=model_type, add_pooling_layer=bool(pooler), **kw)

    def to_hf(self) -> dict:
        """A ``config.json`` dict that transformers' ``AutoModel.from_pretrained`` loads as this encoder."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if self.add_pooling_layer:
            del out["add_pooling_layer"]
        out["architectures"] = ["RobertaModel" if self.model_type == "roberta" else "BertModel"]
        out["position_embedding_type"] = "absolute"
        out["is_decoder"] = False
        out["add_cross_attention"] = False
        out["hidden_dropout_prob"] = 0.1
        out["attention_probs_dropout_prob"] = 0.1
        if self.model_type == "roberta":
            out.update(bos_token_id=0, eos_token_id=2)
        return out


class LayerNorm(nn.Module):
    """``torch.nn.LayerNorm`` over the last axis, params ``weight`` / ``bias``, computed in float32.

    ``x [..., D]`` -> ``[..., D]`` in ``dtype`` (None: ``x``'s dtype).
    """

    eps: float
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        w = self.param("weight", nn.initializers.ones, (d,))
        b = self.param("bias", nn.initializers.zeros, (d,))
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + jnp.float32(self.eps))
        shape = (1,) * (x.ndim - 1) + (d,)
        out = y * w.reshape(shape).astype(jnp.float32) + b.reshape(shape).astype(jnp.float32)
        return out.astype(self.dtype or x.dtype)


class Embeddings(nn.Module):
    """``LN(E_word[ids] + E_type[tt] + E_pos[pos])``: ``[B, S]`` ids -> ``[B·S, D]`` in ``dtype``."""

    cfg: Config
    dtype: Any = None

    @nn.compact
    def __call__(self, ids_BxS, token_type_BxS, position_BxS) -> jax.Array:
        cfg = self.cfg
        T = ids_BxS.size
        embed = functools.partial(nn.Embed, features=cfg.hidden_size, dtype=self.dtype)
        word = embed(cfg.vocab_size, name="word_embeddings")(ids_BxS.reshape(T))
        kind = embed(cfg.type_vocab_size, name="token_type_embeddings")(token_type_BxS.reshape(T))
        pos = embed(cfg.max_position_embeddings, name="position_embeddings")(position_BxS.reshape(T))
        return LayerNorm(cfg.layer_norm_eps, self.dtype, name="LayerNorm")((word + kind) + pos)


class SelfAttention(nn.Module):
    """Bidirectional multi-head attention ``x [B·S, D]``, ``keep [B, 1, 1, S]`` -> ``[B·S, D]`` (before ``output``).

    ``attention``: `lorajax.models.attention.self_attention` with ``causal=False``: ``"dense"``,
    ``"blockwise"`` (``block`` query rows per block; dense when ``S <= block``), ``"fused"`` (the CPU
    kernel) or ``"auto"`` (fused where it runs, else blockwise).
    """

    cfg: Config
    dtype: Any = None
    attention: str = "auto"
    block: int | None = None

    @nn.compact
    def __call__(self, x_TxD: jax.Array, keep_Bx1x1xS: jax.Array) -> jax.Array:
        cfg = self.cfg
        T, D = x_TxD.shape
        B = keep_Bx1x1xS.shape[0]
        S, N = T // B, cfg.num_attention_heads
        q, k, v = (
            nn.Dense(D, dtype=self.dtype, name=n)(x_TxD).reshape(B, S, N, D // N) for n in ("query", "key", "value")
        )
        q_BxSxKxGxd = q.reshape(B, S, N, 1, D // N)  # K = N heads, G = 1 query head per kv head
        mask_BxSxS = jnp.broadcast_to(keep_Bx1x1xS.reshape(B, 1, S), (B, S, S))
        o_BxSxKxGxd = self_attention(
            q_BxSxKxGxd, k, v, mask_BxSxS, implementation=self.attention, block=self.block, causal=False
        )
        return o_BxSxKxGxd.reshape(T, D)


class DenseLayerNorm(nn.Module):
    """``LayerNorm(residual + dense(x))``: HF's ``BertSelfOutput`` / ``BertOutput``."""

    cfg: Config
    dtype: Any = None

    @nn.compact
    def __call__(self, x_TxI: jax.Array, residual_TxD: jax.Array) -> jax.Array:
        h = nn.Dense(self.cfg.hidden_size, dtype=self.dtype, name="dense")(x_TxI)
        return LayerNorm(self.cfg.layer_norm_eps, self.dtype, name="LayerNorm")(h + residual_TxD)


class Attention(nn.Module):
    cfg: Config
    dtype: Any = None
    attention: str = "auto"
    block: int | None = None

    @nn.compact
    def __call__(self, x_TxD, keep_Bx1x1xS):
        a = SelfAttention(self.cfg, self.dtype, self.attention, self.block, name="self")(x_TxD, keep_Bx1x1xS)
        return DenseLayerNorm(self.cfg, self.dtype, name="output")(a, x_TxD)


class Intermediate(nn.Module):
    cfg: Config
    dtype: Any = None

    @nn.compact
    def __call__(self, x_TxD):
        h_TxI = nn.Dense(self.cfg.intermediate_size, dtype=self.dtype, name="dense")(x_TxD)
        return ACTIVATIONS[self.cfg.hidden_act](h_TxI)


class Layer(nn.Module):
    """One encoder layer: ``x [B·S, D]``, ``keep [B, 1, 1, S]`` -> ``[B·S, D]``; fields as `BertModel`'s."""

    cfg: Config
    dtype: Any = None
    attention: str = "auto"
    attention_block: int | None = None

    @nn.compact
    def __call__(self, x_TxD, keep_Bx1x1xS):
        dt = self.dtype
        x_TxD = Attention(self.cfg, dt, self.attention, self.attention_block, name="attention")(x_TxD, keep_Bx1x1xS)
        h_TxI = Intermediate(self.cfg, dt, name="intermediate")(x_TxD)
        return DenseLayerNorm(self.cfg, dt, name="output")(h_TxI, x_TxD)


def _constrain(x: jax.Array, sharding: Any) -> jax.Array:
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


class Layers(nn.Module):
    """HF's ``encoder.layer`` ModuleList: children named ``"0"``, ``"1"``, ...

    ``remat``, ``token_sharding``, ``attention``, ``attention_block`` and ``dtype``: as `BertModel`'s.
    """

    cfg: Config
    remat: bool | str = False
    token_sharding: Any = None
    attention: str = "auto"
    attention_block: int | None = None
    dtype: Any = None

    @nn.compact
    def __call__(self, x_TxD, keep_Bx1x1xS):
        policy = remat_policy(self.remat)
        layer_cls = Layer if policy is False else nn.remat(Layer, policy=policy)
        for i in range(self.cfg.num_hidden_layers):
            x_TxD = _constrain(x_TxD, self.token_sharding)
            layer = layer_cls(self.cfg, self.dtype, self.attention, self.attention_block, name=str(i))
            x_TxD = layer(x_TxD, keep_Bx1x1xS)
        return _constrain(x_TxD, self.token_sharding)


class Encoder(nn.Module):
    cfg: Config
    remat: bool | str = False
    token_sharding: Any = None
    attention: str = "auto"
    attention_block: int | None = None
    dtype: Any = None

    @nn.compact
    def __call__(self, x_TxD, keep_Bx1x1xS):
        layers = Layers(
            self.cfg, self.remat, self.token_sharding, self.attention, self.attention_block, self.dtype, name="layer"
        )
        return layers(x_TxD, keep_Bx1x1xS)


class Pooler(nn.Module):
    cfg: Config
    dtype: Any = None

    @nn.compact
    def __call__(self, first_BxD):
        return jnp.tanh(nn.Dense(self.cfg.hidden_size, dtype=self.dtype, name="dense")(first_BxD))


def make_position_ids(cfg: Config, input_ids: jax.Array) -> jax.Array:
    """``[B, S]`` position ids: ``0..S-1`` (BERT) or HF's RoBERTa padding-aware ids."""
    B, S = input_ids.shape
    if cfg.model_type == "roberta":
        m = (input_ids != cfg.pad_token_id).astype(jnp.int32)
        return jnp.cumsum(m, axis=1, dtype=jnp.int32) * m + jnp.int32(cfg.pad_token_id)
    return jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32)[None, :], (B, S))


class BertModel(nn.Module):
    """The encoder: ``input_ids [B, S]`` -> last hidden states ``[B, S, D]`` (see the module docstring).

    ``remat`` (True or a policy name of `lorajax.models.llama.REMAT_POLICIES`)
    recomputes each layer in the backward pass (``nn.remat``; True =
    ``"nothing_saveable"``, ``"dots_saveable"`` keeps the matmul outputs).
    ``token_sharding`` (a ``jax.sharding.Sharding`` of the ``[B·S, D]`` hidden
    states, e.g. `lorajax.sharding.token_sharding`) pins the token axis to the
    batch mesh axes at every layer boundary, so that under FSDP XLA gathers the
    weights instead of the activations (as in `lorajax.models.llama`).
    ``attention`` / ``attention_block`` choose the attention core and
    ``dtype`` the compute dtype (see the module docstring). None of them
    changes the params tree, and only ``dtype`` changes the result beyond
    rounding.
    """

    cfg: Config
    #: False, True or a policy name of `lorajax.models.llama.REMAT_POLICIES` (see `Layers`)
    remat: bool | str = False
    token_sharding: Any = None
    #: attention core (`lorajax.models.attention.self_attention`, ``causal=False``): "auto" (the fused CPU
    #: kernel where it runs, else blockwise), "blockwise" (query blocks, each reading all keys), "fused"
    #: or "dense" (the whole score matrix, the reference)
    attention: str = "auto"
    #: query rows per block of the blockwise path (None: `lorajax.models.attention.auto_block`)
    attention_block: int | None = None
    #: compute dtype (e.g. ``jnp.bfloat16``) of the matmuls, embeddings, LayerNorm outputs and of the returned
    #: hidden states / pooled output; parameters stay in their own dtype. LayerNorm statistics and the softmax
    #: stay float32. None: compute in the parameters' dtype.
    dtype: Any = None

    def __post_init__(self):
        check_compute_options(self.attention, self.attention_block, self.remat)
        super().__post_init__()

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        *,
        position_ids: jax.Array | None = None,
        output_pooled: bool = False,
    ):
        cfg = self.cfg
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
        B, S = input_ids.shape
        if S > cfg.max_length:
            raise ValueError(
                f"sequence length {S} exceeds the {cfg.max_length} positions of this "
                f"{cfg.model_type} model (max_position_embeddings={cfg.max_position_embeddings})"
            )
        for name, a in (
            ("attention_mask", attention_mask),
            ("token_type_ids", token_type_ids),
            ("position_ids", position_ids),
        ):
            if a is not None and a.shape != (B, S):
                raise ValueError(f"{name} must have the shape of input_ids {(B, S)}, got {a.shape}")
        if attention_mask is None:
            attention_mask = jnp.ones((B, S), jnp.int32)
        if token_type_ids is None:
            token_type_ids = jnp.zeros((B, S), jnp.int32)
        if position_ids is None:
            position_ids = make_position_ids(cfg, input_ids)
        x_TxD = Embeddings(cfg, self.dtype, name="embeddings")(input_ids, token_type_ids, position_ids)
        keep_Bx1x1xS = (attention_mask != 0).reshape(B, 1, 1, S)
        encoder = Encoder(
            cfg, self.remat, self.token_sharding, self.attention, self.attention_block, self.dtype, name="encoder"
        )
        x_TxD = encoder(x_TxD, keep_Bx1x1xS)
        hidden = x_TxD.reshape(B, S, cfg.hidden_size)
        if cfg.add_pooling_layer and (output_pooled or self.is_initializing()):
            pooled = Pooler(cfg, self.dtype, name="pooler")(hidden[:, 0])
            if output_pooled:
                return hidden, pooled
        elif output_pooled:
            raise ValueError("output_pooled=True but this model has no pooler (add_pooling_layer=False)")
        return hidden


def build(cfg: Config) -> BertModel:
    return BertModel(cfg)


def _dense(hf: str, path: tuple) -> dict:
    return {f"{hf}.weight": (path + ("kernel",), "linear"), f"{hf}.bias": (path + ("bias",), "copy")}


def _ln(hf: str, path: tuple) -> dict:
    return {f"{hf}.weight": (path + ("weight",), "copy"), f"{hf}.bias": (path + ("bias",), "copy")}


def param_map(cfg: Config) -> dict[str, tuple[tuple[str, ...], str]]:
    """``{hf_name: (flax_path, "linear" | "copy")}``: HF names (no prefix) equal the params paths."""
    out: dict[str, tuple[tuple[str, ...], str]] = {
        f"embeddings.{n}.weight": (("embeddings", n, "embedding"), "copy")
        for n in ("word_embeddings", "position_embeddings", "token_type_embeddings")
    }
    out.update(_ln("embeddings.LayerNorm", ("embeddings", "LayerNorm")))
    for i in range(cfg.num_hidden_layers):
        p = f"encoder.layer.{i}"
        t = ("encoder", "layer", str(i))
        for n in ("query", "key", "value"):
            out.update(_dense(f"{p}.attention.self.{n}", t + ("attention", "self", n)))
        out.update(_dense(f"{p}.attention.output.dense", t + ("attention", "output", "dense")))
        out.update(_ln(f"{p}.attention.output.LayerNorm", t + ("attention", "output", "LayerNorm")))
        out.update(_dense(f"{p}.intermediate.dense", t + ("intermediate", "dense")))
        out.update(_dense(f"{p}.output.dense", t + ("output", "dense")))
        out.update(_ln(f"{p}.output.LayerNorm", t + ("output", "LayerNorm")))
    if cfg.add_pooling_layer:
        out.update(_dense("pooler.dense", ("pooler", "dense")))
    return out


def example_inputs(cfg: Config) -> tuple:
    return (jnp.full((1, 2), cfg.pad_token_id + 1 if cfg.pad_token_id + 1 < cfg.vocab_size else 0, jnp.int32),)


def mean_pool(hidden_BxSxD: jax.Array, attention_mask_BxS: jax.Array) -> jax.Array:
    """Mean of the hidden states over unmasked tokens (sentence-transformers' ``pooling_mode_mean_tokens``)."""
    m = attention_mask_BxS.astype(jnp.float32)[:, :, None]
    summed = (hidden_BxSxD.astype(jnp.float32) * m).sum(axis=1)
    return summed / jnp.maximum(m.sum(axis=1), 1e-9)


def l2_normalize(x_BxD: jax.Array, eps: float = 1e-12) -> jax.Array:
    """``x / max(||x||, eps)`` per row (``torch.nn.functional.normalize``)."""
    return x_BxD / jnp.maximum(jnp.linalg.norm(x_BxD, axis=-1, keepdims=True), eps)


def sentence_embeddings(
    model: BertModel, params: Any, input_ids, attention_mask, token_type_ids=None, *, normalize: bool = True
) -> jax.Array:
    """Mean-pooled (and by default L2-normalised) embeddings ``[B, D]`` of a tokenized batch."""
    input_ids = jnp.asarray(input_ids)
    attention_mask = jnp.asarray(attention_mask)
    tt = None if token_type_ids is None else jnp.asarray(token_type_ids)
    # without mutable= Flax's apply returns the output alone, not (output, variables)
    hidden = cast(jax.Array, model.apply({"params": params}, input_ids, attention_mask, tt))
    pooled = mean_pool(hidden, attention_mask)
    return l2_normalize(pooled) if normalize else pooled


@functools.lru_cache(maxsize=8)
def _jitted(cfg: Config, normalize: bool):
    model = build(cfg)
    return jax.jit(lambda p, ids, mask, tt: sentence_embeddings(model, p, ids, mask, tt, normalize=normalize))


def embed_sentences(
    model: BertModel,
    params: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    max_length: int | None = None,
    batch_size: int = 32,
    normalize: bool = True,
) -> np.ndarray:
    """Sentence-transformers style embeddings ``[len(texts), D]`` (float32 numpy).

    Tokenizes with ``tokenizer`` (a `lorajax.models.tokenizer.Tokenizer`; truncated to
    ``max_length``, default the tokenizer's ``model_max_length``, e.g. 256 from
    ``sentence_bert_config.json``), runs the encoder, mean-pools over real tokens and
    L2-normalises, as ``SentenceTransformer.encode(..., normalize_embeddings=True)``
    does for models like all-MiniLM-L6-v2.
    """
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not one string")
    fn = _jitted(model.cfg, bool(normalize))
    out = []
    for i in range(0, len(texts), batch_size):
        batch = tokenizer.encode_batch(list(texts[i : i + batch_size]), max_length=max_length)
        out.append(np.asarray(fn(params, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])))
    if not out:
        return np.zeros((0, model.cfg.hidden_size), np.float32)
    return np.concatenate(out)
