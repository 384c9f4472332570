"""The protein-tags result over seeds: ``python -m experiments.protein_tags [--seeds 0 1 2]``.

Runs the launcher with ``experiments/configs/protein_tags.py`` once per seed (each
in ``experiments/runs/protein_tags/seed<k>``, resumable) and writes
``experiments/results/protein_tags.{md,json,png}``: per arm (base, lora, full) the
oracle tag accuracy, perplexity, valid and motif rates, FLOPs and wall time per
generated sequence, each seed's value and the mean with its 95% t-interval over
seeds (`experiments.stats`), and the paired per-seed contrasts lora - base and
lora - full (every arm of a seed shares the base, the data and the held-out set).
The sequences are SYNTHETIC (`lorajax.data.proteins`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from experiments import run as launcher
from experiments.report import markdown_table, strict_json
from experiments.stats import t_interval
from lorajax import atomic

CONFIG = "experiments/configs/protein_tags.py"
RUNS = Path("experiments/runs/protein_tags")
RESULTS = Path("experiments/results")
#: (key in an arm's results, column title, format of one value)
METRICS = (
    ("tag_accuracy", "tag accuracy", "{:.3f}"),
    ("perplexity", "perplexity/letter", "{:.3f}"),
    ("valid_rate", "valid (letters, then >)", "{:.3f}"),
    ("motif_rate", "motif of the tag", "{:.3f}"),
    ("mean_length", "mean length", "{:.1f}"),
)


def ci_text(values, fmt: str) -> str:
    """``mean [low, high]`` (95% t-interval over seeds), or the single value labelled as such."""
    ci = t_interval(values)
    if ci.n < 2:
        return fmt.format(ci.mean) + " (single observation)"
    return f"{fmt.format(ci.mean)} [{fmt.format(ci.low)}, {fmt.format(ci.high)}]"


def summarise(per_seed: dict[int, dict], wall_s: float) -> tuple[str, dict]:
    """The markdown report and the JSON record of the per-seed launcher results."""
    seeds = sorted(per_seed)
    arms = list(per_seed[seeds[0]]["arms"])
    rows: list[list[str]] = []
    record: dict[str, Any] = {"seeds": seeds, "wall_s": wall_s, "arms": {}, "contrasts": {}}
    for arm in arms:
        vals = {k: [per_seed[s]["arms"][arm][k] for s in seeds] for k, _, _ in METRICS}
        row = [arm] + [ci_text(vals[k], fmt) for k, _, fmt in METRICS]
        row.append(" / ".join(f"{v:.3f}" for v in vals["tag_accuracy"]))
        a0 = per_seed[seeds[0]]["arms"][arm]
        ms = [1e3 * per_seed[s]["arms"][arm]["seconds_per_sequence"] for s in seeds]
        cpu_ms = [1e3 * per_seed[s]["arms"][arm]["cpu_seconds_per_sequence"] for s in seeds]
        row += [f"{a0['trainable']:,} ({a0['trainable_percent']:.1f}%)", f"{a0['flops_per_sequence'] / 1e6:.2f}"]
        row += [ci_text(ms, "{:.2f}"), ci_text(cpu_ms, "{:.2f}")]
        rows.append(row)
        record["arms"][arm] = {
            **vals,
            "ms_per_sequence": ms,
            "cpu_ms_per_sequence": cpu_ms,
            "trainable": a0["trainable"],
            "flops_per_sequence": a0["flops_per_sequence"],
        }
    header = ["arm"] + [t for _, t, _ in METRICS] + ["tag accuracy per seed", "trainable", "MFLOP/seq"]
    header += ["ms/seq (wall)", "ms/seq (CPU)"]
    table = markdown_table(header, rows)
    contrasts = []
    for a, b in (("lora", "base"), ("lora", "full")):
        if a in arms and b in arms:
            diff = [per_seed[s]["arms"][a]["tag_accuracy"] - per_seed[s]["arms"][b]["tag_accuracy"] for s in seeds]
            record["contrasts"][f"{a}-{b}"] = diff
            contrasts.append(
                f"* tag accuracy {a} - {b}: {ci_text(diff, '{:+.3f}')} (paired over seeds: "
                + ", ".join(f"{d:+.3f}" for d in diff)
                + ")"
            )
    oracle = per_seed[seeds[0]]["oracle"]
    text = (
        "# Tag-conditioned protein generation on SYNTHETIC sequences (K=4 Markov-chain classes + motifs)\n\n"
        "Offline stand-in for Shah & Jayaratnam, arXiv:2411.05966 (the spec's design; no protein corpus is "
        "shipped by a package here, and only a known generative model gives an exact oracle). Stage 1: a "
        f"{per_seed[seeds[0]]['base_params']:,}-parameter Llama (2 layers, d=64) pre-trained 300 Adam steps on "
        "untagged sequences; stage 2 (300 steps, batch 32) on `<bos> [Gen] P<c> Seq=< ... >`: LoRA r=8, alpha=16, "
        "all-linear (Adam lr 3e-3) or every weight (lr 1e-3). Each arm samples 64 sequences per tag at "
        "temperature 1 from the same tagged prompt; the exact oracle (Bayes classifier of the true model) "
        "names each one's class. Perplexity per letter on 256 held-out tagged sequences (the true model's own: "
        f"{oracle['perplexity']:.3f}). Values: mean [95% t-interval] over seeds {seeds}.\n\n"
        f"{table}\n\n" + "\n".join(contrasts) + "\n\n"
        "MFLOP/seq: 2·M·N·K of every matrix product in the lowered prefill (4 prompt tokens) and decode-step "
        "programs, 48 decode steps counted (each attends over all 53 cache slots; LoRA's factored x·A·B "
        "included: +17% here; merged into the weights, LoRA costs the base's FLOPs). ms/seq: wall time and "
        "process CPU time (all threads) of one batch of 256 sequences after a "
        "compile run, on this 2-core machine shared with other jobs (rough numbers; the CPU time is the less "
        "disturbed by the other jobs). No energy figure: power was not measured. The trainable "
        "share is large here (a 96k-parameter base, d=64); at the paper's scale LoRA r=128 all-linear is 4.18% "
        "of Llama-3-8B (tests/test_protein_counts.py).\n\n"
        f"Command: `python -m experiments.protein_tags` ({wall_s:.0f} s wall, seeds one after another, "
        "with `nice -n 10` beside other jobs)\n"
    )
    return text, record


def plot(record: dict, path: Path) -> None:
    """Tag accuracy per arm: each seed as a dot, the mean with its 95% interval as an error bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    for i, (arm, vals) in enumerate(record["arms"].items()):
        acc = vals["tag_accuracy"]
        ci = t_interval(acc)
        err = [[ci.mean - ci.low], [ci.high - ci.mean]] if ci.n > 1 else None
        ax.errorbar([i], [ci.mean], yerr=err, fmt="o", color="k", capsize=6)
        ax.scatter(np.full(len(acc), i) + 0.12, acc, s=14, alpha=0.6)
    ax.axhline(0.25, ls="--", color="grey", lw=1, label="chance (1/K)")
    ax.set_xticks(range(len(record["arms"])), list(record["arms"]))
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("oracle tag accuracy")
    ax.set_title("tag-conditioned generation (synthetic proteins)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--runs", default=str(RUNS))
    ap.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    per_seed = {}
    for s in args.seeds:
        argv_s = ["--config", CONFIG, "--seed", str(s), "--out-dir", f"{args.runs}/seed{s}", "--no-progress"]
        per_seed[s] = launcher.main(argv_s)
    wall = time.perf_counter() - t0
    text, record = summarise(per_seed, wall)
    out = Path(args.results)
    atomic.write_text(out / "protein_tags.md", text)
    atomic.write_text(out / "protein_tags.json", json.dumps(strict_json(record), indent=2) + "\n")
    plot(record, out / "protein_tags.png")
    print(text, flush=True)
    return record


if __name__ == "__main__":
    main()
