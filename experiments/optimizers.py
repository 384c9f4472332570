"""The launcher's optimiser choice: optax and lorajax.optim transforms by name."""

from __future__ import annotations

import functools
from typing import Any

import optax

import lorajax
from experiments.config import RunConfig
from lorajax.optim.sora import is_sora

#: names accepted by ``--optim.name``
NAMES = ("adamw", "adam", "sgd", "loraplus", "allora", "sora", "lora_pro", "galore")
#: names that act on adapter leaves by name (a head falls back to AdamW; full weights: an error)
ADAPTER_ONLY = ("loraplus", "allora", "sora", "lora_pro")


def schedule(cfg: RunConfig, lr: float):
    """Linear warm-up then cosine decay to 0 over ``cfg.steps``."""
    o = cfg.optim
    return optax.warmup_cosine_decay_schedule(0.0, lr, min(o.warmup, max(cfg.steps - 1, 1)), max(cfg.steps, 2))


def make_tx(
    cfg: RunConfig, lr: float, *, adapters: bool = True, spec: lorajax.Spec | None = None, full: Any = None
) -> optax.GradientTransformation:
    """The optimiser for the adapters (``adapters=True``), a plain head, or full weights (``full``).

    LoRA+, ALLoRA, SoRA and LoRA-Pro act on adapter leaves by name; for a head
    they fall back to AdamW. LoRA-Pro needs the adapters' ``spec`` (its scale
    ``s``). GaLore trains full weights: ``full`` is that params tree (its
    target selection is checked now); for a head it falls back to AdamW.
    """
    o = cfg.optim
    sched = schedule(cfg, lr)
    if full is not None and o.name in ADAPTER_ONLY:
        raise SystemExit(f"--optim.name {o.name} acts on adapters; full fine-tuning takes adamw | adam | sgd | galore")
    if adapters and o.name == "galore":
        raise SystemExit("--optim.name galore trains full weights: use it with --spec.variant full")
    head = not adapters and full is None
    name = "adamw" if head and o.name in ADAPTER_ONLY + ("galore",) else o.name
    adamw = functools.partial(optax.adamw, weight_decay=o.weight_decay)
    if name == "adamw":
        return adamw(sched)
    if name == "adam":
        return optax.adam(sched)
    if name == "sgd":
        return optax.sgd(sched, momentum=0.9)
    if name == "loraplus":
        return lorajax.optim.loraplus(sched, lr_ratio=o.lr_ratio, optimizer=adamw)
    if name == "allora":
        return lorajax.optim.allora(sched, eta=o.allora_eta, optimizer=adamw)
    if name == "sora":
        if not is_sora(cfg.spec.variant):
            raise SystemExit("--optim.name sora trains SoRA's gates: use it with --spec.variant sora")
        return lorajax.optim.sora(sched, threshold=o.sora_threshold, optimizer=adamw)
    if name == "lora_pro":
        if spec is None:
            raise SystemExit("--optim.name lora_pro needs the adapters' Spec (its scale)")
        return lorajax.optim.lora_pro(sched, spec=spec, weight_decay=o.weight_decay, mode=o.lora_pro_mode)
    if name == "galore":
        targets = o.galore_targets if isinstance(o.galore_targets, str) else list(o.galore_targets)
        return lorajax.optim.galore(
            sched,
            targets=targets,
            rank=o.galore_rank,
            update_proj_gap=o.galore_gap,
            scale=o.galore_scale,
            optim_bits=o.galore_bits,
            weight_decay=o.weight_decay,
            exclude=list(cfg.spec.exclude) or None,
            params=full,
        )
    raise SystemExit(f"unknown optimiser {o.name!r}: {' | '.join(NAMES)}")


def extra_loss(cfg: RunConfig, adapters):
    """Terms an optimiser-side method adds to the task loss (SoRA's L1 on the gates), else 0."""
    if cfg.optim.name == "sora" and cfg.optim.sora_lambda:
        return lorajax.optim.gate_penalty(adapters, cfg.optim.sora_lambda)
    return 0.0
