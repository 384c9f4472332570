"""Two processes on loopback (4 CPU devices each, gloo) end with the same adapters as one 8-device process."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from test_sharded_training import ckpt, rel_err  # noqa: F401  (fixture + helper)

JOB = Path(__file__).with_name("multihost_job.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    root = Path(__file__).resolve().parents[2]
    e = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    e["JAX_PLATFORMS"] = "cpu"
    e["PYTHONPATH"] = f"{root}:{e.get('PYTHONPATH', '')}"
    return e


def test_two_processes_match_one(ckpt, tmp_path):  # noqa: F811
    single = tmp_path / "single"
    single.mkdir()
    proc = subprocess.run([sys.executable, str(JOB), "single", "0", str(ckpt), str(single)], env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    multi = tmp_path / "multi"
    multi.mkdir()
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(JOB), str(i), str(port), str(ckpt), str(multi)], env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]

    want = json.loads((single / "losses.json").read_text())
    got = json.loads((multi / "losses.json").read_text())
    np.testing.assert_allclose(got, want, rtol=1e-5)
    a = safetensors.numpy.load_file(str(single / "adapters.safetensors"))
    b = safetensors.numpy.load_file(str(multi / "adapters.safetensors"))
    assert set(a) == set(b)
    for k in a:
        assert rel_err(b[k], a[k]) <= 1e-5, k
    # orbax checkpoints were written by both processes together and are complete
    steps = sorted(int(d.name) for d in (multi / "run" / "checkpoints").iterdir() if d.name.isdigit())
    assert steps and steps[-1] == 4
