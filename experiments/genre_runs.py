"""One run of the genre task as a child process of the launcher (`experiments.run`), reused once finished.

The sweeps (`experiments.compare_optimizers`, `experiments.sweep_variants`) call `genre_run` per row: a
run folder that already holds ``results.json`` is read back instead of trained again (``rerun=True``
trains it anyway).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

CONFIG = "experiments/configs/genre_minilm.py"


def genre_run(extra: list[str], out: Path, *, data: str, rerun: bool, baseline: bool = False) -> dict:
    """``python -m experiments.run --config CONFIG *extra`` into ``out``; its ``results.json``.

    ``baseline=False`` adds ``--no-baseline`` (the frozen-encoder baseline runs once, on its own).
    """
    cmd = [
        sys.executable,
        "-m",
        "experiments.run",
        "--config",
        CONFIG,
        *extra,
        "--out-dir",
        str(out),
        "--no-progress",
        "--data",
        data,
    ]
    if not baseline:
        cmd.append("--no-baseline")
    if rerun:  # afresh: the previous run in ``out`` is moved aside (experiments.run_identity), not resumed
        cmd.append("--overwrite")
    done = out / "results.json"
    if rerun or not done.exists():
        print(" ".join(cmd[2:]), flush=True)
        subprocess.run(cmd, check=True)
    return json.loads(done.read_text())
