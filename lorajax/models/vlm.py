"""A small vision-language model: ViT encoder -> projector -> image tokens prepended to a Llama decoder.

The LLaVA-style layout CDDM fine-tunes (Liu et al., ECCV 2024, arXiv 2503.06973; the
official script UnicomAI/UnicomBenchmark ``CDDMBench/Qwen-VL/finetune.py`` adapts
Qwen-VL's vision tower, its adapter and the LM at once), at toy size::

    v      = ViT(pixel_values)                        # [B, 1+N, Dv]  last_hidden_state (lorajax.models.vit)
    p      = projector(v)                             # [B, 1+N, D]   Linear, or Linear-GELU-Linear ("mlp")
    e      = embed_tokens(question_ids)               # [B, S, D]
    h      = decoder(concat(p, e))                    # [B, 1+N+S, D] Llama layers, causal, RoPE from 0
    logits = lm_head(RMSNorm(h)[:, -1])               # [B, V]        the answer token's logits only

Params tree (top-level groups for `lorajax.groups.Rules`)::

    {"vision":    ViTModel params (``embeddings``, ``encoder.layer.<i>...``, ``layernorm``),
     "projector": {"linear_1": {"kernel", "bias"}[, "linear_2": ...]},   (HF LLaVA's names)
     "lm":        LlamaForCausalLM params (``model.embed_tokens``, ``model.layers.<i>...``,
                  ``model.norm``, ``lm_head``)}

so ``vision.encoder.layer.0.attention.attention.query`` or ``lm.model.layers.0.self_attn.q_proj``
name modules as PEFT does. Every projection is an ``nn.Dense``: `lorajax.adapt` adapts all three
groups at once in factored or merged mode. The ViT pooler is not built (unused).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from lorajax.models import vlm
  >>> cfg = vlm.tiny_config(vocab_size=20, image_size=16, patch_size=8, width=16, layers=1, heads=2)
  >>> model = vlm.VLM(cfg)
  >>> x, q = jnp.zeros((2, 16, 16, 3)), jnp.zeros((2, 5), jnp.int32)
  >>> params = jax.eval_shape(model.init, jax.random.key(0), x, q)["params"]  # shapes only
  >>> sorted(params), jax.eval_shape(model.apply, {"params": params}, x, q).shape
  (['lm', 'projector', 'vision'], (2, 20))
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lorajax.models import llama, vit

__all__ = ["Config", "VLM", "tiny_config", "check_inputs", "PROJECTORS"]

PROJECTORS = ("linear", "mlp")


@dataclasses.dataclass(frozen=True)
class Config:
    """``vision`` (`lorajax.models.vit.Config`), ``lm`` (`lorajax.models.llama.Config`), ``projector``."""

    vision: vit.Config
    lm: llama.Config
    projector: str = "mlp"

    def __post_init__(self):
        if self.projector not in PROJECTORS:
            raise ValueError(f"projector must be one of {PROJECTORS}, got {self.projector!r}")
        if self.vision.add_pooling_layer:
            object.__setattr__(self, "vision", dataclasses.replace(self.vision, add_pooling_layer=False))

    @property
    def image_tokens(self) -> int:
        """``1 + N``: the image tokens prepended to the question."""
        return 1 + self.vision.num_patches


def tiny_config(
    vocab_size: int,
    image_size: int = 32,
    patch_size: int = 8,
    width: int = 64,
    layers: int = 2,
    heads: int = 4,
    projector: str = "mlp",
) -> Config:
    """One width for both towers, ``4 · width`` MLPs (vision) and ``2 · width`` (LM, SwiGLU)."""
    v = vit.Config(
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * width,
        image_size=image_size,
        patch_size=patch_size,
        num_channels=3,
        add_pooling_layer=False,
    )
    lm = llama.Config(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=256,
    )
    return Config(v, lm, projector)


def check_inputs(cfg: Config, pixel_values: Any, question_ids: Any) -> None:
    """Raise ValueError for images not ``[B, image_size, image_size, num_channels]`` or ids not ``[B, S]`` ints."""
    v = cfg.vision
    want = (v.image_size, v.image_size, v.num_channels)
    shape = tuple(getattr(pixel_values, "shape", ()))
    if len(shape) != 4 or shape[1:] != want:
        raise ValueError(
            f"images must be [batch, {want[0]}, {want[1]}, {want[2]}] (channels-last, image_size={v.image_size}, "
            f"num_channels={v.num_channels}), got shape {shape}"
        )
    qshape = tuple(getattr(question_ids, "shape", ()))
    if len(qshape) != 2 or qshape[0] != shape[0]:
        raise ValueError(f"question_ids must be [batch={shape[0]}, seq] token ids, got shape {qshape}")
    if not jnp.issubdtype(question_ids.dtype, jnp.integer):
        raise ValueError(f"question_ids must be integer token ids, got dtype {question_ids.dtype}")


class Projector(nn.Module):
    """``[B, T, Dv]`` -> ``[B, T, D]``: ``linear_1`` (and GELU, ``linear_2`` for ``"mlp"``)."""

    features: int
    kind: str = "mlp"

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.features, name="linear_1")(x)
        if self.kind == "mlp":
            x = nn.Dense(self.features, name="linear_2")(nn.gelu(x, approximate=False))
        return x


class _Decoder(nn.Module):
    """LlamaModel's ``embed_tokens``, ``layers``, ``norm`` over ``concat(prefix, embed(ids))``."""

    cfg: llama.Config
    attention: str = "auto"

    @nn.compact
    def __call__(self, prefix_BxPxD, ids_BxS):
        cfg = self.cfg
        embed = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, embedding_init=nn.initializers.normal(0.02), name="embed_tokens"
        )
        x_BxLxD = jnp.concatenate([prefix_BxPxD.astype(jnp.float32), embed(ids_BxS)], axis=1)
        B, L, D = x_BxLxD.shape
        slots = jnp.arange(L, dtype=jnp.int32)
        causal_LxL = slots[None, :] <= slots[:, None]
        masks: dict[int | None, jax.Array] = {None: jnp.broadcast_to(causal_LxL[None, :, :], (B, L, L))}
        cos, sin = llama._rope_constants(cfg, L, x_BxLxD.dtype)
        layers = llama.Layers(cfg, attention=self.attention, name="layers")
        h_TxD, _ = layers(x_BxLxD.reshape(B * L, D), cos, sin, masks)
        return llama.RMSNorm(cfg.rms_norm_eps, name="norm")(h_TxD).reshape(B, L, D)


class _LM(nn.Module):
    cfg: llama.Config
    attention: str = "auto"

    @nn.compact
    def __call__(self, prefix_BxPxD, ids_BxS):
        h_BxLxD = _Decoder(self.cfg, self.attention, name="model")(prefix_BxPxD, ids_BxS)
        return nn.Dense(self.cfg.vocab_size, use_bias=False, name="lm_head")(h_BxLxD[:, -1])


class VLM(nn.Module):
    """``(pixel_values [B, H, W, C], question_ids [B, S]) -> answer logits [B, V]`` (module docstring)."""

    cfg: Config
    attention: str = "auto"

    @nn.compact
    def __call__(self, pixel_values, question_ids):
        check_inputs(self.cfg, pixel_values, question_ids)
        v_BxTxDv = vit.ViTModel(self.cfg.vision, attention=self.attention, name="vision")(pixel_values)
        p_BxTxD = Projector(self.cfg.lm.hidden_size, self.cfg.projector, name="projector")(v_BxTxDv)
        return _LM(self.cfg.lm, self.attention, name="lm")(p_BxTxD, question_ids)
