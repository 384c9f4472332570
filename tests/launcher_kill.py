"""Kill a launcher run mid-way and run it again: the resume check the task tests share."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]


def launch(argv: list[str]) -> subprocess.Popen:
    """``python -m experiments.run *argv`` in a subprocess (CPU, the repository on the path)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "experiments.run", *argv]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def killed_and_resumed(argv_of: Callable[[Path], list[str]], ref: Path, got: Path, marker: str) -> tuple[dict, dict]:
    """``results.json`` of an uninterrupted run in ``ref`` and of a run in ``got`` killed (SIGKILL) as soon as
    ``got / marker`` exists, checked to have stopped before its results, then run again to the end."""
    p = launch(argv_of(ref))
    assert p.wait(timeout=600) == 0, p.stderr.read().decode()[-2000:]
    p = launch(argv_of(got))
    deadline = time.monotonic() + 300
    while p.poll() is None and time.monotonic() < deadline and not (got / marker).exists():
        time.sleep(0.05)
    assert p.poll() is None, f"the run ended before {marker} appeared, so it could not be killed after it"
    p.kill()
    p.wait()
    assert not (got / "results.json").exists()
    p = launch(argv_of(got))
    assert p.wait(timeout=600) == 0, p.stderr.read().decode()[-2000:]
    a, b = (json.loads((d / "results.json").read_text()) for d in (ref, got))
    return a, b
