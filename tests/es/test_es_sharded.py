"""ESSA's population sharded over 8 fake CPU devices (subprocess) gives the single-device result."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("evosax")

JOB = Path(__file__).with_name("sharded_es_job.py")
MESHES = ["1", "data=8"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("es_meshes") / "out.json"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = f"{root}:{env.get('PYTHONPATH', '')}"
    proc = subprocess.run([sys.executable, str(JOB), str(out), *MESHES], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_same_generations_on_every_mesh(results):
    ref = results["1"]
    for mesh in MESHES[1:]:
        np.testing.assert_allclose(results[mesh]["fitness"], ref["fitness"], rtol=1e-5, err_msg=mesh)
        np.testing.assert_allclose(results[mesh]["means"], ref["means"], rtol=1e-5, atol=1e-6, err_msg=mesh)
    assert ref["means"][0] != ref["means"][1]  # the search moved


def test_members_are_split_over_the_devices(results):
    assert results["1"]["n_devices"] == 1
    assert results["data=8"]["n_devices"] == 8 and "data" in results["data=8"]["fitness_spec"]
