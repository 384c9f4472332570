"""Initialisers that need the weights' data and change the base: they return ``(adapters, new_params)``.

Gradient-based: `estimate_gradients` (averaged full gradients of the targeted
weights), `lora_ga` (shifts the base), `lora_sb` (LoRA-XS factors; base not
shifted, returns the adapters only). `to_plain_lora` exports a base-shifting
adapter as a rank-2r LoRA on the original base.
"""

from lorajax.inits.convert import to_plain_lora
from lorajax.inits.gradients import estimate_gradients
from lorajax.inits.lora_ga import lora_ga
from lorajax.inits.lora_sb import lora_sb
from lorajax.inits.olora import olora
from lorajax.inits.pissa import pissa

__all__ = ["pissa", "olora", "lora_ga", "lora_sb", "estimate_gradients", "to_plain_lora"]
