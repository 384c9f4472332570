"""Effects: do lorajax's methods do what their papers claim? ``python -m experiments.effects``.

Each effect (declared in `experiments.effect_list`) is a small experiment fixed
before its results are seen: the paper's claim in one sentence with the
paper's number, the arms (launcher flags), the steps, the seeds, the metric,
an lr grid, and one or more *contrasts* (a per-seed number whose sign is the
paper's direction) with the kind of claim (`experiments.stats`).

For every arm the harness

1. picks the learning rate on the **validation** split: one run per lr of the
   grid with the tuning seed (not one of the evaluation seeds), the lowest
   ``select`` metric wins (a diverged run counts as +inf);
2. runs the evaluation seeds ``0..n-1`` at that lr with the same number of
   optimiser steps as every other arm; arms of one seed share the data order
   and the initialisation seed, so contrasts are paired by seed.

Every run is an ordinary launcher run (`experiments.run.main`) in its own
folder ``<out>/<effect>/<arm>/lr<lr>-seed<s>/``: a finished run (its
``results.json``) is read, not re-run, and an interrupted one resumes from its
checkpoints, so a killed sweep loses at most the step since the last
checkpoint. A run that fails (diverges) is recorded in ``failed.json`` and
reported, never dropped.

Reports: ``<results>/effects.md``, ``effects.json`` and one plot per effect in
``<results>/effects/``, rewritten after each effect (effects not run this time
keep their previous record).

Command line::

  python -m experiments.effects [--only NAME ...] [--seeds N] [--steps-scale S]
                                [--out DIR] [--results DIR] [--list]

``--seeds 1 --steps-scale 0.1`` is the smoke mode (every effect end to end in
minutes; its verdicts say "single observation"; below scale 1 no lr is searched:
each arm takes its grid's middle value).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from experiments import stats
from experiments.report import markdown_table, read_metrics, strict_json
from lorajax import atomic

__all__ = ["Arm", "Contrast", "Effect", "run_effect", "summarise", "main"]

#: the shared pre-trained base of the lm effects: ``<out>/_base/base`` (trained once by the lm task)
BASE_FLAGS: tuple[str, ...] = ("--task", "lm", "--model", "tiny", "--steps", "300", "--batch-size", "32")
BASE_FLAGS += ("--max-length", "128", "--spec.targets", "all-linear", "--no-export")


@dataclasses.dataclass(frozen=True)
class Arm:
    """One arm of an effect: a name and its launcher flags (besides the effect's common ones)."""

    name: str
    flags: tuple[str, ...] = ()
    lrs: tuple[float, ...] | None = None  # this arm's lr grid; None = the effect's; one value = no tuning


@dataclasses.dataclass(frozen=True)
class Contrast:
    """A number per seed, positive in the paper's direction: ``sum(coef * metric(arm))``.

    ``terms``: ``(arm, metric, coef)``; a metric is a dotted key of the run's
    ``results.json`` (``"test_loss"``, ``"rank_eval.4.test_loss"``) or
    ``"train_auc"`` (the mean logged training loss, from ``metrics.jsonl``).
    """

    name: str
    terms: tuple[tuple[str, str, float], ...]
    kind: str = "superiority"  # or "non-inferiority" (then margin > 0)
    margin: float = 0.0
    unit: str = "nats/char"


@dataclasses.dataclass(frozen=True)
class Effect:
    """A declared experiment: the claim, the arms, the budget, the contrasts (see the module doc)."""

    name: str
    paper: str  # the paper (authors, year, arXiv id) and, where it exists, the official code
    claim: str  # the paper's claim in one sentence, with its own number
    arms: tuple[Arm, ...]
    contrasts: tuple[Contrast, ...]
    steps: int  # optimiser steps of every arm
    flags: tuple[str, ...] = ()  # launcher flags of every arm
    task: str = "lm"
    lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    select: str = "val_loss"  # the validation metric minimised to pick each arm's lr
    seeds: int = 3
    tune_seed: int = 100
    shared_base: bool = True  # lm: every arm adapts the one pre-trained base (``--model <out>/_base/base``)
    runner: str = "experiments.run"  # the module whose ``main(argv)`` runs one arm (the launcher, or a script
    # taking the same run flags: --steps, --optim.lr, --seed, --out-dir, --no-progress, ...)
    report: tuple[str, ...] = ("test_loss",)  # per-arm metrics shown in the table
    notes: str = ""  # what this small scale cannot show

    def __post_init__(self):
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise ValueError(f"effect {self.name}: arm names repeat: {names}")
        for c in self.contrasts:
            stats.verdict(stats.Interval(0.0, 0.0, 0.0, 0.0, 2), c.kind, c.margin)  # kind and margin are valid
            for arm, _, _ in c.terms:
                if arm not in names:
                    raise ValueError(f"effect {self.name}: contrast {c.name!r} names unknown arm {arm!r}")


# ----------------------------------------------------------------------------------------------- runs


class RunFailed(RuntimeError):
    """A launcher run that ended with an error (recorded in its ``failed.json``)."""


def lr_tag(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-").replace("e+0", "e")


def run_dir(out: Path, effect: Effect, arm: Arm, lr: float, seed: int) -> Path:
    return out / effect.name / arm.name / f"lr{lr_tag(lr)}-seed{seed}"


def scaled_steps(steps: int, scale: float) -> int:
    return max(2, int(round(steps * scale)))


@dataclasses.dataclass(frozen=True)
class Sweep:
    """Where and how the runs of a sweep go: run folders, step scale, extra launcher flags, the lm base."""

    out: Path
    scale: float = 1.0
    extra: tuple[str, ...] = ()  # appended to every run's flags (they win over the effect's)
    base: Path | None = None


def launcher_argv(effect: Effect, arm: Arm, lr: float, seed: int, folder: Path, sweep: Sweep) -> list[str]:
    """The launcher command line of one run (later flags win: effect, arm, sweep extras, then the run's own)."""
    steps = scaled_steps(effect.steps, sweep.scale)
    argv = ["--task", effect.task, *effect.flags, *arm.flags]
    if sweep.base is not None and effect.shared_base:
        argv += ["--model", str(sweep.base)]
    argv += [*sweep.extra, "--steps", str(steps), "--eval-every", str(steps), "--ckpt-every", str(max(1, steps // 2))]
    argv += ["--optim.lr", repr(lr), "--seed", str(seed), "--out-dir", str(folder), "--no-progress"]
    return argv


def launch(argv: list[str], folder: Path, runner: str = "experiments.run") -> dict:
    """Run the launcher in this process; its results dict (read back from ``results.json``).

    Raises:
      RunFailed: the training failed (launcher exit 1: a non-finite loss or a
        diverged model); recorded in ``folder/failed.json`` so a resumed sweep
        reports it instead of re-running it.
      RuntimeError: a bad config or a folder holding another run (exit 2): a
        mistake in the declaration or the flags, which stops the sweep.
    """
    import importlib

    from experiments import run

    try:
        importlib.import_module(runner).main(argv)
    except SystemExit as e:  # the launcher printed one line
        if e.code != run.EXIT_TRAINING:
            raise RuntimeError(f"{folder}: the launcher refused {' '.join(argv)} (exit {e.code})") from None
        reason = f"training failed (launcher exit {e.code})"
        atomic.write_text(folder / "failed.json", json.dumps({"argv": argv, "reason": reason}) + "\n")
        raise RunFailed(f"{folder}: {reason}") from None
    finally:
        import jax

        jax.clear_caches()  # many runs in one process: do not keep every run's compiled steps
    return json.loads((folder / "results.json").read_text(encoding="utf-8"))


def train_auc(folder: Path) -> float:
    """The mean logged training loss of the run in ``folder`` (area under its loss curve per step)."""
    for sub in ("lora", "full", "train"):
        records = [r["loss"] for r in read_metrics(folder / sub / "metrics.jsonl") if r.get("loss") is not None]
        if records:
            return float(sum(records) / len(records))
    return math.nan


def get_run(effect: Effect, arm: Arm, lr: float, seed: int, sweep: Sweep) -> dict:
    """The results of one run: read when finished, else run (resuming); ``{"failed": reason}`` if it failed."""
    folder = run_dir(sweep.out, effect, arm, lr, seed)
    if (folder / "failed.json").exists():
        return {"failed": json.loads((folder / "failed.json").read_text(encoding="utf-8"))["reason"]}
    if not (folder / "results.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        started = time.time()
        print(f"[{effect.name}] {arm.name} lr={lr:g} seed={seed}", flush=True)
        try:
            result = launch(launcher_argv(effect, arm, lr, seed, folder, sweep), folder, effect.runner)
        except RunFailed as e:
            print(f"[{effect.name}] failed: {e}", flush=True)
            return {"failed": str(e)}
        atomic.write_text(folder / "wall.json", json.dumps({"seconds": time.time() - started}) + "\n")
    else:
        result = json.loads((folder / "results.json").read_text(encoding="utf-8"))
    result["train_auc"] = train_auc(folder)
    return result


def metric(result: dict, key: str) -> float:
    """The value of a dotted ``key`` in a run's results (nan when missing, failed or not a number)."""
    node: Any = result
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return math.nan
        node = node[part]
    return float(node) if isinstance(node, (int, float)) and node is not None else math.nan


def pick_lr(effect: Effect, arm: Arm, sweep: Sweep) -> tuple[float, dict]:
    """``(lr, {lr: validation metric})``: the arm's lr, chosen on the validation split with the tuning seed.

    Smoke scale (``sweep.scale < 1``) searches nothing: the grid's middle value, an empty score dict (the
    search itself is tested in tests/test_effects.py; in smoke mode it would be 3-4x the runs).
    """
    grid = arm.lrs if arm.lrs is not None else effect.lrs
    if len(grid) == 1:
        return grid[0], {}
    if sweep.scale < 1:
        return sorted(grid)[len(grid) // 2], {}
    scores = {}
    for lr in grid:
        value = metric(get_run(effect, arm, lr, effect.tune_seed, sweep), effect.select)
        scores[lr] = value if math.isfinite(value) else math.inf
    return min(grid, key=lambda lr: scores[lr]), scores


def ensure_base(sweep: Sweep) -> Path:
    """The pre-trained base shared by the lm effects (trained once into ``<out>/_base``)."""
    folder = sweep.out / "_base"
    base = folder / "base"
    if not (folder / "results.json").exists():
        steps = str(scaled_steps(300, sweep.scale))
        argv = [*BASE_FLAGS, *sweep.extra, "--steps", steps, "--eval-every", steps]
        argv += ["--out-dir", str(folder), "--no-progress"]
        print(f"[effects] pre-training the shared lm base into {base}", flush=True)
        folder.mkdir(parents=True, exist_ok=True)
        started = time.time()
        launch(argv, folder)
        atomic.write_text(folder / "wall.json", json.dumps({"seconds": time.time() - started}) + "\n")
    return base


def budget_table(out: Path, names: list[str], limit_min: float = 30.0) -> tuple[str, float]:
    """The time a sweep in ``out`` took, per effect (sum of its runs' ``wall.json``) and in total with the
    shared base (``_base/wall.json`` when recorded): ``(markdown, total minutes)``."""
    rows, total = [], 0.0
    for name in names:
        runs = list((out / name).glob("*/*/wall.json"))
        minutes = run_seconds(out / name) / 60
        total += minutes
        rows.append([name, str(len(runs)), f"{minutes:.1f}", "yes" if minutes <= limit_min else "**no**"])
    base = out / "_base" / "wall.json"
    if base.exists():
        minutes = float(json.loads(base.read_text(encoding="utf-8"))["seconds"]) / 60
        total += minutes
        rows.append(["shared lm base (pre-training + its LoRA run)", "1", f"{minutes:.1f}", ""])
    else:
        rows.append(["shared lm base", "1", "not recorded (no _base/wall.json)", ""])
    rows.append(["**total**", "", f"**{total:.1f}**", ""])
    table = markdown_table(["effect", "runs", "run minutes", f"≤ {limit_min:g} min"], rows)
    return table, total


# --------------------------------------------------------------------------------------------- effect


def run_effect(effect: Effect, sweep: Sweep, seeds: int | None = None) -> dict:
    """Run (or read) every arm of ``effect``; its record: chosen lrs, per-seed metrics, contrasts, verdicts."""
    n = effect.seeds if seeds is None else seeds
    if effect.task == "lm" and effect.shared_base and sweep.base is None:
        sweep = dataclasses.replace(sweep, base=ensure_base(sweep))
    started = time.time()
    arms: dict[str, dict] = {}
    for arm in effect.arms:
        lr, grid = pick_lr(effect, arm, sweep)
        runs = [get_run(effect, arm, lr, s, sweep) for s in range(n)]
        arms[arm.name] = {
            "flags": list(arm.flags),
            "lr": lr,
            "lr_grid_val": {repr(k): v for k, v in grid.items()},
            "seeds": list(range(n)),
            "failed": [s for s, r in zip(range(n), runs) if "failed" in r],
            "results": runs,
        }
    contrasts = [summarise(c, arms, n) for c in effect.contrasts]
    return {
        "name": effect.name,
        "paper": effect.paper,
        "claim": effect.claim,
        "task": effect.task,
        "steps": scaled_steps(effect.steps, sweep.scale),
        "flags": list(effect.flags) + list(sweep.extra),
        "seeds": n,
        "steps_scale": sweep.scale,
        "select": effect.select,
        "report": list(effect.report),
        "notes": effect.notes,
        "arms": arms,
        "contrasts": contrasts,
        "wall_s": time.time() - started,
        "run_seconds": run_seconds(sweep.out / effect.name),
    }


def run_seconds(folder: Path) -> float:
    """The wall time of every run (grid and seeds) under an effect's folder, from their ``wall.json``."""
    total = 0.0
    for path in folder.glob("*/*/wall.json"):
        try:
            total += float(json.loads(path.read_text(encoding="utf-8"))["seconds"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return total


def summarise(c: Contrast, arms: dict[str, dict], n: int) -> dict:
    """A contrast's per-seed values, its t-interval and verdict (seeds with a failed arm are reported, not used)."""
    per_seed = []
    for s in range(n):
        value = sum(coef * metric(arms[arm]["results"][s], key) for arm, key, coef in c.terms)
        per_seed.append(value)
    finite = [v for v in per_seed if math.isfinite(v)]
    record: dict[str, Any] = {
        "name": c.name,
        "kind": c.kind,
        "margin": c.margin,
        "unit": c.unit,
        "terms": [list(t) for t in c.terms],
        "per_seed": per_seed,
    }
    if not finite:
        return {**record, "verdict": "inconclusive", "why": "no seed finished every arm"}
    ci = stats.t_interval(finite)
    record.update(mean=ci.mean, low=ci.low, high=ci.high, se=ci.se, n=ci.n)
    record["verdict"] = stats.verdict(ci, c.kind, c.margin)
    if len(finite) < n:
        record["why"] = f"{n - len(finite)} of {n} seeds had a failed run (kept in per_seed as null)"
        if record["verdict"] == "reproduced":
            record["verdict"] = "inconclusive"
    return record


# -------------------------------------------------------------------------------------------- reports


def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None or not isinstance(x, (int, float)) or not math.isfinite(x):
        return "—"
    return f"{x:.{digits}g}" if abs(x) >= 1e4 or (x != 0 and abs(x) < 1e-3) else f"{x:.{digits}f}"


def _arm_rows(record: dict) -> list[list[str]]:
    rows = []
    for name, arm in record["arms"].items():
        cells = [name, f"{arm['lr']:g}"]
        for key in record["report"]:
            values = [metric(r, key) for r in arm["results"]]
            finite = [v for v in values if math.isfinite(v)]
            if finite:
                ci = stats.t_interval(finite)
                cell = _fmt(ci.mean) if ci.n < 2 else f"{_fmt(ci.mean)} ± {_fmt(ci.high - ci.mean)}"
            else:
                cell = "—"
            cells.append(cell + (f" ({len(values) - len(finite)} failed)" if len(finite) < len(values) else ""))
        cells.append(", ".join(_fmt(metric(r, record["report"][0])) for r in arm["results"]))
        rows.append(cells)
    return rows


def effect_markdown(record: dict, plot: str | None) -> str:
    """One effect's section of ``effects.md``."""
    lines = [f"## {record['name']}", "", f"**Paper.** {record['paper']}", "", f"**Claim.** {record['claim']}", ""]
    setup = (
        f"**Setup.** task `{record['task']}`, {record['steps']} steps per arm, seeds 0..{record['seeds'] - 1}, "
        f"lr per arm picked on `{record['select']}` (validation) with a separate tuning seed; "
        f"common flags `{' '.join(record['flags']) or '—'}`; "
        f"{record.get('run_seconds', 0) / 60:.0f} min of runs on this machine."
    )
    lines += [setup, ""]
    header = ["arm", "lr", *[f"{k} (mean ± 95% CI)" for k in record["report"]], f"{record['report'][0]} per seed"]
    lines += [markdown_table(header, _arm_rows(record)), ""]
    rows = []
    for c in record["contrasts"]:
        interval = f"[{_fmt(c.get('low'))}, {_fmt(c.get('high'))}]" if c.get("n", 0) >= 2 else "—"
        kind = c["kind"] + (f" (margin {c['margin']:g})" if c["kind"] == "non-inferiority" else "")
        per_seed = ", ".join(_fmt(v) for v in c["per_seed"])
        rows.append([c["name"], kind, _fmt(c.get("mean")), interval, per_seed, f"**{c['verdict']}**"])
    header = ["contrast (> 0 = paper's direction)", "claim", "mean", "95% CI", "per seed", "verdict"]
    lines += [markdown_table(header, rows), ""]
    whys = [f"{c['name']}: {c['why']}" for c in record["contrasts"] if c.get("why")]
    if whys:
        lines += ["Failed runs: " + "; ".join(whys), ""]
    if record.get("notes"):
        lines += [f"**Notes.** {record['notes']}", ""]
    if plot:
        lines += [f"![{record['name']}]({plot})", ""]
    return "\n".join(lines)


def effect_plot(record: dict, path: Path) -> None:
    """Each contrast's mean ± 95% CI with zero (and the non-inferiority margin) marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cs = [c for c in record["contrasts"] if c.get("n")]
    if not cs:
        return
    fig, ax = plt.subplots(figsize=(6.5, 0.6 + 0.55 * len(cs)), dpi=100)
    for i, c in enumerate(cs):
        err = [[c["mean"] - c["low"]], [c["high"] - c["mean"]]] if c["n"] >= 2 else None
        ax.errorbar([c["mean"]], [i], xerr=err, fmt="o", capsize=4, color="C0")
        ax.scatter([v for v in c["per_seed"] if v is not None and math.isfinite(v)], [i] * c["n"], s=9, color="C1")
        if c["kind"] == "non-inferiority":
            ax.plot([-c["margin"]] * 2, [i - 0.4, i + 0.4], color="C3", ls="--")
    ax.axvline(0.0, color="k", lw=0.8)
    ax.set_yticks(range(len(cs)), [c["name"] for c in cs], fontsize=8)
    ax.set_xlabel("contrast (> 0 = the paper's direction); dots: seeds, dashes: margin")
    ax.set_title(record["name"], fontsize=9)
    fig.tight_layout()
    import io

    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    atomic.write_bytes(path, png.getvalue())


def write_reports(records: dict[str, dict], results: Path, order: Sequence[str]) -> None:
    """``effects.json``, ``effects.md`` and the plots, for every recorded effect (in declaration order)."""
    names = [n for n in order if n in records] + sorted(set(records) - set(order))
    sections, summary = [], []
    for name in names:
        record = records[name]
        plot = results / "effects" / f"{name}.png"
        effect_plot(record, plot)
        sections.append(effect_markdown(record, f"effects/{plot.name}" if plot.exists() else None))
        for c in record["contrasts"]:
            ci = f"{_fmt(c.get('mean'))} [{_fmt(c.get('low'))}, {_fmt(c.get('high'))}]" if c.get("n") else "—"
            summary.append([f"[{name}](#{name.lower()})", c["name"], ci, str(record["seeds"]), c["verdict"]])
    counts = {v: sum(row[-1] == v for row in summary) for v in stats.VERDICTS}
    smoke = [n for n in names if records[n]["steps_scale"] != 1.0 or records[n].get("extra")]
    head = [
        "# Effects: do the methods do what their papers claim?",
        "",
        "Written by `python -m experiments.effects` (declarations: `experiments/effect_list.py`). Each arm's lr",
        "is picked on a validation split with a tuning seed; seeds 0..n-1 then run at that lr; contrasts are",
        "paired by seed and their 95% CI is a Student t-interval over seeds. Verdicts: **reproduced** (CI on the",
        "paper's side of 0, or of the margin for 'close to' claims), **not reproduced** (CI on the other side),",
        "**inconclusive** (CI straddles it). Every seed and arm is reported.",
        "",
        "Verdicts: " + ", ".join(f"{v} {k}" for v, k in ((counts[k], k) for k in stats.VERDICTS) if v),
        "",
    ]
    if smoke:
        head += [f"**Smoke-scale records (steps scaled, not results):** {', '.join(smoke)}", ""]
    head += [markdown_table(["effect", "contrast", "mean [95% CI]", "seeds", "verdict"], summary), ""]
    atomic.write_text(results / "effects.md", "\n".join(head + sections))
    text = json.dumps(strict_json(records), indent=1, allow_nan=False, default=str)
    atomic.write_text(results / "effects.json", text + "\n")


def _compile_cache(folder: Path) -> None:
    """Share compiled programs between the sweep's runs (same shapes and settings compile once), unless the
    user chose a cache (``JAX_COMPILATION_CACHE_DIR``)."""
    import os

    import jax

    if not os.environ.get("JAX_COMPILATION_CACHE_DIR") and not getattr(jax.config, "jax_compilation_cache_dir", None):
        jax.config.update("jax_compilation_cache_dir", str(folder.absolute()))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@contextlib.contextmanager
def _locked(results: Path):
    """An exclusive lock on ``results/.effects.lock`` (POSIX ``flock``) while the reports are rewritten."""
    import fcntl

    results.mkdir(parents=True, exist_ok=True)
    with open(results / ".effects.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def load_records(results: Path) -> dict[str, dict]:
    path = results / "effects.json"
    if not path.exists():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


def main(argv: list[str] | None = None) -> dict[str, dict]:
    from experiments.effect_list import EFFECTS

    parser = argparse.ArgumentParser(prog="python -m experiments.effects", description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", default=None, metavar="NAME", help="run only these effects")
    parser.add_argument("--seeds", type=int, default=None, help="evaluation seeds per arm (default: each effect's)")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply every effect's steps (smoke: 0.1)")
    parser.add_argument("--out", default="experiments/runs/effects", help="run folders (resumable)")
    parser.add_argument("--results", default="experiments/results", help="effects.md, effects.json, plots")
    parser.add_argument("--list", action="store_true", help="list the effects and exit")
    parser.add_argument(
        "--budget",
        action="store_true",
        help="write <results>/effects_budget.md: the time the sweep in --out took per effect (runs nothing)",
    )
    parser.add_argument("--budget-note", default="", help="a sentence for the budget report (e.g. the load)")
    parser.add_argument(
        "--flags", default="", help="launcher flags added to every run, e.g. '--max-test 64' (runs go to a subfolder)"
    )
    args = parser.parse_args(argv)
    by_name = {e.name: e for e in EFFECTS}
    if args.list:
        for e in EFFECTS:
            print(f"{e.name}: {e.claim}")
        return {}
    if args.budget:
        table, total = budget_table(Path(args.out), list(by_name))
        text = (
            f"# Effects sweep: time on this machine\n\nThe runs of `{args.out}` (each run's `wall.json`: grid and "
            f"seeds, in one process with a shared compile cache). Done means: every effect ≤ 30 min, the sweep "
            f"≤ 4 h. {args.budget_note}\n\n{table}\n\nTotal: {total:.0f} min = {total / 60:.2f} h.\n"
        )
        atomic.write_text(Path(args.results) / "effects_budget.md", text)
        print(text, flush=True)
        return {}
    unknown = [n for n in args.only or [] if n not in by_name]
    if unknown:
        parser.error(f"unknown effect(s) {unknown}; known: {', '.join(by_name)}")
    if args.seeds is not None and args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    if not args.steps_scale > 0:
        parser.error(f"--steps-scale must be > 0, got {args.steps_scale}")
    extra = tuple(shlex.split(args.flags))
    out = Path(args.out)
    if args.steps_scale != 1.0:
        out = out / f"scale{args.steps_scale:g}"
    if extra:  # other flags, other runs: a folder per flag set
        out = out / ("flags-" + hashlib.sha256(" ".join(extra).encode()).hexdigest()[:8])
    sweep = Sweep(out, args.steps_scale, extra)
    _compile_cache(Path(args.out) / "_jax_cache")
    results = Path(args.results)
    records = {}
    for name in args.only or list(by_name):
        record = {**run_effect(by_name[name], sweep, args.seeds), "extra": list(extra)}
        with _locked(results):  # two sweeps (--only A / --only B) may finish at once: merge, do not clobber
            records = load_records(results)
            records[name] = record
            write_reports(records, results, list(by_name))
        verdicts = ", ".join(f"{c['name']}: {c['verdict']}" for c in records[name]["contrasts"])
        print(f"[{name}] {verdicts} ({records[name]['wall_s']:.0f} s)", flush=True)
    return records


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
