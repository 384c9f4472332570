"""ESSA's population sharded over 8 fake CPU devices (subprocess) gives the single-device result."""

import json
from pathlib import Path

import numpy as np
import pytest

from tests import fake_devices

pytest.importorskip("evosax")

JOB = Path(__file__).with_name("sharded_es_job.py")
MESHES = ["1", "data=8"]
# one 8-fake-device job (~25 s on 2 cores): `make test-all` runs it, `make test` leaves it out
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("es_meshes") / "out.json"
    fake_devices.run([JOB, out, *MESHES])
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
