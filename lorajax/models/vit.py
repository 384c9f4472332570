"""ViT image encoder (``ViTModel``) in linen, with Hugging Face's module names.

Maths (Dosovitskiy et al. 2021, pre-norm transformer encoder). For pixels
``x: [B, H, W, C]`` (channels-last) cut into ``N = (H/P)·(W/P)`` patches of
``P×P`` pixels::

    e     = patches(x) · W_patch + b_patch                         # [B, N, D] (HF's Conv2d, stride P)
    h     = concat(cls, e) + E_pos                                 # [B, 1+N, D] -> [T, D], T = B·(1+N)
    per layer:
      a   = MHA(LN_before(h))                                      # q, k, v = attention.attention.*
      h   = h + a Wo + bo                                          # attention.output.dense
      h   = h + act(LN_after(h) Wi + bi) Wout + bout               # intermediate / output
    out   = LN(h)                                                  # last_hidden_state [B, 1+N, D]
    pooled = tanh(out[:, 0] Wp + bp)                               # optional (``add_pooling_layer``)

``act`` is exact (erf) GELU for ``"gelu"`` (`lorajax.models.bert.ACTIVATIONS`).
LayerNorm is computed in float32 with ``layer_norm_eps``. Attention is
bidirectional over all ``1+N`` tokens through `lorajax.models.attention`
(``attention="dense" | "blockwise" | "fused" | "auto"``), as in
`lorajax.models.bert`.

Input layout: ``pixel_values [B, H, W, C]`` channels-last (the JAX convention),
NOT HF's ``[B, C, H, W]``: transpose torch inputs with ``x.transpose(0, 2, 3, 1)``.
``H = W = image_size`` and ``C = num_channels`` of the config, else a ValueError
naming the expected shape (position embeddings are not interpolated).

Params tree = HF's state dict names (PEFT-style names for LoRA targets, e.g.
``encoder.layer.0.intermediate.dense``)::

    {"embeddings": {"cls_token" [1, 1, D], "position_embeddings" [1, 1+N, D],
                    "patch_embeddings": {"projection": {"weight" [D, C, P, P], "bias" [D]}}},
     "encoder": {"layer": {"0": {"attention": {"attention": {"query", "key", "value"},
                                               "output": {"dense"}},
                                 "intermediate": {"dense"}, "output": {"dense"},
                                 "layernorm_before", "layernorm_after"}, ...}},
     "layernorm": {"weight", "bias"}, "pooler": {"dense"}}

The patch projection keeps torch's Conv2d layout ``[D, C, P, P]`` (an einsum,
not an ``nn.Conv``), so it is copied as is on load; every other projection is
an ``nn.Dense`` (kernel ``[in, out]``) that `lorajax.adapt` intercepts.

Shapes: ``model.apply({"params": p}, pixel_values [B, H, W, C])`` -> ``[B, 1+N, D]``;
with ``output_pooled=True`` -> ``(hidden [B, 1+N, D], pooled [B, D_pool])``.

Checkpoints (`lorajax.models.from_pretrained`): ``model_type`` ``"vit"``, names
with or without a ``vit.`` prefix; the heads of ``ViTForImageClassification``
(``classifier.*``) and ``ViTForMaskedImageModeling`` (``decoder.*``,
``embeddings.mask_token``) are skipped; those architectures have no pooler.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from lorajax.models import vit
  >>> cfg = vit.Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
  ...                  image_size=16, patch_size=8, num_channels=3)
  >>> model = vit.build(cfg)
  >>> x = jnp.zeros((2, 16, 16, 3))
  >>> params = model.init(jax.random.key(0), x)["params"]
  >>> model.apply({"params": params}, x).shape
  (2, 5, 16)

References:
  Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image
  Recognition at Scale", arXiv:2010.11929. Hugging Face transformers
  ``models/vit/modeling_vit.py`` (ViTEmbeddings, ViTLayer, ViTPooler) and
  ``configuration_vit.py``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lorajax.models.attention import self_attention
from lorajax.models.bert import ACTIVATIONS, LayerNorm, check_sizes
from lorajax.models.llama import check_compute_options, remat_policy

__all__ = ["Config", "ViTModel", "build", "param_map", "IGNORED", "PREFIXES", "example_inputs", "NO_POOLER"]

#: HF architectures built with ``add_pooling_layer=False``
NO_POOLER = frozenset({"ViTForImageClassification", "ViTForMaskedImageModeling"})

#: checkpoint names that are not encoder parameters: task heads and the masked-image-modeling token
IGNORED = r"(?:vit\.)?embeddings\.mask_token|(?:classifier|decoder)\..*"

PREFIXES = ("vit.",)

#: ``pooler_act`` values (HF's default is tanh)
POOLER_ACTS = {"tanh": jnp.tanh, **ACTIVATIONS}


@dataclasses.dataclass(frozen=True)
class Config:
    """A ``ViTModel`` config (the fields that define the maths)."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    qkv_bias: bool = True
    add_pooling_layer: bool = True
    pooler_output_size: int | None = None  # None: hidden_size
    pooler_act: str = "tanh"

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; supported: {sorted(ACTIVATIONS)}")
        if self.pooler_act not in POOLER_ACTS:
            raise ValueError(f"pooler_act {self.pooler_act!r} is not supported; supported: {sorted(POOLER_ACTS)}")
        check_sizes(
            self,
            (
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "intermediate_size",
                "image_size",
                "patch_size",
                "num_channels",
            ),
        )
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if not (isinstance(self.layer_norm_eps, (int, float)) and self.layer_norm_eps > 0):
            raise ValueError(f"layer_norm_eps must be a positive number, got {self.layer_norm_eps!r}")

    @property
    def grid(self) -> int:
        """Patches per side, ``image_size // patch_size``."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def pooled_size(self) -> int:
        return self.pooler_output_size or self.hidden_size

    @classmethod
    def from_hf(cls, config: dict) -> "Config":
        """From a HF ``config.json`` dict; raises ValueError for settings that are not implemented."""
        if config.get("model_type") != "vit":
            raise ValueError(f"model_type must be 'vit', got {config.get('model_type')!r}")
        for key in ("image_size", "patch_size"):
            if isinstance(config.get(key), (list, tuple)):
                v = config[key]
                if len(v) != 2 or v[0] != v[1]:
                    raise ValueError(f"{key}={v!r}: only square images and patches are supported")
                config = {**config, key: v[0]}
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        kw = {k: config.get(k, defaults[k]) for k in defaults if k != "add_pooling_layer"}
        archs = config.get("architectures") or []
        pooler = config.get("add_pooling_layer", not any(a in NO_POOLER for a in archs))
        return cls(add_pooling_layer=bool(pooler), **kw)

    def to_hf(self) -> dict:
        """A ``config.json`` dict that transformers' ``AutoModel.from_pretrained`` loads as this encoder."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if self.add_pooling_layer:
            del out["add_pooling_layer"]
        out["pooler_output_size"] = self.pooled_size
        out.update(
            model_type="vit",
            architectures=["ViTModel"],
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            encoder_stride=self.patch_size,
        )
        return out


class PatchProjection(nn.Module):
    """HF's ``Conv2d(C, D, P, stride=P)`` on channels-last pixels: ``[B, H, W, C]`` -> ``[B, N, D]``.

    ``weight [D, C, P, P]`` (torch layout), ``bias [D]``; patches in row-major (h, w) order as torch's
    ``flatten(2)``.
    """

    cfg: Config
    dtype: Any = None

    @nn.compact
    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        cfg = self.cfg
        P, C, D, g = cfg.patch_size, cfg.num_channels, cfg.hidden_size, cfg.grid
        w = self.param("weight", nn.initializers.lecun_normal(in_axis=(1, 2, 3), out_axis=0), (D, C, P, P))
        b = self.param("bias", nn.initializers.zeros, (D,))
        dt = self.dtype or x_BxHxWxC.dtype
        B = x_BxHxWxC.shape[0]
        x = x_BxHxWxC.astype(dt).reshape(B, g, P, g, P, C)  # [B, gh, y, gw, x, C]
        e_BxGxGxD = jnp.einsum("bhywxc,dcyx->bhwd", x, w.astype(dt))
        return e_BxGxGxD.reshape(B, g * g, D) + b.astype(dt).reshape(1, 1, D)


class PatchEmbeddings(nn.Module):
    cfg: Config
    dtype: Any = None

    @nn.compact
    def __call__(self, x_BxHxWxC):
        return PatchProjection(self.cfg, self.dtype, name="projection")(x_BxHxWxC)


class Embeddings(nn.Module):
    """``concat(cls, patches) + E_pos``: ``[B, H, W, C]`` -> ``[B·(1+N), D]``."""

    cfg: Config
    dtype: Any = None

    @nn.compact
    def __call__(self, x_BxHxWxC):
        cfg = self.cfg
        D, N = cfg.hidden_size, cfg.num_patches
        init = nn.initializers.truncated_normal(0.02)
        cls = self.param("cls_token", init, (1, 1, D))
        pos = self.param("position_embeddings", init, (1, 1 + N, D))
        e_BxNxD = PatchEmbeddings(cfg, self.dtype, name="patch_embeddings")(x_BxHxWxC)
        B, dt = e_BxNxD.shape[0], e_BxNxD.dtype
        h = jnp.concatenate([jnp.broadcast_to(cls.astype(dt), (B, 1, D)), e_BxNxD], axis=1)
        h = h + jnp.broadcast_to(pos.astype(dt), (B, 1 + N, D))
        return h.reshape(B * (1 + N), D)


class SelfAttention(nn.Module):
    """Bidirectional multi-head attention ``x [B·S, D]`` -> ``[B·S, D]`` (before ``attention.output``)."""

    cfg: Config
    batch: int
    dtype: Any = None
    attention: str = "auto"
    block: int | None = None

    @nn.compact
    def __call__(self, x_TxD: jax.Array) -> jax.Array:
        cfg = self.cfg
        T, D = x_TxD.shape
        B = self.batch
        S, N = T // B, cfg.num_attention_heads
        q, k, v = (
            nn.Dense(D, use_bias=cfg.qkv_bias, dtype=self.dtype, name=n)(x_TxD).reshape(B, S, N, D // N)
            for n in ("query", "key", "value")
        )
        mask_BxSxS = jnp.ones((B, S, S), bool)
        q_BxSxKxGxd = q.reshape(B, S, N, 1, D // N)  # K = N heads, G = 1
        o = self_attention(q_BxSxKxGxd, k, v, mask_BxSxS, implementation=self.attention, block=self.block, causal=False)
        return o.reshape(T, D)


class Dense(nn.Module):
    """HF's ``ViTSelfOutput`` / ``ViTIntermediate``-style wrapper: one ``dense`` child."""

    features: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.features, dtype=self.dtype, name="dense")(x)


class Attention(nn.Module):
    cfg: Config
    batch: int
    dtype: Any = None
    attention: str = "auto"
    block: int | None = None

    @nn.compact
    def __call__(self, x_TxD):
        a = SelfAttention(self.cfg, self.batch, self.dtype, self.attention, self.block, name="attention")(x_TxD)
        return Dense(self.cfg.hidden_size, self.dtype, name="output")(a)


class Layer(nn.Module):
    """One pre-norm encoder layer ``[B·S, D]`` -> ``[B·S, D]``; fields as `ViTModel`'s."""

    cfg: Config
    batch: int
    dtype: Any = None
    attention: str = "auto"
    attention_block: int | None = None

    @nn.compact
    def __call__(self, x_TxD):
        cfg, dt = self.cfg, self.dtype
        h = LayerNorm(cfg.layer_norm_eps, dt, name="layernorm_before")(x_TxD)
        x_TxD = x_TxD + Attention(cfg, self.batch, dt, self.attention, self.attention_block, name="attention")(h)
        h = LayerNorm(cfg.layer_norm_eps, dt, name="layernorm_after")(x_TxD)
        h_TxI = ACTIVATIONS[cfg.hidden_act](Dense(cfg.intermediate_size, dt, name="intermediate")(h))
        return x_TxD + Dense(cfg.hidden_size, dt, name="output")(h_TxI)


class Layers(nn.Module):
    """HF's ``encoder.layer`` ModuleList: children ``"0"``, ``"1"``, ...; ``remat`` as `ViTModel`'s."""

    cfg: Config
    batch: int
    remat: bool | str = False
    attention: str = "auto"
    attention_block: int | None = None
    dtype: Any = None

    @nn.compact
    def __call__(self, x_TxD):
        policy = remat_policy(self.remat)
        layer_cls = Layer if policy is False else nn.remat(Layer, policy=policy)
        for i in range(self.cfg.num_hidden_layers):
            x_TxD = layer_cls(self.cfg, self.batch, self.dtype, self.attention, self.attention_block, name=str(i))(
                x_TxD
            )
        return x_TxD


class Encoder(nn.Module):
    cfg: Config
    batch: int
    remat: bool | str = False
    attention: str = "auto"
    attention_block: int | None = None
    dtype: Any = None

    @nn.compact
    def __call__(self, x_TxD):
        return Layers(self.cfg, self.batch, self.remat, self.attention, self.attention_block, self.dtype, name="layer")(
            x_TxD
        )


class ViTModel(nn.Module):
    """The encoder: ``pixel_values [B, H, W, C]`` -> ``last_hidden_state [B, 1+N, D]`` (see the module doc).

    ``remat`` (True or a policy name of `lorajax.models.llama.REMAT_POLICIES`)
    recomputes each layer in the backward pass; ``attention`` /
    ``attention_block`` choose the attention core; ``dtype`` is the compute dtype
    of the matmuls and outputs (parameters keep theirs; LayerNorm statistics and
    the softmax stay float32; None: the params' dtype), as in `lorajax.models.bert`.
    """

    cfg: Config
    remat: bool | str = False
    attention: str = "auto"
    attention_block: int | None = None
    dtype: Any = None

    def __post_init__(self):
        check_compute_options(self.attention, self.attention_block, self.remat)
        super().__post_init__()

    @nn.compact
    def __call__(self, pixel_values: jax.Array, *, output_pooled: bool = False):
        cfg = self.cfg
        want = (cfg.image_size, cfg.image_size, cfg.num_channels)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != want:
            raise ValueError(
                f"pixel_values must be [batch, {want[0]}, {want[1]}, {want[2]}] (channels-last, image_size="
                f"{cfg.image_size}, num_channels={cfg.num_channels}), got shape {tuple(pixel_values.shape)}"
            )
        B = pixel_values.shape[0]
        x_TxD = Embeddings(cfg, self.dtype, name="embeddings")(pixel_values)
        x_TxD = Encoder(cfg, B, self.remat, self.attention, self.attention_block, self.dtype, name="encoder")(x_TxD)
        x_TxD = LayerNorm(cfg.layer_norm_eps, self.dtype, name="layernorm")(x_TxD)
        hidden = x_TxD.reshape(B, 1 + cfg.num_patches, cfg.hidden_size)
        if cfg.add_pooling_layer and (output_pooled or self.is_initializing()):
            pooled = Pooler(cfg, self.dtype, name="pooler")(hidden[:, 0])
            if output_pooled:
                return hidden, pooled
        elif output_pooled:
            raise ValueError("output_pooled=True but this model has no pooler (add_pooling_layer=False)")
        return hidden


class Pooler(nn.Module):
    """``act(first Wp + bp)``: ``[B, D]`` -> ``[B, D_pool]`` (``pooler_act``, tanh by default)."""

    cfg: Config
    dtype: Any = None

    @nn.compact
    def __call__(self, first_BxD):
        h = nn.Dense(self.cfg.pooled_size, dtype=self.dtype, name="dense")(first_BxD)
        return POOLER_ACTS[self.cfg.pooler_act](h)


def build(cfg: Config) -> ViTModel:
    return ViTModel(cfg)


def _dense(hf: str, path: tuple, bias: bool = True) -> dict:
    out = {f"{hf}.weight": (path + ("kernel",), "linear")}
    if bias:
        out[f"{hf}.bias"] = (path + ("bias",), "copy")
    return out


def _copy(hf: str, path: tuple) -> dict:
    return {f"{hf}.weight": (path + ("weight",), "copy"), f"{hf}.bias": (path + ("bias",), "copy")}


def param_map(cfg: Config) -> dict[str, tuple[tuple[str, ...], str]]:
    """``{hf_name: (flax_path, "linear" | "copy")}``: HF names (no prefix) equal the params paths."""
    out: dict[str, tuple[tuple[str, ...], str]] = {
        "embeddings.cls_token": (("embeddings", "cls_token"), "copy"),
        "embeddings.position_embeddings": (("embeddings", "position_embeddings"), "copy"),
    }
    out.update(_copy("embeddings.patch_embeddings.projection", ("embeddings", "patch_embeddings", "projection")))
    for i in range(cfg.num_hidden_layers):
        p, t = f"encoder.layer.{i}", ("encoder", "layer", str(i))
        for n in ("query", "key", "value"):
            out.update(_dense(f"{p}.attention.attention.{n}", t + ("attention", "attention", n), cfg.qkv_bias))
        out.update(_dense(f"{p}.attention.output.dense", t + ("attention", "output", "dense")))
        out.update(_dense(f"{p}.intermediate.dense", t + ("intermediate", "dense")))
        out.update(_dense(f"{p}.output.dense", t + ("output", "dense")))
        out.update(_copy(f"{p}.layernorm_before", t + ("layernorm_before",)))
        out.update(_copy(f"{p}.layernorm_after", t + ("layernorm_after",)))
    out.update(_copy("layernorm", ("layernorm",)))
    if cfg.add_pooling_layer:
        out.update(_dense("pooler.dense", ("pooler", "dense")))
    return out


def example_inputs(cfg: Config) -> tuple:
    return (jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.num_channels), jnp.float32),)
