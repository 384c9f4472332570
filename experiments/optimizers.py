"""The launcher's optimiser choice: optax and lorajax.optim transforms by name."""

from __future__ import annotations

import optax

import lorajax

from experiments.config import RunConfig

#: names accepted by ``--optim.name``
NAMES = ("adamw", "adam", "sgd", "loraplus", "allora", "sora")


def schedule(cfg: RunConfig, lr: float):
    """Linear warm-up then cosine decay to 0 over ``cfg.steps``."""
    o = cfg.optim
    return optax.warmup_cosine_decay_schedule(0.0, lr, min(o.warmup, max(cfg.steps - 1, 1)), max(cfg.steps, 2))


def make_tx(cfg: RunConfig, lr: float, *, adapters: bool = True) -> optax.GradientTransformation:
    """The optimiser for the adapters (``adapters=True``) or for a plain head / full weights.

    LoRA+, ALLoRA and SoRA act on adapter leaves by name; for a head they fall
    back to AdamW.
    """
    o = cfg.optim
    sched = schedule(cfg, lr)
    name = o.name if adapters else ("adamw" if o.name in ("loraplus", "allora", "sora") else o.name)
    if name == "adamw":
        return optax.adamw(sched, weight_decay=o.weight_decay)
    if name == "adam":
        return optax.adam(sched)
    if name == "sgd":
        return optax.sgd(sched, momentum=0.9)
    if name == "loraplus":
        return lorajax.optim.loraplus(sched, lr_ratio=o.lr_ratio, weight_decay=o.weight_decay)
    if name == "allora":
        return lorajax.optim.allora(sched, eta=o.allora_eta, weight_decay=o.weight_decay)
    if name == "sora":
        if cfg.spec.variant != "sora":
            raise SystemExit("--optim.name sora trains SoRA's gates: use it with --spec.variant sora")
        return lorajax.optim.sora(optax.adamw(sched, weight_decay=o.weight_decay), gate_lr=sched,
                                  threshold=o.sora_threshold)
    raise SystemExit(f"unknown optimiser {o.name!r}: {' | '.join(NAMES)}")


def extra_loss(cfg: RunConfig, adapters):
    """Terms an optimiser-side method adds to the task loss (SoRA's L1 on the gates), else 0."""
    if cfg.optim.name == "sora" and cfg.optim.sora_lambda:
        return lorajax.optim.gate_penalty(adapters, cfg.optim.sora_lambda)
    return 0.0
