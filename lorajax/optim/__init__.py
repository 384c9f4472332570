"""Optimiser-side LoRA methods as optax transformations.

Each composes with ``optax.chain`` / ``masked`` / ``multi_transform`` and works
on the (trainable) adapters tree from `lorajax.init` / `lorajax.partition`:
leaves are recognised by name (`leaf_labels`), so A and B are never paired by
hand.

* `loraplus` — LoRA+: ``lr_B = λ · lr_A``.
* `sora` / `sora_gate_optimizer` / `proximal` / `gate_penalty` / `prune` — SoRA.
* `allora` / `scale_by_allora` — ALLoRA (experimental: formula unverified).
* `galore` — GaLore (full-weight training; `optax.contrib.galore` on lorajax's
  target grammar; ``optim_bits=8`` for the official 8-bit state); `state_bytes` /
  `galore_state_formula` — optimiser memory.
* `scale_by_adam_8bit` — bitsandbytes' block-wise 8-bit Adam (``Adam8bit``); its pure parts
  `dynamic_map` / `quantize_blockwise` / `dequantize_blockwise`, and `adam_8bit_state_bytes`.
* `lora_pro` / `scale_by_lora_pro` / `adjusted_gradients` — LoRA-Pro (gradients adjusted
  so the equivalent gradient is the best low-rank approximation of the full one).
"""

from lorajax.optim.adam8bit import (QuantizedMoment, ScaleByAdam8bitState, adam_8bit_state_bytes,
                                    dequantize_blockwise, dynamic_map, quantize_blockwise, scale_by_adam_8bit)
from lorajax.optim.allora import allora, allora_coefficient, scale_by_allora
from lorajax.optim.galore import (GaLoreStateSize, galore, galore_dimension_numbers, galore_mask, galore_state_formula,
                                  galore_targets, state_bytes)
from lorajax.optim.labels import leaf_labels
from lorajax.optim.lora_pro import (adjust_lora_gradients, adjusted_gradients, equivalent_gradient, lora_gradients,
                                    lora_pro, lora_pro_projection, optimal_x, scale_by_lora_pro, skip_nonfinite,
                                    solve_sylvester)
from lorajax.optim.loraplus import loraplus
from lorajax.optim.sora import gate_penalty, prune, proximal, quirk_threshold, soft_threshold, sora, sora_gate_optimizer

__all__ = [
    "leaf_labels", "loraplus", "allora", "allora_coefficient", "scale_by_allora",
    "sora", "sora_gate_optimizer", "proximal", "soft_threshold", "quirk_threshold", "gate_penalty", "prune",
    "galore", "galore_targets", "galore_dimension_numbers", "galore_mask", "state_bytes", "galore_state_formula",
    "GaLoreStateSize",
    "scale_by_adam_8bit", "ScaleByAdam8bitState", "QuantizedMoment", "dynamic_map", "quantize_blockwise",
    "dequantize_blockwise", "adam_8bit_state_bytes",
    "lora_pro", "scale_by_lora_pro", "adjust_lora_gradients", "adjusted_gradients", "equivalent_gradient",
    "lora_gradients", "lora_pro_projection", "optimal_x", "solve_sylvester", "skip_nonfinite",
]
