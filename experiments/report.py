"""Markdown tables, matplotlib plots, metrics and results files of experiment runs (written atomically)."""

from __future__ import annotations

import io
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from lorajax import atomic

#: the line that marks a single-seed table (no confidence interval) in the older results files
SINGLE_SEED_NOTE = (
    "**Single observation**: one seed, no confidence interval (the standard error of one accuracy on these "
    "test sets is ~2 points); seeded comparisons with 95% CIs are in `effects.md`."
)
#: the step-time file of a training folder (written by the call that trained; read by a later resume)
STEP_TIME = "step_time.json"


def main_process() -> bool:
    """Whether this process writes a run's shared files: process 0 of a multi-host jax job, or the only one.

    The writers below do nothing elsewhere (two hosts replacing one file on a
    shared disk would remove each other's temporaries).
    """
    jax = sys.modules.get("jax")
    return jax is None or jax.process_index() == 0


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def loss_plot(curves: dict[str, list[tuple[int, float]]], path: str | Path, title: str = "") -> Path:
    """Loss vs step, one line per run, written as a PNG (atomically: the old plot or the new one)."""
    if not main_process():
        return Path(path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for name, points in curves.items():
        steps, losses = zip(*points)
        ax.plot(steps, losses, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    atomic.write_bytes(path, png.getvalue())
    return Path(path)


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` (none if it is missing); a torn last line (a killed write) is dropped."""
    path = Path(path)
    if not path.exists():
        return []
    lines = [x for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError:
            if i == len(lines) - 1:  # the end of an interrupted append
                break
            raise ValueError(f"{path}: line {i + 1} is not JSON; the metrics file is damaged") from None
    return records


def loss_curve(train_dir: str | Path) -> list[tuple[int, float]]:
    """``[(step, loss), ...]`` of every call that trained in ``train_dir`` (from its ``metrics.jsonl``)."""
    return [(r["step"], r["loss"]) for r in read_metrics(Path(train_dir) / "metrics.jsonl") if "loss" in r]


def step_time_ms(history: list[dict], train_dir: str | Path) -> float | None:
    """Median milliseconds per step of the steps timed in ``history``; stored in ``train_dir``.

    A call that trained nothing (resumed after training ended) returns the
    stored value of the call that did, or None when there is none.
    """
    stored = Path(train_dir) / STEP_TIME
    rates = [h["steps_per_s"] for h in history if "steps_per_s" in h]
    if rates:
        ms = 1e3 / float(np.median(rates))
        if main_process():
            atomic.write_text(stored, json.dumps({"step_ms": ms, "timed_records": len(rates)}) + "\n")
        return ms
    try:
        value = json.loads(stored.read_text(encoding="utf-8"))["step_ms"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return float(value) if isinstance(value, (int, float)) else None


def format_ms(ms: float | None) -> str:
    """``"12 ms"``, or ``"n/a (resumed after training)"`` when no step was timed."""
    return "n/a (resumed after training)" if ms is None or not math.isfinite(ms) else f"{ms:.0f} ms"


def strict_json(value: Any) -> Any:
    """``value`` with non-finite floats replaced by None (JSON has no NaN/Infinity)."""
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def write_results(out: str | Path, markdown: str, results: dict) -> None:
    """``results.md`` and ``results.json`` (strict JSON, loss curves left out), each written atomically."""
    if not main_process():
        return
    out = Path(out)
    atomic.write_text(out / "results.md", markdown)
    record = {k: v for k, v in results.items() if not k.endswith("loss_curve")}
    text = json.dumps(strict_json(record), indent=2, default=str, allow_nan=False)
    atomic.write_text(out / "results.json", text + "\n")
