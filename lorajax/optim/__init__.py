"""Optimiser-side LoRA methods as optax transformations.

Each composes with ``optax.chain`` / ``masked`` / ``multi_transform`` and works
on the (trainable) adapters tree from `lorajax.init` / `lorajax.partition`:
leaves are recognised by name (`leaf_labels`), so A and B are never paired by
hand.

* `loraplus` — LoRA+: ``lr_B = λ · lr_A``.
* `sora` / `sora_gate_optimizer` / `proximal` / `gate_penalty` / `prune` — SoRA.
* `allora` / `scale_by_allora` — ALLoRA (experimental: formula unverified).
"""

from lorajax.optim.allora import allora, allora_coefficient, scale_by_allora
from lorajax.optim.labels import leaf_labels
from lorajax.optim.loraplus import loraplus
from lorajax.optim.sora import gate_penalty, prune, proximal, quirk_threshold, soft_threshold, sora, sora_gate_optimizer

__all__ = [
    "leaf_labels", "loraplus", "allora", "allora_coefficient", "scale_by_allora",
    "sora", "sora_gate_optimizer", "proximal", "soft_threshold", "quirk_threshold", "gate_penalty", "prune",
]
