"""Kill a training job with SIGKILL at random moments; re-running it resumes and ends bitwise identical."""

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

JOB = Path(__file__).with_name("resume_job.py")
ROOT = JOB.parents[1]
STEPS = 30


def _run(out, timeout=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen([sys.executable, str(JOB), str(out), str(STEPS)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_sigkill_resume_is_bitwise_identical(tmp_path):
    ref = tmp_path / "ref"
    p = _run(ref)
    assert p.wait(timeout=300) == 0, p.stderr.read().decode()[-2000:]

    got = tmp_path / "killed"
    rng = random.Random(0)
    kills = 0
    for _ in range(3):  # kill at random moments: start-up, mid-step, mid-checkpoint
        p = _run(got)
        try:
            p.wait(timeout=rng.uniform(3.0, 8.0))
        except subprocess.TimeoutExpired:
            p.kill()  # SIGKILL
            p.wait()
            kills += 1
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
