"""Flax model families that load Hugging Face checkpoints, with HF module names."""

from lorajax.models.hub import from_pretrained, save_pretrained

__all__ = ["from_pretrained", "save_pretrained"]
