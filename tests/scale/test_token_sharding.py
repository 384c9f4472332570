"""``token_sharding`` on the Llama and BERT models: under FSDP, XLA gathers weights instead of activations.

The job (8 fake CPU devices, mesh ``fsdp=8``, batch of 8 sequences over the devices) compiles one LoRA
loss-and-gradient step of each tiny model with and without the model's ``token_sharding`` and reads the
collectives of the partitioned HLO. Without it, XLA's sharding propagation keeps the weights sharded on their
input axis and all-reduces ``[B·S, features]`` activations after each matmul (traffic and memory that grow
with the batch); with it, every FSDP weight is all-gathered and no activation-sized collective is left.
Both give the one-device loss and gradients.
"""

import json
from pathlib import Path

import pytest

from tests import fake_devices

JOB = Path(__file__).with_name("token_sharding_job.py")
# one 8-fake-device job (~35 s on 2 cores): `make test-all` runs it, `make test` leaves it out
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("token_sharding") / "out.json"
    fake_devices.run([JOB, out])
    return json.loads(out.read_text())


@pytest.mark.parametrize("model", ["llama", "bert"])
def test_same_loss_and_gradients_as_one_device(result, model):
    r = result[model]
    for tag in ("plain", "token_sharding"):
        assert abs(r[tag]["loss"] - r["ref_loss"]) <= 1e-5 * abs(r["ref_loss"]), (tag, r[tag]["loss"], r["ref_loss"])
        assert r[tag]["grad_rel_err"] <= 1e-5, (tag, r[tag]["grad_rel_err"])


@pytest.mark.parametrize("model", ["llama", "bert"])
def test_weights_gathered_not_activations(result, model):
    r = result[model]
    assert r["plain"]["activation_collectives"], "expected XLA's default to move activations (test premise)"
    assert r["token_sharding"]["activation_collectives"] == [], r["token_sharding"]["activation_collectives"]
    assert r["token_sharding"]["gathered_weights"] >= 4 * 2, r["token_sharding"]["collectives"]  # >= 4 per layer
