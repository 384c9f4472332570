"""Kill a training job with SIGKILL at random moments; re-running it resumes and ends bitwise identical."""

import os
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

JOB = Path(__file__).with_name("resume_job.py")
ROOT = JOB.parents[1]
STEPS = 30


def _run(out, timeout=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen([sys.executable, str(JOB), str(out), str(STEPS)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _logged_step(out):
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    try:
        return json.loads(lines[-1])["step"] if lines else 0
    except (json.JSONDecodeError, KeyError):  # a line being written
        return 0


def test_sigkill_resume_is_bitwise_identical(tmp_path):
    ref = tmp_path / "ref"
    p = _run(ref)
    assert p.wait(timeout=300) == 0, p.stderr.read().decode()[-2000:]

    got = tmp_path / "killed"
    rng = random.Random(0)
    kills = 0
    # one kill during start-up, then kills once the job has logged a random step (mid-step or mid-checkpoint)
    for target in [None] + sorted(rng.sample(range(4, STEPS - 4, 2), 2)):
        p = _run(got)
        if target is None:
            time.sleep(rng.uniform(0.5, 2.0))
        else:
            deadline = time.monotonic() + 120
            while p.poll() is None and time.monotonic() < deadline and _logged_step(got) < target:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.2))
        if p.poll() is None:
            p.kill()  # SIGKILL
            kills += 1
        p.wait()
    from lorajax.train.checkpoint import Checkpointer

    resumed_from = Checkpointer(got / "checkpoints").latest_step()
    assert resumed_from and 0 < resumed_from < STEPS, f"no mid-run checkpoint to resume from ({resumed_from})"
    p = _run(got)  # then let it finish
    assert p.wait(timeout=300) == 0, p.stderr.read().decode()[-2000:]
    assert kills >= 1, "the job finished before any kill: raise the delays"
    assert (got / "final.safetensors").read_bytes() == (ref / "final.safetensors").read_bytes()
    assert (got / "metrics.jsonl").read_text() == (ref / "metrics.jsonl").read_text()
    steps = sorted(int(d.name) for d in (got / "checkpoints").iterdir() if d.name.isdigit())
    assert steps[-1] == STEPS and len(steps) <= 2, steps
