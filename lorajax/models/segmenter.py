"""A small SAM-*style* segmentation model for TopoLoRA-SAM's recipe: ViT encoder -> neck -> ConvAdapter -> decoder.

This is a stand-in, NOT SAM ViT-B: no SAM checkpoint is available offline, and
SAM's prompt encoder and two-way-transformer mask decoder are not
reimplemented. What is kept is the shape of TopoLoRA-SAM (Khazem et al.;
official code salimkhazem/Seglab @7de3a5fb, ``seglab/models/sam_peft/{lora,
adapters,model}.py``; ``../shared/specs/applications.md`` §2): a frozen ViT
image encoder with LoRA on its MLP layers only, a spatial convolutional adapter
on the image embedding, a trainable light mask decoder, and the loss
BCE + Dice + 0.5·clDice. Pipeline for ``pixel_values [B, H, W, C]``
(channels-last)::

    tokens  = ViT(pixels)[:, 1:]                          # [B, N, D], N = g·g patches (CLS dropped)
    grid    = tokens.reshape(B, g, g, D)                  # [B, g, g, D]
    e       = LN2d(conv1x1(grid))                         # neck: D -> C channels   [B, g, g, C]
    e       = e + PW_out(GELU(BN(PW_in(DW_k(e)))))        # ConvAdapter (use_adapter)
    u       = GELU(ConvT2(GELU(LN2d(ConvT1(e)))))         # decoder: two 2x upsamplings [B, 4g, 4g, C/2]
    logits  = bilinear(conv1x1(u) -> 1 channel, (H, W))  # [B, H, W]

* The neck is SAM's (1x1 conv without bias + channel LayerNorm, eps 1e-6); SAM
  adds a 3x3 conv + LayerNorm2d, left out here. It belongs to the image encoder
  (frozen in the ``topolora`` and ``decoder`` arms).
* `ConvAdapter` (Seglab ``adapters.py``): residual depthwise-separable block,
  depthwise ``k×k`` conv (no bias) -> pointwise ``C -> h`` (no bias) ->
  BatchNorm -> GELU (exact, torch's default) -> pointwise ``h -> C`` (no bias).
  ``zero_init_last=False`` as the official code: the adapter is NOT the identity
  at init. Its BatchNorm uses the batch statistics in training and the running
  statistics in evaluation (flax ``batch_stats`` collection; ``momentum=0.9`` is
  torch's ``momentum=0.1``, eps 1e-5); the training loop carries the running
  statistics as frozen, non-differentiated leaves refreshed after each step (see
  `loss_and_stats`).
* The decoder follows SAM's ``output_upscaling`` (ConvTranspose 2x2/2 ->
  LayerNorm2d -> GELU -> ConvTranspose 2x2/2 -> GELU) and ends with a 1x1 conv
  to one logit map instead of SAM's hypernetwork-MLP dot product (no prompt
  tokens here); bilinear resize to the input size (half-pixel centres, as
  ``F.interpolate(align_corners=False)``).

Trainable groups, per arm (`ARMS`): ``topolora`` = LoRA (r=8, α=16) on the
encoder's ``intermediate.dense`` / ``output.dense`` (never
``attention.output.dense``; `MLP_TARGETS`) + the ConvAdapter + the decoder;
``decoder`` = the decoder only (no adapter); ``full`` = every weight (encoder,
neck, decoder; no adapter, no LoRA). Seglab trains all groups with one AdamW
group (lr 1e-4, wd 1e-4).

Loss (`seg_loss`, Seglab ``models/__init__.py``): ``BCEWithLogits + softDice(σ)
+ 0.5 · clDice(σ)`` with Seglab's 10 skeleton iterations, which are
`lorajax.cldice.cldice_loss`'s ``iters=9`` (`CLDICE_ITERS`; Seglab computes δ
before eroding, see the spec) and eps 1e-6.

Shapes: ``Segmenter(...).apply(variables, pixels [B, H, W, C], train=False)`` ->
logits ``[B, H, W]``; with ``train=True`` and ``use_adapter`` pass
``mutable=["batch_stats"]``.

References:
  Khazem et al., "TopoLoRA-SAM" (Seglab, github.com/salimkhazem/Seglab);
  Kirillov et al., "Segment Anything", arXiv:2304.02643 (``image_encoder.py``
  neck, ``mask_decoder.py`` output_upscaling, ``common.py`` LayerNorm2d); Shit
  et al., "clDice", CVPR 2021.
"""

from __future__ import annotations

import dataclasses
from typing import Any, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from lorajax.cldice import cldice_loss, soft_dice_loss
from lorajax.models import vit

__all__ = [
    "ARMS",
    "MLP_TARGETS",
    "CLDICE_ITERS",
    "LayerNorm2d",
    "ConvAdapter",
    "MaskDecoder",
    "Segmenter",
    "seg_loss",
    "groups",
    "lora_spec",
]

#: the compared arms (Seglab's ablation names: decoder-only, full; topolora = LoRA + adapter + decoder)
ARMS = ("topolora", "decoder", "full")
#: LoRA targets: the ViT MLP layers only (``attention.output.dense`` is not matched)
MLP_TARGETS = r"image_encoder\.encoder\.layer\.\d+\.(intermediate|output)\.dense"
#: `lorajax.cldice.cldice_loss` iterations equal to Seglab's 10 (its loop computes δ before eroding)
CLDICE_ITERS = 9
#: Seglab's loss weights: BCE, soft Dice, clDice
LOSS_WEIGHTS = (1.0, 1.0, 0.5)


class LayerNorm2d(nn.Module):
    """SAM's ``LayerNorm2d``: normalise each pixel over channels, ``[B, h, w, C]`` -> same; params weight/bias."""

    eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        w = self.param("weight", nn.initializers.ones, (c,))
        b = self.param("bias", nn.initializers.zeros, (c,))
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + jnp.float32(self.eps))
        shape = (1,) * (x.ndim - 1) + (c,)
        return (y * w.reshape(shape) + b.reshape(shape)).astype(x.dtype)


class ConvAdapter(nn.Module):
    """Seglab's spatial adapter: ``x + PW_out(GELU(BN(PW_in(DW_k(x)))))`` on ``[B, h, w, C]``.

    ``hidden`` (h; None: C, as the official h = 256 = C), ``kernel`` (k = 3),
    ``zero_init_last`` (False: the official init, not the identity at init).
    Parameters: ``k²·C + 2·C·h`` conv weights + ``2·h`` BatchNorm affine
    (C = h = 256: 133,888, spec §2).
    """

    hidden: int | None = None
    kernel: int = 3
    zero_init_last: bool = False

    @nn.compact
    def __call__(self, x_BxHxWxC: jax.Array, train: bool = False) -> jax.Array:
        C = x_BxHxWxC.shape[-1]
        h = self.hidden or C
        k = self.kernel
        y = nn.Conv(C, (k, k), padding="SAME", feature_group_count=C, use_bias=False, name="depthwise")(x_BxHxWxC)
        y = nn.Conv(h, (1, 1), use_bias=False, name="pointwise_in")(y)
        y = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name="norm")(y)
        y = jax.nn.gelu(y, approximate=False)
        last_init = nn.initializers.zeros if self.zero_init_last else nn.initializers.lecun_normal()
        y = nn.Conv(C, (1, 1), use_bias=False, kernel_init=last_init, name="pointwise_out")(y)
        return x_BxHxWxC + y


class MaskDecoder(nn.Module):
    """``[B, g, g, C]`` -> logits ``[B, 4g, 4g]``: SAM's output upscaling + a 1x1 conv to one channel."""

    @nn.compact
    def __call__(self, e_BxGxGxC: jax.Array) -> jax.Array:
        C = e_BxGxGxC.shape[-1]
        u = nn.ConvTranspose(C, (2, 2), strides=(2, 2), name="upscale_1")(e_BxGxGxC)
        u = jax.nn.gelu(LayerNorm2d(name="upscale_norm")(u), approximate=False)
        u = nn.ConvTranspose(max(C // 2, 1), (2, 2), strides=(2, 2), name="upscale_2")(u)
        u = jax.nn.gelu(u, approximate=False)
        return nn.Conv(1, (1, 1), name="mask_head")(u)[..., 0]


class Neck(nn.Module):
    """SAM's neck (first half): ``LN2d(conv1x1(x))``, ``[B, g, g, D]`` -> ``[B, g, g, C]``, no bias."""

    channels: int

    @nn.compact
    def __call__(self, x):
        return LayerNorm2d(name="norm")(nn.Conv(self.channels, (1, 1), use_bias=False, name="conv")(x))


class Segmenter(nn.Module):
    """ViT encoder -> neck -> (ConvAdapter) -> decoder: ``pixels [B, H, W, C]`` -> logits ``[B, H, W]``.

    Params: ``{"image_encoder": <vit.ViTModel params>, "neck", "adapter" (if
    ``use_adapter``), "decoder"}``; ``batch_stats``: ``{"adapter": {"norm": ...}}``.
    ``remat`` / ``attention`` / ``dtype``: the encoder's (`lorajax.models.vit.ViTModel`).
    """

    vit_cfg: vit.Config
    embed_channels: int = 32
    use_adapter: bool = True
    adapter_hidden: int | None = None
    adapter_kernel: int = 3
    zero_init_last: bool = False
    remat: bool | str = False
    attention: str = "auto"
    dtype: Any = None

    @nn.compact
    def __call__(self, pixel_values: jax.Array, train: bool = False) -> jax.Array:
        cfg = self.vit_cfg
        encoder = vit.ViTModel(cfg, remat=self.remat, attention=self.attention, dtype=self.dtype, name="image_encoder")
        hidden = encoder(pixel_values)  # raises a ValueError naming the expected [B, H, W, C]
        B, g = hidden.shape[0], cfg.grid
        grid_BxGxGxD = hidden[:, 1:].astype(jnp.float32).reshape(B, g, g, cfg.hidden_size)
        e = Neck(self.embed_channels, name="neck")(grid_BxGxGxD)
        if self.use_adapter:
            adapter = ConvAdapter(self.adapter_hidden, self.adapter_kernel, self.zero_init_last, name="adapter")
            e = adapter(e, train=train)
        low_BxMxM = MaskDecoder(name="decoder")(e)
        H = cfg.image_size
        return jax.image.resize(low_BxMxM, (B, H, H), method="bilinear")


def seg_loss(logits_BxHxW: jax.Array, masks_BxHxW: jax.Array) -> jax.Array:
    """Seglab's ``BCEWithLogits + softDice(σ) + 0.5·clDice(σ)`` (mean over pixels / per-image means), float32."""
    if logits_BxHxW.shape != masks_BxHxW.shape or logits_BxHxW.ndim != 3:
        raise ValueError(f"logits and masks must both be [B, H, W], got {logits_BxHxW.shape} and {masks_BxHxW.shape}")
    logits = logits_BxHxW.astype(jnp.float32)
    target = masks_BxHxW.astype(jnp.float32)
    prob = jax.nn.sigmoid(logits)
    bce = optax.sigmoid_binary_cross_entropy(logits, target).mean()
    w_bce, w_dice, w_cl = LOSS_WEIGHTS
    return (
        w_bce * bce
        + w_dice * soft_dice_loss(prob, target)
        + w_cl * cldice_loss(prob, target, iters=CLDICE_ITERS, smooth=1e-6)
    )


def lora_spec(rank: int = 8, alpha: float = 16.0, variant: str = "lora"):
    """TopoLoRA-SAM's LoRA: r=8, α=16 on `MLP_TARGETS` (a `lorajax.Spec`)."""
    import lorajax

    return lorajax.Spec(variant, rank=rank, alpha=alpha, targets=MLP_TARGETS)


#: per arm: the params groups (top-level names) trained in full; the rest of the params is frozen
TRAINED = {"topolora": ("adapter", "decoder"), "decoder": ("decoder",), "full": ("image_encoder", "neck", "decoder")}


def groups(arm: str, params: dict) -> tuple[dict, dict]:
    """``(trained, frozen)``: ``params`` split by top-level group for ``arm`` (see `TRAINED`)."""
    if arm not in TRAINED:
        raise ValueError(f"arm must be one of {ARMS}, got {arm!r}")
    missing = [g for g in TRAINED[arm] if g not in params]
    if missing:
        raise ValueError(f"arm {arm!r} trains {missing}, which the params lack (use_adapter={'adapter' in params})")
    trained = {k: v for k, v in params.items() if k in TRAINED[arm]}
    frozen = {k: v for k, v in params.items() if k not in TRAINED[arm]}
    return trained, frozen


def param_count(tree: Any) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))


def build(vit_cfg: vit.Config, arm: str, **kw: Any) -> Segmenter:
    """The `Segmenter` of ``arm``: the ConvAdapter only in ``topolora`` (as `TRAINED`)."""
    if arm not in ARMS:
        raise ValueError(f"arm must be one of {ARMS}, got {arm!r}")
    return Segmenter(vit_cfg, use_adapter=arm == "topolora", **kw)


def loss_and_stats(model: Segmenter, apply_fn: Any = None):
    """``loss(variables, adapters, pixels, masks) -> (loss, batch_stats)`` in training mode.

    ``apply_fn``: ``model.apply`` or ``lorajax.adapt(model.apply, spec)``-style
    ``fn(variables, adapters, ...)``; None: no adapters (``adapters`` ignored).
    With the adapter's BatchNorm, the forward uses the batch statistics and
    returns the updated running statistics (``{}`` without the adapter), to be
    stored as frozen leaves after the step.
    """

    def loss(variables, adapters, pixels, masks):
        kw: dict[str, Any] = {"train": True}
        if model.use_adapter:
            kw["mutable"] = ["batch_stats"]
        out = model.apply(variables, pixels, **kw) if apply_fn is None else apply_fn(variables, adapters, pixels, **kw)
        logits, new = out if model.use_adapter else (out, {})
        return seg_loss(cast(jax.Array, logits), masks), dict(new).get("batch_stats", {})

    return loss


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Parameter counts of a segmenter's groups (for results tables)."""

    encoder: int
    neck: int
    adapter: int
    decoder: int

    @classmethod
    def of(cls, params: dict) -> "Sizes":
        return cls(*(param_count(params.get(k, {})) for k in ("image_encoder", "neck", "adapter", "decoder")))
