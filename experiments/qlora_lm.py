"""QLoRA on the lm task: the same LoRA on a float32, bf16, int8, int4 and NF4 frozen base.

QLoRA's claim (Dettmers et al., arXiv 2305.14314, §4–5): LoRA on a 4-bit NormalFloat base with double
quantisation matches 16-bit LoRA fine-tuning, at about a quarter of the base's memory. Here every arm is
an ordinary launcher run (`experiments.run.main`, ``--task lm --base-dtype D``) on the effects harness's
shared pre-trained character Llama: the base's linear kernels (all but the output head) are quantised
by `lorajax.quant` after the adapters are initialised; LoRA r=8, alpha 16 on every linear layer, AdamW,
the lr that the effects harness picked for LoRA at this budget (0.01, fixed before this run), the same
steps, data order and adapter init per seed in every arm.

Reported, per arm: held-out test loss on the unseen comedies (nats/char) after training, per seed and
mean with its 95% t-interval; its difference from the float32 arm, paired by seed; the quantised base's
own test loss before training; the base's measured bytes (the params tree's arrays, codes and scales
included) and bytes per parameter of the quantised kernels; the median step time and its ratio to the
float32 arm's (same machine, runs one after another, load average recorded: a CPU has no 4-bit matmul,
so the base is dequantised per layer inside each step and the quantised arms are expected to be slower
here — QLoRA's gain is memory, not CPU speed).

Command: ``python -m experiments.qlora_lm [--steps 200] [--seeds 0 1 2]``; ``--smoke`` runs a
random-init base, 3 steps, one seed (tests). Writes ``--results`` (default
``experiments/results/qlora.md``) and the ``.json`` beside it; runs go to ``--out-dir`` and resume.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from experiments import run as launcher
from experiments.loram_lm import lm_parser, parse_lm, write
from experiments.report import markdown_table
from experiments.run import run_main
from experiments.stats import t_interval

#: the arms: the launcher's --base-dtype values, float32 first (the reference)
ARMS = ("float32", "bf16", "int8", "int4", "nf4")
SMOKE = {"model": "scratch", "steps": 3, "seeds": [0], "batch_size": 2, "max_length": 16, "max_test": 4, "max_val": 4}


def parse(argv: list[str] | None):
    ap = lm_parser(
        "python -m experiments.qlora_lm",
        "LoRA on float32, bf16, int8, int4 and NF4 bases of the lm task's small Llama",
        "LoRA steps per arm",
    )
    ap.set_defaults(steps=200, lr=1e-2, batch_size=16, results="experiments/results/qlora.md")
    return parse_lm(ap, argv, name="qlora_lm", out_help="run folders (resumable)", smoke=SMOKE)


def arm_argv(args, arm: str, seed: int) -> list[str]:
    """The launcher command line of one arm and seed."""
    argv = [
        "--task", "lm", "--model", args.model, "--steps", str(args.steps), "--seed", str(seed),
        "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
        "--max-test", str(args.max_test), "--max-val", str(args.max_val),
        "--spec.rank", str(args.rank), "--spec.alpha", str(args.alpha), "--spec.targets", "all-linear",
        "--optim.name", "adamw", "--optim.lr", str(args.lr), "--optim.warmup", "10",
        "--base-dtype", arm, "--no-sample", "--no-export", "--ckpt-every", str(args.ckpt_every),
        "--out-dir", str(Path(args.out_dir) / arm / f"seed{seed}"),
    ]  # fmt: skip
    if args.data:
        argv += ["--data", args.data]
    if not args.progress:
        argv.append("--no-progress")
    return argv


def run_arms(args) -> dict[str, list[dict[str, Any]]]:
    """Every arm's launcher results per seed (a finished run is read back, not trained again)."""
    out: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
    for seed in args.seeds:
        for arm in ARMS:
            load = os.getloadavg()[0]
            res = launcher.main(arm_argv(args, arm, seed))
            base = res.get("quantized_base") or {}
            out[arm].append(
                {
                    "seed": seed,
                    "test_loss": res["test_loss"],
                    "val_loss": res["val_loss"],
                    "base_test_loss": base.get("test_loss", res["base_loss"]),
                    "base_bytes": base.get("bytes"),
                    "float32_bytes": base.get("float32_bytes"),
                    "step_ms": res["step_ms"],
                    "load": load,
                }
            )
    return out


def _ci(values: list[float]) -> str:
    ci = t_interval(values)
    return f"{ci.mean:.4f}" if ci.n < 2 else f"{ci.mean:.4f} [{ci.low:.4f}, {ci.high:.4f}]"


def report(args, runs: dict[str, list[dict[str, Any]]]) -> tuple[str, dict]:
    """The Markdown table and the JSON record of the arms."""
    ref = {r["seed"]: r for r in runs["float32"]}
    # the float base's bytes, recorded by the quantised arms (the float32 arm quantises nothing)
    f32 = next((r["float32_bytes"] for rs in runs.values() for r in rs if r["float32_bytes"]), None)
    rows, record = [], {}
    for arm in ARMS:
        rs = runs[arm]
        test = [r["test_loss"] for r in rs]
        diff = [r["test_loss"] - ref[r["seed"]]["test_loss"] for r in rs]
        steps = [r["step_ms"] for r in rs if r["step_ms"] is not None]
        ref_steps = [r["step_ms"] for r in runs["float32"] if r["step_ms"] is not None]
        ratio = float(np.median(steps) / np.median(ref_steps)) if steps and ref_steps else None
        nbytes = f32 if arm == "float32" else rs[0]["base_bytes"]
        record[arm] = {
            "per_seed": rs,
            "test_loss": test,
            "minus_float32": diff,
            "step_ratio": ratio,
            "base_bytes": nbytes,
        }
        rows.append(
            [
                arm,
                _ci(test),
                "—" if arm == "float32" else _ci(diff),
                " ".join(f"{r['test_loss']:.4f}" for r in rs),
                f"{np.mean([r['base_test_loss'] for r in rs]):.4f}",
                "—" if nbytes is None else f"{nbytes:,}" + (f" ({nbytes / f32:.3f}x)" if f32 else ""),
                "—" if not steps else f"{np.median(steps):.0f} ms" + (f" ({ratio:.2f}x)" if ratio else ""),
            ]
        )
    table = markdown_table(
        [
            "base",
            "test loss after LoRA, mean [95% CI]",
            "minus float32 (paired by seed)",
            "per seed",
            "base's own test loss",
            "base bytes (vs float32)",
            "median step (vs float32)",
        ],
        rows,
    )
    loads = [r["load"] for rs in runs.values() for r in rs]
    text = (
        "# QLoRA: LoRA on a quantised base (lm task)\n\n"
        f"Generated by `{'python -m experiments.qlora_lm --smoke' if args.smoke else 'python -m experiments.qlora_lm'}`"
        f" ({time.strftime('%Y-%m-%d')}). {__doc__.split(chr(10) + chr(10))[1]}\n\n"
        f"Setup: base `{args.model}`, {args.steps} steps, batch {args.batch_size} x {args.max_length} chars, lr "
        f"{args.lr}, LoRA r={args.rank} alpha={args.alpha}, seeds {args.seeds}, {args.max_test} test and "
        f"{args.max_val} validation windows; 1-min load average before the runs {min(loads):.1f}–{max(loads):.1f} "
        "on 2 cores (step-time ratios are taken from runs one after another, not interleaved).\n\n"
        f"{table}\n\n"
        "Bytes: the whole params tree (embeddings, norms and the float output head included; the quantised "
        "kernels are codes + scales, `lorajax.quant.base_bytes`). A difference whose CI includes 0 is not "
        "evidence of a difference; with "
        f"{len(args.seeds)} seed(s) a CI is {'not available' if len(args.seeds) < 2 else 'wide'}.\n"
    )
    return text, {"args": vars(args), "arms": record}


def run(args) -> dict:
    """Run (or read back) every arm and seed, write the results; the JSON record."""
    runs = run_arms(args)
    text, record = report(args, runs)
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    write(Path(args.results), text, record)  # the .md and the .json beside it (main process only)
    print(text, flush=True)
    return record


def main(argv: list[str] | None = None) -> dict:
    return run_main(parse, run, argv)


if __name__ == "__main__":
    main()
