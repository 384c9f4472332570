"""Optimiser-side LoRA methods as optax transformations.

Each composes with ``optax.chain`` / ``masked`` / ``multi_transform`` /
``inject_hyperparams`` and works on the (trainable) adapters tree from
`lorajax.init` / `lorajax.partition` (``None`` leaves allowed): leaves are
recognised by name (`leaf_labels`), so A and B are never paired by hand. Every
optimiser has one signature, ``name(learning_rate, *, keyword=...)``, and passes
one conformance suite (``tests/optim/test_optim_conformance.py``).

The optimisers:

* `loraplus` — LoRA+: ``lr_B = λ · lr_A``.
* `lora_pro` — LoRA-Pro: gradients adjusted so that the equivalent gradient is the
  best low-rank approximation of the full one (Adam in the full space by default).
* `allora` — ALLoRA: per-row learning rates ``∝ 1/‖θ_row‖`` (experimental: formula unverified).
* `sora` — SoRA: AdamW on A and B, a proximal (soft-threshold) AdamW on the gates.
* `galore` — GaLore: full-weight training, Adam in a low-rank gradient subspace
  (`optax.contrib.galore` on lorajax's target grammar; ``optim_bits=8`` for 8-bit state).
* `adam_8bit` — bitsandbytes' block-wise 8-bit Adam(W).

The pieces they are built from, to combine with optax:

* `scale_by_lora_pro`, `scale_by_adam_8bit` — the directions, without learning rate;
* `skip_nonfinite` — skip a step whose gradients or updates are not finite;
* `leaf_labels` — ``"A"`` / ``"B"`` / ``"gate"`` / ``"other"`` per leaf, for ``multi_transform``;
* `gate_penalty` and `prune` — SoRA's L1 term and the pruning to a plain LoRA;
* `state_bytes` — the exact optimiser-state size, from shapes only.

The pure maths and the remaining building blocks stay in their modules, e.g.
`lorajax.optim.lora_pro.solve_sylvester`, ``lorajax.optim.lora_pro.adjusted_gradients``,
``lorajax.optim.galore.galore_state_formula``, ``lorajax.optim.adam8bit.quantize_blockwise``,
``lorajax.optim.sora.soft_threshold``, ``lorajax.optim.allora.scale_by_allora``
(import them with ``from lorajax.optim.<module> import <name>``).
"""

from lorajax.optim.adam8bit import adam_8bit, scale_by_adam_8bit
from lorajax.optim.allora import allora
from lorajax.optim.galore import galore, state_bytes
from lorajax.optim.labels import leaf_labels
from lorajax.optim.lora_pro import lora_pro, scale_by_lora_pro, skip_nonfinite
from lorajax.optim.loraplus import loraplus
from lorajax.optim.sora import gate_penalty, prune, sora

__all__ = [
    # optimisers: name(learning_rate, *, ...)
    "loraplus",
    "lora_pro",
    "allora",
    "sora",
    "galore",
    "adam_8bit",
    # building blocks
    "scale_by_lora_pro",
    "scale_by_adam_8bit",
    "skip_nonfinite",
    "leaf_labels",
    "gate_penalty",
    "prune",
    "state_bytes",
]
