"""Task "vqa": CDDM-style LoRA on a small VLM's vision encoder, projector and LM at once (SYNTHETIC scenes).

CDDM (Liu et al., ECCV 2024, arXiv 2503.06973; official script UnicomAI/UnicomBenchmark
``CDDMBench/Qwen-VL/finetune.py`` + ``finetune/finetune_lora_ds.sh``) fine-tunes Qwen-VL-Chat
with PEFT LoRA r=64, alpha=16 on the vision tower, its adapter and the language model at
the same time, one lr (1e-5) for all. This task replays that recipe at toy scale with
`lorajax.groups.Rules` (one ordered rule per group, per-group rank and lr multiplier).

Design (fixed before any result was seen):

* Data: `lorajax.data.scenes` (SYNTHETIC 32x32 shape scenes, one-word answers). Stage 1
  types `STAGE1_TYPES` (colour, shape); stage 2 types `STAGE2_TYPES` (count, exist), held
  out from stage 1: new questions and new answer words. Fixed data seeds (`DATA_SEEDS`):
  stage-1 train `N_PRETRAIN`, stage-2 train `N_TRAIN` (``--max-train`` caps it), validation
  `N_VAL` (for choosing the lr), test `N_TEST` (``--max-test`` caps it); the run's
  ``--seed`` changes the model init and the data order, not the data.
* Model: `lorajax.models.vlm` (ViT 2 layers -> 2-layer MLP projector -> Llama 2 layers, width
  `WIDTH`, patch 8: 17 image tokens before the 9 question tokens), answer = argmax of the
  logits at the last (``<ans>``) position.
* Stage 1 (``--model tiny``, the default's spelling ``minilm`` too): the whole VLM trained
  from scratch (AdamW, lr `PRETRAIN_LR`, warm-up + cosine, ``PRETRAIN_MULT · --steps`` steps,
  resumable in ``out_dir/pretrain``), saved in ``out_dir/base`` (``model.safetensors`` +
  ``vlm_config.json``); ``--model <folder>`` loads such a base instead (share one base across
  runs).
* Stage 2: LoRA (``--spec.rank``, ``--spec.alpha``; the config uses CDDM's r=64, alpha=16, which
  at width 64 is full rank: the arms compare *where* adapters go, not low-rank capacity) on
  every linear layer of the groups named by ``--spec.targets``: ``vision`` (the ViT's q, k, v,
  attention output, MLP; CDDM's rule list missed the ViT MLP's second layer, see the spec),
  ``projector``, ``lm`` (the decoder layers' q/k/v/o and MLP; embeddings and lm_head frozen,
  as CDDM's chat-model setting). An entry ``group:mult`` sets that group's lr multiplier
  (`lorajax.groups.grouped_tx`). Arms: ``cddm`` = ``vision projector lm``, ``lm_only`` =
  ``lm``; ``frozen`` = the stage-1 model untrained, evaluated in every run
  (``results.json`` ``frozen_*``). Optimiser: AdamW (b2 0.95 and decoupled weight decay
  ``--optim.weight-decay``, as CDDM), ``--optim.lr`` peak, linear warm-up ``--optim.warmup``
  then cosine to 0. CDDM's lr 1e-5 barely moves a few hundred steps here; the lr is chosen
  on the validation split (``experiments/vqa_scenes.py``), never the test split.
* Metric: exact-match answer accuracy on the test split (and per question type), and on
  the stage-1 types' test split (what stage 2 costs the old questions).

Bad input: images of the wrong size or channels (`lorajax.models.vlm.check_inputs`), a word
the tokenizer does not know (`lorajax.data.scenes.WordTokenizer`), a rule matching nothing
(`lorajax.groups.Rules.apply`, strict): ValueError naming the problem.

Artefacts in ``out_dir``: ``run_config.json``, ``pretrain/``, ``base/``, ``lora/``
(checkpoints, metrics), ``results.md``, ``results.json``, ``loss.png``. A re-run of a
finished run trains nothing: it restores the final checkpoints and re-evaluates.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from safetensors.numpy import load_file, save_file

import lorajax
from experiments import run_identity
from experiments.config import RunConfig
from experiments.report import format_ms, loss_curve, loss_plot, markdown_table, step_time_ms, write_results
from experiments.validate import ConfigError
from lorajax import atomic
from lorajax.data import scenes
from lorajax.groups import Rule, Rules, grouped_tx
from lorajax.models import vlm

#: question types of stage 1 (pre-training) and stage 2 (fine-tuning, held out from stage 1)
STAGE1_TYPES = ("colour", "shape")
STAGE2_TYPES = ("count", "exist")
#: examples per split (fixed; --max-train / --max-test cap the stage-2 ones)
N_PRETRAIN, N_TRAIN, N_VAL, N_TEST = 8000, 2000, 500, 1000
#: data seeds per split (independent of --seed)
DATA_SEEDS = {"pretrain": 1000, "train": 1001, "val": 1002, "test": 1003, "pretrain_test": 1004}
#: model width (both towers), stage-1 learning rate and length (x --steps)
WIDTH, PRETRAIN_LR, PRETRAIN_MULT = 64, 3e-3, 8
#: --model names of the built-in base pre-trained in out_dir/base (minilm: the launcher default's spelling)
BUILTIN = ("tiny", "minilm")
#: --spec.variant values: the adapters CDDM trains (LoRA; its r, alpha and targets come from --spec)
VARIANTS = ("lora",)
#: the groups --spec.targets names -> the regex of their adapted modules (lorajax.selection grammar)
GROUPS = {"vision": r"vision\.encoder\..*", "projector": r"projector\..*", "lm": r"lm\.model\.layers\..*"}
VLM_CONFIG, WEIGHTS = "vlm_config.json", "model.safetensors"
EVAL_BATCH = 250


def parse_groups(targets: Any) -> dict[str, float]:
    """``--spec.targets`` entries ``group`` or ``group:mult`` -> ``{group: lr_mult}`` (ConfigError if bad)."""
    items = [targets] if isinstance(targets, str) else list(targets)
    out: dict[str, float] = {}
    for item in items:
        group, _, mult = str(item).partition(":")
        if group not in GROUPS:
            raise ConfigError(
                f"--spec.targets entries must be groups of {list(GROUPS)} (optionally group:lr_mult), got {item!r}"
            )
        if group in out:
            raise ConfigError(f"--spec.targets names group {group!r} twice")
        try:
            value = float(mult) if mult else 1.0
        except ValueError:
            raise ConfigError(f"--spec.targets {item!r}: the lr multiplier must be a number") from None
        if not (0 <= value < math.inf):
            raise ConfigError(f"--spec.targets {item!r}: the lr multiplier must be finite and >= 0")
        out[group] = value
    return out


def check_config(cfg: RunConfig) -> None:
    """The vqa task's fields (nothing is loaded). Raises `ConfigError` naming the flag."""
    if cfg.spec.variant not in VARIANTS:
        raise ConfigError(f"--task vqa trains LoRA (CDDM's recipe): --spec.variant lora, got {cfg.spec.variant!r}")
    parse_groups(cfg.spec.targets)
    if cfg.spec.exclude:
        raise ConfigError("--spec.exclude is not used by --task vqa (--spec.targets names whole groups)")
    if cfg.optim.name != "adamw":
        raise ConfigError(f"--task vqa uses adamw (CDDM's optimiser), got --optim.name {cfg.optim.name!r}")
    if cfg.mesh or cfg.distributed:
        raise ConfigError("--task vqa runs on one device: leave --mesh and --distributed out")
    if cfg.remat != "none" or cfg.compute_dtype != "float32":
        raise ConfigError("--task vqa computes in float32 without remat: leave --remat and --compute-dtype out")
    if cfg.data:
        raise ConfigError("--task vqa renders its SYNTHETIC data itself: leave --data out")
    if cfg.model not in BUILTIN and not (Path(cfg.model) / VLM_CONFIG).is_file():
        raise ConfigError(
            f"--model must be one of {' | '.join(BUILTIN)} or a folder with {VLM_CONFIG} (an earlier vqa run's "
            f"out_dir/base), got {cfg.model!r}"
        )


def rules(cfg: RunConfig) -> Rules:
    """One LoRA rule per group of ``--spec.targets``, in the order given."""
    mults = parse_groups(cfg.spec.targets)
    s = cfg.spec
    return Rules(
        [Rule(GROUPS[g], g, rank=s.rank, alpha=s.alpha, lr_mult=m, **s.option_values()) for g, m in mults.items()]
    )


# ----------------------------------------------------------------------------- data and model


def split(name: str, types: tuple, n: int) -> dict:
    return scenes.make(n, DATA_SEEDS[name], types)


def batches(data: dict, batch: int, seed: int) -> Callable[[int], dict]:
    """``step -> {"images", "questions", "answers"}``, rows drawn with replacement, deterministic in ``step``."""
    n = len(data["answers"])

    def fn(step: int) -> dict:
        idx = np.random.default_rng((seed, step)).integers(0, n, batch)
        return {k: jnp.asarray(data[k][idx]) for k in ("images", "questions", "answers")}

    return fn


def model_kwargs() -> dict:
    return dict(vocab_size=scenes.TOKENIZER.vocab_size, image_size=32, patch_size=8, width=WIDTH, layers=2, heads=4)


def save_base(folder: Path, kwargs: dict, params: dict) -> None:
    """``model.safetensors`` (dotted param paths) and ``vlm_config.json`` (`vlm.tiny_config` arguments)."""
    folder.mkdir(parents=True, exist_ok=True)
    flat = {".".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}
    tmp = folder / (WEIGHTS + ".tmp")
    save_file(flat, str(tmp))
    tmp.replace(folder / WEIGHTS)
    atomic.write_text(folder / VLM_CONFIG, json.dumps(kwargs, indent=2, sort_keys=True) + "\n")


def load_base(folder: Path) -> tuple[vlm.Config, dict] | None:
    """``(config, params)`` of a complete base folder, else None."""
    if not (folder / VLM_CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        return None
    kwargs = json.loads((folder / VLM_CONFIG).read_text(encoding="utf-8"))
    flat = load_file(str(folder / WEIGHTS))
    params = traverse_util.unflatten_dict({tuple(k.split(".")): jnp.asarray(v) for k, v in flat.items()})
    return vlm.tiny_config(**kwargs), params


def ce(logits_BxV, answers_B):
    return optax.softmax_cross_entropy_with_integer_labels(logits_BxV, answers_B).mean()


def pretrain(cfg: RunConfig, out: Path, model: vlm.VLM, params: dict, data: dict) -> dict:
    """Stage 1: every weight, ``PRETRAIN_MULT · steps`` steps, resumable in ``out/pretrain``."""
    steps = PRETRAIN_MULT * cfg.steps

    def loss(_, p, b):
        return ce(model.apply({"params": p}, b["images"], b["questions"]), b["answers"])

    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, PRETRAIN_LR, min(100, steps // 10 + 1), steps))
    state, _ = lorajax.train.fit(
        loss,
        tx,
        None,
        lorajax.train.TrainState.create(tx, params),
        batches(data, cfg.batch_size, cfg.seed + 7),
        steps,
        out_dir=str(out / "pretrain"),
        **cfg.fit_options(),
        desc="stage 1: whole VLM on colour/shape questions",
    )
    return state.trainable


def load_model(cfg: RunConfig, out: Path) -> tuple[vlm.VLM, dict, str]:
    """``(model, base params, base name)``: ``--model`` folder, or the built-in base (pre-trained if needed)."""
    if cfg.model not in BUILTIN:
        loaded = load_base(Path(cfg.model))
        if loaded is None:
            raise FileNotFoundError(f"--model {cfg.model}: no {WEIGHTS} beside {VLM_CONFIG}")
        run_identity.record(cfg)
        return vlm.VLM(loaded[0], attention=cfg.attention), loaded[1], str(cfg.model)
    run_identity.record(cfg)
    base_dir = out / "base"
    loaded = load_base(base_dir)
    if loaded is not None:
        return vlm.VLM(loaded[0], attention=cfg.attention), loaded[1], str(base_dir)
    kwargs = model_kwargs()
    model = vlm.VLM(vlm.tiny_config(**kwargs), attention=cfg.attention)
    data = split("pretrain", STAGE1_TYPES, N_PRETRAIN)
    params = jax.jit(model.init)(jax.random.key(cfg.seed), data["images"][:1], data["questions"][:1])["params"]
    params = pretrain(cfg, out, model, params, data)
    save_base(base_dir, kwargs, params)
    return model, params, str(base_dir)


def accuracy(predict: Callable, data: dict) -> dict[str, float]:
    """Exact-match accuracy overall and per question type: ``{"acc", "acc/<type>"}``."""
    preds = np.concatenate(
        [
            np.asarray(predict(jnp.asarray(data["images"][i : i + EVAL_BATCH]), data["questions"][i : i + EVAL_BATCH]))
            for i in range(0, len(data["answers"]), EVAL_BATCH)
        ]
    )
    hit = preds == data["answers"]
    out = {"acc": float(hit.mean())}
    types = np.asarray(data["types"])
    for t in sorted(set(data["types"])):
        out[f"acc/{t}"] = float(hit[types == t].mean())
    return out


# ----------------------------------------------------------------------------- the run


def run(cfg: RunConfig) -> dict:
    """Stage 1 (or load it), stage 2 LoRA on the chosen groups; the results dict (see the module doc)."""
    out = Path(cfg.out_dir)
    model, base, base_name = load_model(cfg, out)
    n_train = min(N_TRAIN, cfg.max_train or N_TRAIN)
    n_test = min(N_TEST, cfg.max_test or N_TEST)
    train = split("train", STAGE2_TYPES, n_train)
    val = split("val", STAGE2_TYPES, N_VAL)
    test = split("test", STAGE2_TYPES, n_test)
    old_test = split("pretrain_test", STAGE1_TYPES, n_test)
    vlm.check_inputs(model.cfg, train["images"][:1], train["questions"][:1])  # a loaded base of another size
    variables = {"params": base}

    def base_predict_fn(x, q):
        logits: Any = model.apply(variables, x, q)
        return jnp.argmax(logits, -1)

    base_predict = jax.jit(base_predict_fn)
    frozen = {"test": accuracy(base_predict, test), "val": accuracy(base_predict, val)}
    frozen["stage1_test"] = accuracy(base_predict, old_test)

    r = rules(cfg)
    grouping = r.apply(variables, jax.random.key(cfg.seed + 1), strict=True)
    spec = grouping.spec
    assert spec is not None  # every vqa rule is a LoRA rule
    trainable = grouping.trainable["lora"]
    labels = grouping.labels["lora"]
    o = cfg.optim

    def make_tx(lr: float) -> optax.GradientTransformation:
        sched = optax.warmup_cosine_decay_schedule(0.0, lr, min(o.warmup, cfg.steps - 1), max(cfg.steps, 1))
        return optax.adamw(sched, b2=0.95, weight_decay=o.weight_decay)

    tx = grouped_tx(labels, make_tx, o.lr, r.mults())
    fwd = lorajax.adapt(model.apply, spec, mode="factored")

    def loss(v, a, b):
        return ce(fwd(v, a, b["images"], b["questions"]), b["answers"])

    predict = jax.jit(lambda a, x, q: fwd(variables, a, x, q).argmax(-1))
    train_dir = out / "lora"
    state, hist = lorajax.train.fit(
        loss,
        tx,
        variables,
        lorajax.train.TrainState.create(tx, trainable),
        batches(train, cfg.batch_size, cfg.seed + 2),
        cfg.steps,
        out_dir=str(train_dir),
        **cfg.fit_options(),
        eval_fn=lambda st: {"val_acc": accuracy(lambda x, q: predict(st.combined, x, q), val)["acc"]},
        eval_every=cfg.eval_every,
        desc=f"stage 2: LoRA on {'+'.join(r.mults())}",
    )
    adapters = state.combined
    after = {
        "test": accuracy(lambda x, q: predict(adapters, x, q), test),
        "val": accuracy(lambda x, q: predict(adapters, x, q), val),
        "stage1_test": accuracy(lambda x, q: predict(adapters, x, q), old_test),
    }
    step_ms = step_time_ms(hist, train_dir)
    counts = grouping.report.counts
    groups = "+".join(r.mults())
    rows = [
        [
            name,
            f"{res['val']['acc']:.3f}",
            f"{res['test']['acc']:.3f}",
            " / ".join(f"{res['test'][f'acc/{t}']:.3f}" for t in STAGE2_TYPES),
            f"{res['stage1_test']['acc']:.3f}",
        ]
        for name, res in (("frozen (stage-1 model)", frozen), (f"LoRA on {groups}", after))
    ]
    table = markdown_table(["model", "val acc", "test acc", " / ".join(STAGE2_TYPES), "stage-1 types test acc"], rows)
    table += "\n\n" + grouping.report.table()
    table += "\n\n" + markdown_table(["trainable", "step time"], [[f"{sum(counts.values()):,}", format_ms(step_ms)]])
    curve = loss_curve(train_dir)
    if curve:
        loss_plot({f"LoRA on {groups}": curve}, out / "loss.png", title="vqa task (SYNTHETIC scenes)")
    text = (
        f"# VQA on SYNTHETIC shape scenes (lorajax.data.scenes)\n\nBase: {base_name}. Stage 2: LoRA r={cfg.spec.rank}, "
        f"alpha={cfg.spec.alpha} on {groups} (lr mults {r.mults()}), AdamW lr {o.lr}, {cfg.steps} steps x "
        f"{cfg.batch_size}, on {n_train} {'/'.join(STAGE2_TYPES)} questions; exact-match accuracy on {N_VAL} "
        f"validation and {n_test} test questions (and {n_test} stage-1-type test questions).\n\n{table}\n"
    )
    results = {
        "model": base_name,
        "groups": r.mults(),
        "rank": cfg.spec.rank,
        "alpha": cfg.spec.alpha,
        "lr": o.lr,
        "steps": cfg.steps,
        "seed": cfg.seed,
        "val_acc": after["val"]["acc"],
        "test_acc": after["test"]["acc"],
        "frozen_val_acc": frozen["val"]["acc"],
        "frozen_test_acc": frozen["test"]["acc"],
        "after": after,
        "frozen": frozen,
        "trainable": counts,
        "matched": grouping.report.matched,
        "step_ms": step_ms,
    }
    write_results(out, text, {**results, "final_loss": curve[-1][1] if curve else None})
    return {**results, "loss_curve": curve, "table": table, "out_dir": str(out)}
