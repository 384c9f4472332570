"""Two processes on loopback (4 CPU devices each, gloo) end with the same adapters as one 8-device process."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from test_sharded_training import rel_err

from tests import fake_devices

JOB = Path(__file__).with_name("multihost_job.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two processes on loopback, ~70 s: `make test-all`
def test_two_processes_match_one(ckpt, tmp_path):
    single = tmp_path / "single"
    single.mkdir()
    fake_devices.run([JOB, "single", "0", ckpt, single], devices=None, timeout=300)  # the job sets its devices

    multi = tmp_path / "multi"
    multi.mkdir()
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(JOB), str(i), str(port), str(ckpt), str(multi)],
                              env=fake_devices.env(None),
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
