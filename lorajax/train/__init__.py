"""Training steps that differentiate only the adapters."""

from lorajax.train.loop import fit
from lorajax.train.step import make_lora_step

__all__ = ["make_lora_step", "fit"]
