"""Training steps that differentiate only the adapters."""

from lorajax.train.loop import fit
from lorajax.train.step import make_lora_step, refresh_state

__all__ = ["make_lora_step", "fit", "refresh_state"]
