"""LoRAPrune vs magnitude pruning vs LoRA on the lm task: prune a character Llama while its LoRA trains.

`lorajax.loraprune` (M. Zhang et al., "LoRAPrune: Structured Pruning Meets Low-Rank Parameter-Efficient
Fine-Tuning", Findings of ACL 2024, arXiv:2305.18403; official code ``aim-uofa/LoRAPrune``,
``loraprune/utils.py`` for the importance, moving average, schedule and masks, ``loraprune/trainer.py`` for
the order of the step; lorajax spec ``adapters.md`` §13a) on the data of `experiments.loram_lm`.

Base: the lm task's small pre-trained character Llama (`experiments.tasks.lm.load_model`), by default
the effects harness's shared base (``experiments/runs/effects/_base/base``, committed; 2 layers, 344 MLP
neurons, 4 query / 2 kv heads). Every arm trains the SAME LoRA as loram_lm's LoRA arm (r=8, alpha=16,
every linear layer, AdamW lr 3e-3 with 20 warm-up steps and cosine decay, ``--steps`` steps of
``--batch-size`` windows of ``--max-length`` characters from the training comedies, the same batch stream
and adapter init per seed): the numbers are comparable with ``experiments/results/loram_lm.md``, and the
``lora`` arm here repeats its LoRA rows. Arms, per seed:

* ``lora``: LoRA on the full base (`experiments.tasks.lm.train_adapters`), the reference;
* ``loraprune``: the same LoRA trained with `lorajax.loraprune.make_step` on the full base: masked
  forward, importance ``|Ĝ ⊙ (W + s·A B)|`` from the adapters' gradients, moving average, and every
  ``--prune-freq`` steps the lowest-scoring ``int(n·r)`` of each layer's ``n = 344`` neurons and ``n = 2``
  kv heads (each with its 2 query heads) masked, ``r`` the cubic schedule (warm-up and cool-down 10% of
  the steps) up to ``--ratio``. ``exclude_layers=()`` (the official never prunes the first ``int(0.1·L)``
  layers and the last one): every layer keeps the same counts, so `loraprune.to_keep` gives one pruned
  `llama.Config` and the masked model is physically pruned (`loram.prune`, `loram.prune_adapters`) and
  evaluated as the small model + its cut LoRA. The masked full model is evaluated too, as a check that it
  computes the same losses;
* ``magnitude``: the base pruned once before training by weight magnitude (`loram.select`) to the same
  counts, LoRA trained on the pruned model. LoRAPrune's paper compares against LLM-Pruner; magnitude
  pruning stands in for it here.

Schedule window: the official (``strict``) updates the masks only while ``0 < r < ratio``, so it ends just
below the target (``--steps 300``: 171 of 344 neurons) and, with ``int(2·r) = 0`` for every
``r < 0.5``, never prunes a kv head of this 2-kv-head base. The default here therefore also updates when
the schedule has reached ``--ratio`` (``strict=False``: 172 neurons, 1 kv head pruned per layer, the pruned
config of loram_lm's LoRAM arm); ``--strict`` runs the official window. The magnitude arm always prunes
the counts the schedule reaches (computed on the host from `loraprune.schedule_sparsity_ratio` before
training, checked against the final masks), so both pruned arms have the same parameter count.

Training loop: `lorajax.train.fit` builds its own step from ``(loss_fn, tx)`` (`make_lora_step`,
``(params, state, batch) -> (state, metrics)``); LoRAPrune's step also threads a `loraprune.PruneState`
(the scores' moving average and the masks), which is not part of a `TrainState` and is updated from the
gradients, so it cannot go into ``fit``. `train_loraprune` is the small loop around the (jitted)
``make_step``: the same batches ``batch_fn(step)``, checkpoints of ``(TrainState, PruneState)`` with
`lorajax.train.checkpoint.Checkpointer` every ``--ckpt-every`` steps and at the end (a re-run resumes from
the newest one), a stop with a one-line error on a non-finite loss or gradient.

Reported per seed and arm: test loss on the unseen comedies (nats/token = nats/char with the char
tokenizer) and validation loss (the held-out end of the training comedies); means with 95% t-intervals
over seeds (`experiments.stats.t_interval`) and the paired contrasts loraprune − magnitude and
loraprune − lora; the parameter counts of the full and pruned models, trainable adapter parameters and
optimiser-state bytes, the sparsity the schedule reached, step times.

Command: ``python -m experiments.loraprune_lm [--steps N] [--seeds 0 1 2] [--ratio 0.5]`` (defaults: loram_lm's
sizes). ``--smoke``: a random-init base (``--model scratch``), 12 steps pruned every step, one seed, tiny
windows (tests). Writes ``--results`` (default ``experiments/results/loraprune_lm.md``) and the ``.json``
beside it; checkpoints and each seed's ``keep.json`` go to ``--out-dir`` (resumable; a re-run with other
settings there is refused).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

import lorajax
from experiments.loram_lm import array_bytes, evaluators, lm_parser, lora_arm, parse_lm, start, train_arm, write
from experiments.optimizers import make_tx
from experiments.report import format_ms, main_process, markdown_table, step_time_ms
from experiments.run import run_main
from experiments.stats import t_interval
from experiments.tasks.lm import lm_loss
from lorajax import loram, loraprune
from lorajax.models import llama
from lorajax.train.checkpoint import Checkpointer

#: settings a run folder is bound to (another value there is refused: its checkpoints belong to these)
IDENTITY = (
    "model",
    "steps",
    "batch_size",
    "max_length",
    "max_test",
    "max_val",
    "lr",
    "rank",
    "alpha",
    "ratio",
    "prune_freq",
    "strict",
    "data",
)
ARGS_FILE = "loraprune_args.json"
SMOKE = {
    "model": "scratch",
    "steps": 12,
    "seeds": [0],
    "batch_size": 2,
    "max_length": 16,
    "max_test": 4,
    "max_val": 4,
    "prune_freq": 1,
}
#: the arms, in report order, with their labels
ARMS = {
    "lora": "LoRA (full base)",
    "loraprune": "LoRAPrune (pruned while training) + its LoRA",
    "magnitude": "magnitude-pruned base + LoRA",
}
#: the paired contrasts ``(a, b)``: a − b per seed
CONTRASTS = (("loraprune", "magnitude"), ("loraprune", "lora"))
#: the schedule's warm-up and cool-down fractions and start ratio (make_step's defaults, the official's)
WARMUP, COOLDOWN, INIT_RATIO = 0.1, 0.1, 0.0
LOG_EVERY = 10  # steps per loss-curve point of the loraprune loop


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = lm_parser("python -m experiments.loraprune_lm", __doc__.split("\n")[0], "LoRA steps per arm")
    ap.add_argument("--ratio", type=float, default=0.5, help="target fraction of MLP neurons and kv heads pruned")
    ap.add_argument("--prune-freq", type=int, default=10, help="steps between LoRAPrune's mask updates")
    ap.add_argument(
        "--strict",
        action="store_true",
        help="the official window: masks updated only while the schedule is below --ratio (ends just below it)",
    )
    return parse_lm(
        ap,
        argv,
        name="loraprune_lm",
        out_help="checkpoints, keep.json",
        smoke=SMOKE,
        positive=("prune_freq",),
        ratios=("ratio",),
    )


# ----------------------------------------------------------------------------- the schedule's end point


def final_pruning(cfg: Any, steps: int, ratio: float, prune_freq: int, strict: bool) -> dict:
    """What `loraprune.make_step`'s masks end at after ``steps`` steps (its documented window rule, on the host).

    The last mask update is the last step ``t < steps`` with ``t % prune_freq == 0`` and
    ``init_ratio < r_t`` (and ``r_t < ratio`` when ``strict``), ``r_t`` the scheduled sparsity; it masks
    ``int(n·r_t)`` of each layer's ``n`` units. Returns ``{"step", "scheduled", "mlp", "kv_heads"}``: that
    step (None: no update), its ``r_t`` (0.0 without one) and the units pruned per layer of each kind.
    """
    last, r_last = None, 0.0
    for t in range(steps):
        r = loraprune.schedule_sparsity_ratio(t, steps, WARMUP, COOLDOWN, INIT_RATIO, ratio)
        if t % prune_freq == 0 and INIT_RATIO < r and (r < ratio or not strict):
            last, r_last = t, r
    return {
        "step": last,
        "scheduled": r_last,
        "mlp": int(cfg.intermediate_size * r_last),
        "kv_heads": int(cfg.num_key_value_heads * r_last),
    }


def pruned_counts(mask_tree: dict) -> dict[str, list[int]]:
    """``{"mlp": [L], "kv_heads": [L]}``: the units each layer's masks prune (False entries)."""
    return {kind: (~np.asarray(mask_tree[kind], bool)).sum(axis=1).tolist() for kind in ("mlp", "kv_heads")}


def param_count(params: Any) -> dict[str, int]:
    """``{"total", "layers"}``: parameters of a Llama's params, all and those of its decoder layers."""

    def size(tree: Any) -> int:
        return int(sum(x.size for x in jax.tree.leaves(tree)))

    return {"total": size(params), "layers": size(params["model"]["layers"])}


# ----------------------------------------------------------------------------- the LoRAPrune arm


def _check_restored(tree: dict, meta: dict, step: int) -> None:
    """A checkpoint of `train_loraprune` is consistent: folder step, metadata step and ``state.step`` agree."""
    if meta.get("step") != step or int(tree["state"].step) != step:
        raise ValueError(f"its metadata step {meta.get('step')!r} / state.step {int(tree['state'].step)} != {step}")


def train_loraprune(cfg, args, model, variables: dict, spec, batches, folder: Path, desc: str) -> tuple:
    """LoRA trained ``cfg.steps`` steps with `loraprune.make_step` on the full base (resumable in ``folder``).

    Returns ``(adapters, prune, memory, curve)``: the full model's adapters, the final `PruneState`, the
    measured sizes as `train_arm`'s, and ``[{"step", "loss", "ratio"}]`` (mean loss over each
    `LOG_EVERY` steps, the scheduled sparsity of the period's last step).
    """
    # the same init as the lora arm's (`train_arm`: one compiled init, key seed + 1)
    adapters = jax.jit(lambda v: lorajax.init(spec, v, jax.random.key(cfg.seed + 1)))(variables)
    trainable, frozen = lorajax.partition(spec, adapters)
    tx = make_tx(cfg, cfg.optim.lr, spec=spec)
    fwd = lorajax.adapt(model.apply, spec, mode="factored")

    def loss_fn(v, a, batch):  # train_adapters' loss for plain LoRA (no sampling, no extra terms)
        return lm_loss(fwd(v, a, batch["tokens"][:, :-1]), batch["tokens"])

    step = loraprune.make_step(
        loss_fn,
        tx,
        model.cfg,
        spec,
        total_steps=cfg.steps,
        ratio=args.ratio,
        init_ratio=INIT_RATIO,
        warmup=WARMUP,
        cooldown=COOLDOWN,
        prune_freq=args.prune_freq,
        exclude_layers=(),
        strict=args.strict,
    )
    tree: dict[str, Any] = {
        "state": lorajax.train.TrainState.create(tx, trainable, frozen),
        "prune": loraprune.init_state(model.cfg),
    }
    ckpt = Checkpointer(folder / "checkpoints", keep=cfg.keep)
    curve: list[dict] = []
    if ckpt.all_steps():
        tree, meta = ckpt.restore(tree, check=_check_restored)
        curve = list(meta.get("curve", []))
    state, prune = tree["state"], tree["prune"]
    start = int(state.step)
    losses, flags, rates = [], [], []
    t_last, n_last = time.perf_counter(), start
    try:
        for t in tqdm(range(start, cfg.steps), desc=desc, initial=start, total=cfg.steps, disable=not cfg.progress):
            state, prune, metrics = step(variables, state, prune, batches(t))
            losses.append(metrics["loss"])
            flags.append(metrics["finite"])
            done = t + 1
            if not (done % LOG_EVERY == 0 or done % cfg.ckpt_every == 0 or done == cfg.steps):
                continue
            got, ok, ratio = jax.device_get((losses, flags, metrics["ratio"]))
            if not all(ok):
                first = done - len(ok) + ok.index(False) + 1
                raise FloatingPointError(
                    f"{desc}: step {first}'s loss or a gradient is not finite; lower --lr "
                    f"(the last checkpoint is in {ckpt.directory})"
                )
            now = time.perf_counter()
            rates.append({"steps_per_s": (done - n_last) / max(now - t_last, 1e-9)})
            curve.append({"step": done, "loss": float(np.mean(got)), "ratio": float(ratio)})
            losses, flags, t_last, n_last = [], [], now, done
            if done % cfg.ckpt_every == 0 or done == cfg.steps:
                ckpt.save(done, {"state": state, "prune": prune}, {"step": done, "curve": curve})
    finally:
        ckpt.close()
    memory = {
        "trainable": int(lorajax.count_params(spec, variables, state.combined)["trainable"]),
        "opt_state_bytes": lorajax.optim.state_bytes(tx, state.trainable),
        "base_bytes": array_bytes(variables["params"]),
        "step_ms": step_time_ms(rates, folder),
    }
    return state.combined, prune, memory, curve


# ----------------------------------------------------------------------------- the run


def run(args: argparse.Namespace) -> dict:
    out, cfg, model, params, ids, base_name, evaluate, spec = start(args, IDENTITY, ARGS_FILE, "LoRAPrune")
    variables = {"params": params}
    full_cfg = model.cfg

    # the counts LoRAPrune's schedule ends at; the magnitude arm prunes exactly these (ratio = count / n)
    target = final_pruning(full_cfg, args.steps, args.ratio, args.prune_freq, args.strict)
    keep_mag = loram.select(
        full_cfg,
        params,
        mlp_ratio=target["mlp"] / full_cfg.intermediate_size,
        head_ratio=target["kv_heads"] / full_cfg.num_key_value_heads,
    )
    small_cfg, small_params = loram.prune(full_cfg, params, keep_mag)
    small_model = llama.build(small_cfg)
    small_vars = {"params": small_params}
    if main_process():
        keep_mag.save(out / "magnitude_keep.json")

    full_eval, small_eval, bases = evaluators(model, small_model, variables, small_vars, spec, evaluate, "magnitude")
    small_base_loss = jax.jit(lambda v, b: lm_loss(small_model.apply(v, b[:, :-1]), b))  # LoRAPrune's pruned base

    rows = []
    for seed in args.seeds:
        cfg_s, batches, folder, full_ad, full_mem = lora_arm(cfg, args, ids, out, model, variables, spec, seed)
        lp_full_ad, prune, lp_mem, curve = train_loraprune(
            cfg_s, args, model, variables, spec, batches, folder / "loraprune", f"loraprune seed {seed}"
        )
        mag_ad, mag_mem = train_arm(
            cfg_s, small_model, small_vars, spec, folder / "magnitude", batches, f"magnitude (pruned) seed {seed}"
        )
        counts = pruned_counts(prune.masks)
        want = {kind: [target[kind]] * full_cfg.num_hidden_layers for kind in ("mlp", "kv_heads")}
        if counts != want:
            raise RuntimeError(f"LoRAPrune's masks prune {counts} units per layer, its schedule gives {want}")
        keep_lp = loraprune.to_keep(prune.masks)
        lp_cfg, lp_params = loram.prune(full_cfg, params, keep_lp)
        assert lp_cfg == small_cfg  # the same counts: one compiled evaluation serves both pruned arms
        lp_vars = {"params": lp_params}
        lp_ad = loram.prune_adapters(lp_full_ad, keep_lp, full_cfg)
        masked_vars = loraprune.apply_masks(variables, prune.masks)
        masked_ad = loraprune.mask_adapters(lp_full_ad, prune.masks)
        if main_process():
            keep_lp.save(folder / "loraprune" / "keep.json")
        lp_adapters = int(lorajax.count_params(spec, lp_vars, lp_ad)["trainable"])
        rows.append(
            {
                "seed": seed,
                "lora": {**evaluate(lambda b, a=full_ad: full_eval(variables, a, b)), **full_mem},
                "loraprune": {
                    **evaluate(lambda b, a=lp_ad: small_eval(lp_vars, a, b)),
                    **lp_mem,
                    "adapter_params_pruned": lp_adapters,
                    "masked_full_model": evaluate(lambda b, a=masked_ad: full_eval(masked_vars, a, b)),
                    "pruned_base": evaluate(lambda b: small_base_loss(lp_vars, b)),
                    "pruned_per_layer": counts,
                    "final_scheduled_ratio": curve[-1]["ratio"] if curve else None,
                    "curve": curve,
                    "keep": keep_lp.to_json(),
                },
                "magnitude": {**evaluate(lambda b, a=mag_ad: small_eval(small_vars, a, b)), **mag_mem},
            }
        )
        r = rows[-1]
        print(
            f"seed {seed}: test loss lora {r['lora']['test_loss']:.4f}, loraprune {r['loraprune']['test_loss']:.4f}, "
            f"magnitude {r['magnitude']['test_loss']:.4f}",
            flush=True,
        )
    summ = summary(rows)
    sizes = {"full": param_count(params), "pruned": param_count(small_params)}
    results = {
        "settings": {k: getattr(args, k) for k in IDENTITY} | {"seeds": list(args.seeds)},
        "base": base_name,
        "full_config": {
            "intermediate_size": full_cfg.intermediate_size,
            "num_key_value_heads": full_cfg.num_key_value_heads,
            "num_attention_heads": full_cfg.num_attention_heads,
        },
        "pruned_config": {
            "intermediate_size": small_cfg.intermediate_size,
            "num_key_value_heads": small_cfg.num_key_value_heads,
            "num_attention_heads": small_cfg.num_attention_heads,
        },
        "final_pruning": target,
        "param_counts": sizes,
        "base_losses": bases,
        "seeds": rows,
        "summary": summ,
        "magnitude_keep": keep_mag.to_json(),
    }
    write(Path(args.results), report(args, full_cfg, small_cfg, base_name, bases, rows, summ, target, sizes), results)
    return results


def _interval(values: list[float]) -> dict:
    ci = t_interval(values)
    return {"mean": ci.mean, "se": ci.se, "low": ci.low, "high": ci.high, "n": ci.n}


def summary(rows: list[dict]) -> dict:
    """Per arm and per contrast (paired by seed): mean test / val loss with its 95% t-interval over seeds."""
    out: dict[str, Any] = {}
    for arm in ARMS:
        out[arm] = {m: _interval([r[arm][m] for r in rows]) for m in ("test_loss", "val_loss")}
    for a, b in CONTRASTS:
        out[f"{a}_minus_{b}"] = {m: _interval([r[a][m] - r[b][m] for r in rows]) for m in ("test_loss", "val_loss")}
    return out


# ----------------------------------------------------------------------------- report


def _se(s: dict) -> str:
    return "n/a (1 seed)" if not np.isfinite(s["se"]) else f"{s['se']:.4f}"


def _ci(s: dict, sign: str = "") -> str:
    return "n/a (1 seed)" if not np.isfinite(s["se"]) else f"[{s['low']:{sign}.4f}, {s['high']:{sign}.4f}]"


def command(args: argparse.Namespace) -> str:
    """The command line that reproduces this report (the settings that differ from the defaults)."""
    if args.smoke:
        return "python -m experiments.loraprune_lm --smoke"
    defaults = vars(parse([]))
    flags = [f"--steps {args.steps}", f"--seeds {' '.join(map(str, args.seeds))}", f"--ratio {args.ratio:g}"]
    for k in IDENTITY:
        if k not in ("steps", "data", "ratio", "strict") and getattr(args, k) != defaults[k]:
            flags.append(f"--{k.replace('_', '-')} {getattr(args, k)}")
    if args.strict:
        flags.append("--strict")
    return "python -m experiments.loraprune_lm " + " ".join(flags)


def report(args, full_cfg, small_cfg, base_name: str, bases: dict, rows, summ, target, sizes) -> str:
    """The Markdown report."""
    per_seed = []
    for r in rows:
        for arm, label in ARMS.items():
            m = r[arm]
            adapters = m.get("adapter_params_pruned", m["trainable"])
            per_seed.append(
                [
                    str(r["seed"]),
                    label,
                    f"{m['test_loss']:.4f}",
                    f"{m['val_loss']:.4f}",
                    f"{m['trainable']:,}",
                    f"{adapters:,}",
                    f"{m['opt_state_bytes']:,}",
                    format_ms(m["step_ms"]),
                ]
            )
        lp = r["loraprune"]
        per_seed.append(
            [str(r["seed"]), "LoRAPrune's pruned base, no adapters", f"{lp['pruned_base']['test_loss']:.4f}"]
            + [f"{lp['pruned_base']['val_loss']:.4f}", "", "", "", ""]
        )
    table = markdown_table(
        [
            "seed",
            "arm",
            "test loss",
            "val loss",
            "trained adapter params",
            "adapter params at inference",
            "optimiser state (B)",
            "step",
        ],
        per_seed,
    )
    mean_rows = [
        [label, f"{summ[arm]['test_loss']['mean']:.4f}", _se(summ[arm]["test_loss"]), _ci(summ[arm]["test_loss"])]
        + [f"{summ[arm]['val_loss']['mean']:.4f}", _ci(summ[arm]["val_loss"])]
        for arm, label in ARMS.items()
    ]
    for a, b in CONTRASTS:
        d = summ[f"{a}_minus_{b}"]
        mean_rows.append(
            [f"{a} − {b} (paired)", f"{d['test_loss']['mean']:+.4f}", _se(d["test_loss"]), _ci(d["test_loss"], "+")]
            + [f"{d['val_loss']['mean']:+.4f}", _ci(d["val_loss"], "+")]
        )
    means = markdown_table(["arm", "mean test loss", "SE", "95% CI", "mean val loss", "95% CI (val)"], mean_rows)
    gap = max(abs(r["loraprune"]["masked_full_model"]["test_loss"] - r["loraprune"]["test_loss"]) for r in rows)
    n_mlp, n_kv = full_cfg.intermediate_size, full_cfg.num_key_value_heads
    if args.strict:
        window = "the official strict window 0 < r < ratio"
    else:
        official = final_pruning(full_cfg, args.steps, args.ratio, args.prune_freq, strict=True)
        window = (
            f"window 0 < r ≤ ratio, strict=False: the official strict window 0 < r < ratio would stop at "
            f"{official['mlp']} neurons and {official['kv_heads']} kv heads per layer"
        )
    last = "no update" if target["step"] is None else f"step {target['step']}, scheduled r = {target['scheduled']:.4f}"
    full, small = sizes["full"], sizes["pruned"]
    steps_word = "step" if args.prune_freq == 1 else "steps"
    setup = (
        f"Base: {base_name} ({full_cfg.num_hidden_layers} layers, hidden {full_cfg.hidden_size}, {n_mlp} MLP "
        f"neurons, {full_cfg.num_attention_heads} heads / {n_kv} kv heads). Every arm: LoRA r={args.rank}, "
        f"alpha={args.alpha:g}, all linear layers, AdamW lr {args.lr:g} (20 warm-up steps, cosine), {args.steps} "
        f"steps of {args.batch_size} x {args.max_length} characters from the training comedies: the LoRA arm of "
        f"`experiments/results/loram_lm.md` (same batches and init per seed). LoRAPrune (`lorajax.loraprune`, "
        f"arXiv:2305.18403) scores units from the adapters' gradients while the LoRA trains on the full base and "
        f"masks the lowest of every layer (exclude_layers=(), so that the masks prune physically) every "
        f"{args.prune_freq} {steps_word} up to the cubic schedule's ratio (target {args.ratio:g}, warm-up / "
        f"cool-down {WARMUP:g} of the steps, {window}); then the base and the LoRA are cut (`loram.prune`, "
        f"`loram.prune_adapters`) and the small model + its LoRA is evaluated. The magnitude arm prunes the same "
        f"counts once before training (`loram.select`, weight magnitude; the paper's baseline is LLM-Pruner) and "
        f"trains LoRA on the pruned model. Losses in nats/token (= nats/char: character tokens), test = unseen "
        f"comedies ({args.max_test} windows at most), val = held-out end of the training comedies."
    )
    sparsity = (
        f"Sparsity reached (last mask update {last}): {target['mlp']} of {n_mlp} neurons "
        f"({target['mlp'] / n_mlp:.1%}) and {target['kv_heads']} of {n_kv} kv heads per layer, in every seed; "
        f"pruned model {small_cfg.intermediate_size} neurons, {small_cfg.num_attention_heads} heads / "
        f"{small_cfg.num_key_value_heads} kv heads (both pruned arms). Parameters: full {full['total']:,} "
        f"({full['layers']:,} in the decoder layers), pruned {small['total']:,} ({small['layers']:,}: "
        f"{1 - small['layers'] / full['layers']:.1%} of the layers' parameters removed)."
    )
    bases_line = (
        f"Base without adapters: full {bases['full']['test_loss']:.4f}, magnitude-pruned "
        f"{bases['magnitude']['test_loss']:.4f} (test loss). Check: the masked full model + masked LoRA and the "
        f"physically pruned one differ by at most {gap:.2e} in test loss."
    )
    return (
        f"# LoRAPrune vs magnitude pruning vs LoRA on the lm task\n\n{setup}\n\n{sparsity}\n\n{bases_line}\n\n"
        f"{table}\n\n{means}\n\nCommand: `{command(args)}`.\n"
    )


def main(argv: list[str] | None = None) -> dict:
    """Parse and run; one-line errors (exit 2: bad input, exit 1: training failed), like the launcher."""
    return run_main(parse, run, argv)


if __name__ == "__main__":
    main()
