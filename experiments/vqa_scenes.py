"""CDDM's recipe on SYNTHETIC scenes: LoRA on vision + projector + LM (``cddm``) vs LM only vs frozen.

Protocol (fixed before any result was seen):

1. One stage-1 base: the first run (``cddm``, seed 0) pre-trains the whole VLM on colour / shape
   questions (`experiments.tasks.vqa`); every other run loads it (``--model <that run>/base``), so
   all arms and seeds start from the same base and ``frozen`` (that base, untrained) is one
   deterministic number. Seeds change the LoRA init and the data order of stage 2 only.
2. lr per arm chosen on the **validation** split at seed 0 from `LR_GRID` (AdamW peak lr, one lr for
   every group as CDDM did; CDDM's 1e-5 is far below this grid: a few hundred steps at 1e-5 barely
   move a toy model), then seeds 1, 2 at that lr. Test accuracy is never used to choose. The grid was
   first (1e-3, 3e-3, 1e-2); 3e-4 was added after cddm's seed-0 validation optimum sat at its lower edge.
3. Metric: exact-match accuracy on the 1,000 test count / exist questions; 95% t-intervals over the
   seeds (`experiments.stats`); the contrast ``cddm - lm_only`` per seed (paired: same seed, same
   data order) with its interval.

Command: ``python -m experiments.vqa_scenes`` (about 15-20 min on 2 cores); writes
``experiments/results/vqa_scenes.md``, ``.json`` and ``.png``; runs under ``experiments/runs/vqa_scenes/``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from experiments.report import markdown_table
from experiments.stats import t_interval
from lorajax import atomic

#: arm -> --spec.targets; ``cddm_vision_lr0.1`` (the vision group at a tenth of the lr, `lorajax.groups`' per-group
#: multipliers) was added after the first full run of the other arms (exploratory: a post-hoc arm)
ARMS = {
    "cddm": ("vision", "projector", "lm"),
    "cddm_vision_lr0.1": ("vision:0.1", "projector", "lm"),
    "lm_only": ("lm",),
}
LR_GRID = (3e-4, 1e-3, 3e-3, 1e-2)
#: the lr of the run that pre-trains the shared stage-1 base (cddm, first seed); its stage 2 is a grid point
BASE_RUN_LR = 1e-3
SEEDS = (0, 1, 2)
CONFIG = "experiments/configs/vqa_scenes.py"
RESULTS = Path("experiments/results")


def _run(out: Path, arm: str, seed: int, lr: float, model: str, extra: list[str]) -> dict:
    from experiments.run import main

    argv = ["--config", CONFIG, "--out-dir", str(out), "--seed", str(seed), "--optim.lr", str(lr)]
    argv += ["--model", model, "--spec.targets", *ARMS[arm], "--no-progress", *extra]
    t0 = time.perf_counter()
    res = main(argv)
    res["wall_s"] = time.perf_counter() - t0
    return res


def majority_baseline() -> dict[str, float]:
    """Test accuracy of answering each question type with its most frequent stage-2 training answer."""
    from experiments.tasks import vqa

    train = vqa.split("train", vqa.STAGE2_TYPES, vqa.N_TRAIN)
    test = vqa.split("test", vqa.STAGE2_TYPES, vqa.N_TEST)
    ttypes, qtypes = np.asarray(train["types"]), np.asarray(test["types"])
    hit = np.zeros(len(test["answers"]), bool)
    out = {}
    for t in vqa.STAGE2_TYPES:
        values, counts = np.unique(train["answers"][ttypes == t], return_counts=True)
        sel = qtypes == t
        hit[sel] = test["answers"][sel] == values[np.argmax(counts)]
        out[t] = float(hit[sel].mean())
    return {"acc": float(hit.mean()), **out}


def _fmt(ci) -> str:
    return f"{ci.mean:.3f} [{ci.low:.3f}, {ci.high:.3f}]" if ci.n > 1 else f"{ci.mean:.3f} (single observation)"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="experiments/runs/vqa_scenes")
    ap.add_argument("--results", default=str(RESULTS / "vqa_scenes"), help="path stem of .md/.json/.png")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    ap.add_argument("--lrs", type=float, nargs="+", default=list(LR_GRID))
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="launcher flags for every run")
    args = ap.parse_args(argv)
    runs = Path(args.runs)
    t_all = time.perf_counter()
    records: dict[str, dict] = {}

    def run(arm: str, seed: int, lr: float, model: str) -> dict:
        key = f"{arm}_lr{lr:g}_s{seed}"
        if key not in records:
            records[key] = _run(runs / key, arm, seed, lr, model, args.extra)
            r = records[key]
            print(f"{key}: val {r['val_acc']:.3f} test {r['test_acc']:.3f} ({r['wall_s']:.0f} s)", flush=True)
        return records[key]

    s0, lrs = args.seeds[0], args.lrs
    first = run("cddm", s0, BASE_RUN_LR, "tiny")
    base = str(runs / f"cddm_lr{BASE_RUN_LR:g}_s{s0}" / "base")
    chosen: dict[str, float] = {}
    for arm in ARMS:
        vals = {lr: run(arm, s0, lr, base)["val_acc"] for lr in lrs}
        chosen[arm] = max(lrs, key=lambda lr: (vals[lr], -lr))  # ties: the smaller lr
    per_seed = {arm: [run(arm, s, chosen[arm], base) for s in args.seeds] for arm in ARMS}

    frozen = first["frozen_test_acc"]
    rows, summary = [], {}
    for arm, rs in per_seed.items():
        accs = [r["test_acc"] for r in rs]
        ci = t_interval(accs)
        summary[arm] = {"lr": chosen[arm], "test_acc": accs, "val_acc": [r["val_acc"] for r in rs], "ci": ci._asdict()}
        summary[arm]["trainable"] = sum(rs[0]["trainable"].values())
        rows.append(
            [
                arm,
                "+".join(ARMS[arm]),
                f"{chosen[arm]:g}",
                f"{summary[arm]['trainable']:,}",
                ", ".join(f"{a:.3f}" for a in accs),
                _fmt(ci),
                " / ".join(f"{np.mean([r['after']['test'][f'acc/{t}'] for r in rs]):.3f}" for t in ("count", "exist")),
                ", ".join(f"{r['after']['stage1_test']['acc']:.3f}" for r in rs),
                f"{np.median([r['wall_s'] for r in rs]):.0f} s",
            ]
        )
    fz = first["frozen"]
    fz_types = f"{fz['test']['acc/count']:.3f} / {fz['test']['acc/exist']:.3f}"
    fz_old = f"{fz['stage1_test']['acc']:.3f}"
    rows.append(
        ["frozen", "none", "-", "0", f"{frozen:.3f} (every seed: one base)", f"{frozen:.3f}", fz_types, fz_old, "-"]
    )
    major = majority_baseline()
    major_types = f"{major['count']:.3f} / {major['exist']:.3f}"
    rows.append(
        ["majority answer per type", "-", "-", "0", f"{major['acc']:.3f}", f"{major['acc']:.3f}", major_types, "-", "-"]
    )
    contrasts = {}
    for a_arm, b_arm in (("cddm", "lm_only"), ("cddm_vision_lr0.1", "lm_only"), ("cddm_vision_lr0.1", "cddm")):
        d = [a["test_acc"] - b["test_acc"] for a, b in zip(per_seed[a_arm], per_seed[b_arm])]
        contrasts[f"{a_arm} - {b_arm}"] = (d, t_interval(d))
    contrast_text = "\n".join(
        f"* {name}: per seed {', '.join(f'{x:+.3f}' for x in d)}; mean {_fmt(ci)}"
        for name, (d, ci) in contrasts.items()
    )
    grid = {k: {"val_acc": r["val_acc"], "test_acc": r["test_acc"]} for k, r in records.items()}
    wall = time.perf_counter() - t_all
    table = markdown_table(
        [
            "arm",
            "LoRA on",
            "lr (val-chosen)",
            "trainable",
            f"test acc per seed {tuple(args.seeds)}",
            "mean [95% CI]",
            "count / exist (seed mean)",
            "stage-1 types acc after",
            "wall / run (median)",
        ],
        rows,
    )
    val_rows = [[k, f"{v['val_acc']:.3f}"] for k, v in grid.items() if k.endswith(f"_s{s0}")]
    text = f"""# VQA on SYNTHETIC shape scenes: CDDM-style LoRA (vision + projector + LM) vs LM-only vs frozen

SYNTHETIC data (`lorajax.data.scenes`: 32x32 renders of 1-4 squares / circles / triangles in 4 colours,
one-word answers), a toy VLM (`lorajax.models.vlm`: ViT 2x64 -> MLP projector -> Llama 2x64, trained from
scratch here), not CDDM's crop-disease data nor Qwen-VL. Stage 1 trained the whole VLM on colour / shape
questions; stage 2 trains LoRA r=64, alpha=16 (CDDM's values; full rank at width 64) for 300 steps on the
held-out count / exist questions. Protocol and design: `experiments/vqa_scenes.py`,
`experiments/tasks/vqa.py`. Command: `python -m experiments.vqa_scenes`. Total wall time {wall / 60:.1f} min
for {len(records)} launcher runs on this 2-core machine (shared with other jobs: times are upper bounds); the
first run, which pre-trains the stage-1 base ({8 * 300} steps), took {first["wall_s"]:.0f} s.

Test accuracy on the 1,000 count / exist test questions (answering each type's most frequent training answer
scores {major["acc"]:.3f}: count {major["count"]:.3f}, exist {major["exist"]:.3f}). The lr of each arm
was chosen on the 500 validation questions at seed {s0} from {", ".join(f"{lr:g}" for lr in lrs)}; the test split
was not used to choose (3e-4 was added to the first grid 1e-3, 3e-3, 1e-2 after cddm's validation optimum sat at
its lower edge).

{table}

Contrasts of test accuracy (paired by seed: same seed, same stage-2 data order), 95% t-intervals:

{contrast_text}

`cddm_vision_lr0.1` (vision LoRA at 0.1 x the lr through `lorajax.groups.grouped_tx`) is exploratory: it was
added after the first full run of cddm / lm_only / frozen had been seen.

Validation accuracy of the lr grid (seed {s0}):

{markdown_table(["run", "val acc"], val_rows)}

Scale caveats: one stage-1 base for every seed (seeds vary the LoRA init and data order only), 3 seeds,
a toy model and SYNTHETIC data; nothing here says how CDDM's recipe behaves on Qwen-VL.
"""
    out = {
        "arms": summary,
        "frozen_test_acc": frozen,
        "frozen": first["frozen"],
        "majority_baseline": major,
        "contrasts": {k: {"per_seed": d, "ci": ci._asdict()} for k, (d, ci) in contrasts.items()},
        "lr_grid": list(lrs),
        "seeds": list(args.seeds),
        "runs": {k: {kk: v for kk, v in r.items() if kk not in ("loss_curve", "table")} for k, r in records.items()},
        "wall_s": wall,
    }
    stem = Path(args.results)
    stem.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(stem.with_suffix(".md"), text)
    atomic.write_text(stem.with_suffix(".json"), json.dumps(out, indent=2, default=str) + "\n")
    _plot(per_seed, frozen, major["acc"], stem.with_suffix(".png"))
    print(text, flush=True)
    return out


def _plot(per_seed: dict, frozen: float, majority: float, path: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8), dpi=100)
    names = [*per_seed, "frozen"]
    for i, arm in enumerate(per_seed):
        accs = [r["test_acc"] for r in per_seed[arm]]
        ci = t_interval(accs)
        ax.bar(i, ci.mean, color=f"C{i}", alpha=0.6)
        if ci.n > 1:
            ax.errorbar(i, ci.mean, yerr=[[ci.mean - ci.low], [ci.high - ci.mean]], color="k", capsize=4)
        ax.scatter([i] * len(accs), accs, color="k", s=12, zorder=3)
    ax.bar(len(per_seed), frozen, color="C7", alpha=0.6)
    ax.axhline(majority, color="k", ls="--", lw=1, label="majority answer per type")
    ax.legend(fontsize=8, loc="upper right")
    ax.set_xticks(range(len(names)), names, rotation=12, fontsize=8)
    ax.set_ylabel("test accuracy (count / exist)")
    ax.set_ylim(0, 1)
    ax.set_title("SYNTHETIC scenes VQA: mean, 95% CI, seeds")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    atomic.write_bytes(path, png.getvalue())


if __name__ == "__main__":
    main()
