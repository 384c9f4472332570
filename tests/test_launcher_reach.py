"""The lm task reaches what the effects harness needs: variant options, data-aware inits, rank evaluation,
squeeze, SoRA pruning, full fine-tuning (GaLore) from scratch, a shared base via --model, a validation split.

Tiny settings and a small synthetic corpus of "SPEAKER: words" lines (a different word mix per split; the
real corpus is exercised by tests/test_experiments.py); one base is pre-trained once (run A) and shared with
the other runs through ``--model A/base``.
"""

import json

import numpy as np
import pytest

from experiments import run

TINY = ["--task", "lm", "--steps", "2", "--batch-size", "4", "--max-length", "16", "--max-test", "4",
        "--max-val", "4", "--eval-every", "100", "--ckpt-every", "100", "--no-progress", "--no-sample",
        "--spec.targets", "q_proj", "v_proj", "--optim.warmup", "1"]
WORDS = "the a my lord lady love fool sweet night day heart what why come go good sir madam".split()


def speeches(seed: int, n: int = 400) -> str:
    """``n`` lines ``"SPEAKER: w w w ..."``; the seed sets the word frequencies and choices."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(len(WORDS)))
    lines = [f"{rng.choice(['Viola', 'Orsino', 'Feste'])}: " + " ".join(rng.choice(WORDS, 8, p=p)) for _ in range(n)]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def lm_task():
    """The lm task reading the synthetic corpus (--data is not read)."""
    from experiments.tasks import lm
    corpus = {"pretrain": speeches(0), "adapt_train": speeches(1), "adapt_test": speeches(2)}
    mp = pytest.MonkeyPatch()
    mp.setattr(lm.speeches, "lm_corpus", lambda path=None, *, encoding: corpus)
    yield lm
    mp.undo()


@pytest.fixture(scope="module")
def base_run(lm_task, tmp_path_factory):
    """Run A: the tiny base pre-trained, DyLoRA on it, evaluated at ranks 1 and 2."""
    out = tmp_path_factory.mktemp("reach") / "a"
    args = [*TINY, "--spec.variant", "dylora", "--spec.rank", "2", "--eval-ranks", "1", "2",
            "--no-export", "--out-dir", str(out)]
    return out, args, run.main(args)


def test_validation_split_results_and_a_shared_base(base_run):
    out, _, res = base_run
    stored = json.loads((out / "results.json").read_text())
    for key in ("val_loss", "test_loss", "lora_loss", "trainable", "steps", "lr", "opt_state_bytes", "rank_eval"):
        assert key in stored, key
    assert stored["test_loss"] == stored["lora_loss"] and stored["steps"] == 2
    assert stored["val_loss"] != stored["test_loss"]  # two splits
    # Adam's state (mu, nu) of the trainable float32 leaves plus counts
    assert 8 * stored["trainable"] <= stored["opt_state_bytes"] <= 8 * stored["trainable"] + 64
    assert (out / "base" / "char_tokenizer.json").is_file() and not (out / "peft_adapter").exists()
    assert stored["sample"] is None
    # the gain over the base on the test windows, with its paired SE (the demo's printed numbers)
    assert stored["gain"] == pytest.approx(stored["base_loss"] - stored["test_loss"], abs=1e-5)
    assert stored["gain_se"] > 0 and stored["base_loss_se"] > 0 and stored["test_loss_se"] > 0


def test_dylora_rank_eval(base_run):
    _, _, res = base_run
    ranks = res["rank_eval"]
    assert set(ranks) == {"1", "2"}
    # the full rank is the trained model itself
    assert ranks["2"]["val_loss"] == pytest.approx(res["val_loss"], rel=1e-5)
    assert ranks["1"]["val_loss"] != ranks["2"]["val_loss"]


@pytest.fixture(scope="module")
def ga_squeeze_run(base_run, tmp_path_factory):
    """Run B on A's base: LoRA-GA init, rsLoRA through --spec.options, dropout, eval ranks, squeeze + 1 more step."""
    base = base_run[0] / "base"
    out = tmp_path_factory.mktemp("reach") / "b"
    args = [*TINY, "--model", str(base), "--init", "lora_ga", "--init-batches", "1", "--spec.rank", "2",
            "--spec.options", "use_rslora=true", "--spec.dropout", "0.1", "--squeeze-to", "1", "--squeeze-steps", "1",
            "--out-dir", str(out)]
    return out, args, run.main(args)


def test_lora_ga_on_a_shared_base_then_squeeze(ga_squeeze_run, base_run):
    out, _, res = ga_squeeze_run
    assert res["init"] == "lora_ga" and res["model"] == str(base_run[0] / "base")
    assert res["base_val_loss"] == pytest.approx(base_run[2]["base_val_loss"], rel=1e-6)  # the same base
    sq = res["squeezed"]
    assert sq["rank"] == 1 and sq["steps"] == 1 and 0 < sq["trainable"] < res["trainable"]
    assert sq["val_loss"] > 0 and (out / "squeeze" / "metrics.jsonl").is_file()
    # the export is the rank-2r LoRA on the original base (LoRA-GA shifted it)
    config = json.loads((out / "peft_adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["use_rslora"] is True and config["lora_dropout"] == 0.1


def test_rerun_of_a_finished_run_trains_nothing(ga_squeeze_run):
    out, args, res = ga_squeeze_run
    metrics = {d: (out / d / "metrics.jsonl").read_text() for d in ("lora", "squeeze")}
    again = run.main(args)
    assert {d: (out / d / "metrics.jsonl").read_text() for d in ("lora", "squeeze")} == metrics
    for key in ("val_loss", "test_loss"):
        assert again[key] == res[key] and again["squeezed"][key] == res["squeezed"][key]


def test_sora_prunes_to_plain_lora_with_the_same_losses(base_run, tmp_path):
    args = [*TINY, "--model", str(base_run[0] / "base"), "--spec.variant", "sora", "--optim.name", "sora",
            "--spec.rank", "2", "--no-export", "--out-dir", str(tmp_path)]
    res = run.main(args)
    sora = res["sora"]
    assert sora["ranks_total"] == 2 * 2 * 2 and sora["ranks_kept"] >= 1  # 2 layers x (q, v) x rank 2
    # pruning is exact: the plain LoRA of the kept ranks is the same model
    assert sora["val_loss"] == pytest.approx(res["val_loss"], rel=1e-5)
    assert sora["test_loss"] == pytest.approx(res["test_loss"], rel=1e-5)


def test_galore_trains_every_weight_from_scratch(lm_task, tmp_path):
    args = [*TINY, "--model", "scratch", "--spec.variant", "full", "--optim.name", "galore",
            "--optim.galore-rank", "2", "--out-dir", str(tmp_path)]
    res = run.main(args)
    assert res["trainable"] == res["total"] > 100_000
    assert res["opt_state_bytes"] < 8 * res["trainable"] / 2  # far below Adam's two float32 moments
    assert res["val_loss"] < res["base_val_loss"]  # a random init learns character statistics
    assert (tmp_path / "model" / "model.safetensors").is_file() and not (tmp_path / "base").exists()


def test_compute_dtype_remat_and_attention_flags_reach_the_model(base_run, tmp_path, capsys):
    """bf16 compute + remat + scanned layers + the dense attention path: the same training in ~bf16 precision
    (f32 reference)."""
    common = [*TINY, "--model", str(base_run[0] / "base"), "--spec.rank", "2", "--no-export"]
    ref = run.main([*common, "--out-dir", str(tmp_path / "f32")])
    res = run.main([*common, "--compute-dtype", "bfloat16", "--remat", "nothing_saveable", "--attention", "dense",
                    "--scan-layers", "--ce-chunk", "24", "--out-dir", str(tmp_path / "bf16")])
    assert res["test_loss"] == pytest.approx(ref["test_loss"], rel=0.02)
    cfg = json.loads((tmp_path / "bf16" / "run_config.json").read_text())
    assert (cfg["compute_dtype"], cfg["attention"], cfg["scan_layers"], cfg["ce_chunk"]) == (
        "bfloat16", "dense", True, 24)
    with pytest.raises(SystemExit) as e:  # the chunked loss reads the base head: one line, exit code 2
        run.main([*common, "--spec.targets", "lm_head", "--ce-chunk", "8", "--out-dir", str(tmp_path / "head")])
    assert e.value.code == 2 and "adapted lm_head" in capsys.readouterr().err


@pytest.mark.slow  # CI budget (15 min): `make test-all` runs it; QLoRA itself: tests/test_quant.py (fit, PEFT parity)
def test_qlora_on_a_4bit_base(base_run, tmp_path):
    """--base-dtype nf4: LoRA trains on the NF4-quantised base (measured bytes recorded) and the merged sample
    path dequantises it; the quantised base alone stays close to the float base it came from."""
    res = run.main([*TINY, "--model", str(base_run[0] / "base"), "--spec.rank", "2", "--base-dtype", "nf4",
                    "--sample", "--out-dir", str(tmp_path)])
    base = res["quantized_base"]
    assert base["dtype"] == "nf4" and 0 < base["bytes"] < base["float32_bytes"]
    assert base["test_loss"] == pytest.approx(res["base_loss"], rel=0.05) and base["test_loss"] != res["base_loss"]
    assert np.isfinite(res["test_loss"]) and isinstance(res["sample"], str)
    config = json.loads((tmp_path / "peft_adapter" / "adapter_config.json").read_text())
    assert config["r"] == 2  # adapters exported against the float base's names and shapes


@pytest.fixture
def no_task(monkeypatch):
    def load_task(name):
        raise AssertionError(f"task {name!r} was loaded although the config is invalid")
    monkeypatch.setattr(run, "load_task", load_task)


def _error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        run.main(argv)
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.parametrize("flags,needle", [
    (["--spec.options", "use_rlsora=true"], "Did you mean ['use_rslora']"),
    (["--spec.options", "use_rslora"], "key=value"),
    (["--spec.variant", "vera", "--spec.options", "d_initial=x"], "--spec.options"),
    (["--init", "gaussian"], "--init"),
    (["--spec.variant", "dora", "--init", "pissa"], "--spec.variant lora"),
    (["--spec.variant", "vera", "--eval-ranks", "1"], "--eval-ranks"),
    (["--spec.rank", "4", "--eval-ranks", "2", "8"], "--eval-ranks"),
    (["--spec.rank", "4", "--squeeze-to", "4"], "--squeeze-to"),
    (["--squeeze-steps", "3"], "--squeeze-to"),
    (["--model", "/nonexistent/llama"], "--model"),
    (["--attention", "flash"], "--attention"),
    (["--remat", "everything"], "--remat"),
    (["--compute-dtype", "float16"], "--compute-dtype"),
    (["--ce-chunk", "-1"], "--ce-chunk"),
    (["--spec.dropout", "1.5"], "dropout must be a number in [0, 1)"),
    (["--base-dtype", "fp4"], "--base-dtype"),
    (["--base-dtype", "nf4", "--spec.variant", "full"], "--spec.variant full"),
], ids=["option-name", "option-pair", "option-value", "init", "init-variant", "eval-variant", "eval-rank",
        "squeeze-rank", "squeeze-steps-alone", "model-folder", "attention", "remat", "compute-dtype", "ce-chunk",
        "dropout", "base-dtype", "base-dtype-full"])
def test_bad_lm_flags_are_refused_before_loading(tmp_path, capsys, no_task, flags, needle):
    assert needle in _error(capsys, ["--task", "lm", "--out-dir", str(tmp_path / "o"), *flags])
    assert not (tmp_path / "o").exists()


def test_lm_model_folder_must_be_llama_family(tmp_path, capsys, no_task):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert "Llama-family" in _error(capsys, ["--task", "lm", "--model", str(tmp_path / "bert"),
                                             "--out-dir", str(tmp_path / "o")])


@pytest.mark.parametrize("flags", [["--init", "pissa"], ["--eval-ranks", "2"], ["--squeeze-to", "2"],
                                   ["--no-sample"], ["--max-val", "3"], ["--scan-layers"]])
def test_lm_flags_with_genre_are_refused(tmp_path, capsys, no_task, flags):
    line = _error(capsys, ["--task", "genre", "--out-dir", str(tmp_path / "o"), *flags])
    assert "is supported with --task lm" in line and flags[0] in line
