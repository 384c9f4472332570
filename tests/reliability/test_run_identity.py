"""A run's config is stored in its out_dir; another config there is refused, naming the differing flags.

A stand-in task (records the config like the real ones, then writes a checkpoint folder and results) keeps
these tests in-process and model-free; the real tasks' use of `record` is covered by test_task_exports.py.
"""

import json
from pathlib import Path

import pytest

from experiments import run, run_identity
from experiments.config import RunConfig

ARGS = ["--task", "lm", "--steps", "3", "--spec.rank", "8", "--no-progress"]


class Task:
    """Writes what a task writes (run_config.json first, then a checkpoint and results); counts its runs."""
    def __init__(self):
        self.runs = []

    def run(self, cfg):
        run_identity.record(cfg)
        out = Path(cfg.out_dir)
        (out / "lora" / "checkpoints" / str(cfg.steps)).mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({"seed": cfg.seed, "rank": cfg.spec.rank}))
        self.runs.append(cfg)
        return {"out_dir": str(out)}


@pytest.fixture
def task(monkeypatch):
    t = Task()
    monkeypatch.setattr(run, "load_task", lambda name: t)
    return t


def refused(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        run.main(argv)
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_first_run_stores_its_config(tmp_path, task):
    out = tmp_path / "o"
    run.main([*ARGS, "--out-dir", str(out)])
    stored = json.loads((out / "run_config.json").read_text())
    assert stored["spec"]["rank"] == 8 and stored["steps"] == 3 and stored["task"] == "lm"
    assert stored == run_identity.as_json(task.runs[0])
    assert not list(out.glob(".*tmp-*"))  # written atomically, no temporary left


@pytest.mark.parametrize("change,named", [(["--spec.rank", "4"], "--spec.rank 8 -> 4"),
                                          (["--seed", "1"], "--seed 0 -> 1"),
                                          (["--steps", "5"], "--steps 3 -> 5"),
                                          (["--optim.lr", "0.01"], "--optim.lr 0.001 -> 0.01")])
def test_another_config_in_the_same_out_dir_is_refused(tmp_path, capsys, task, change, named):
    out = tmp_path / "o"
    run.main([*ARGS, "--out-dir", str(out)])
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    line = refused(capsys, [*ARGS, "--out-dir", str(out), *change])
    assert named in line and "--overwrite" in line, line
    assert len(task.runs) == 1  # the task never started
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_two_differing_fields_are_both_named(tmp_path, capsys, task):
    out = tmp_path / "o"
    run.main([*ARGS, "--out-dir", str(out)])
    line = refused(capsys, [*ARGS, "--out-dir", str(out), "--seed", "2", "--spec.rank", "2"])
    assert "--seed 0 -> 2" in line and "--spec.rank 8 -> 2" in line


def test_same_config_resumes_and_cadence_flags_are_not_identity(tmp_path, task):
    out = tmp_path / "o"
    run.main([*ARGS, "--out-dir", str(out)])
    stored = (out / "run_config.json").read_bytes()
    run.main([*ARGS, "--out-dir", str(out), "--ckpt-every", "1", "--eval-every", "7", "--keep", "5", "--progress"])
    assert len(task.runs) == 2
    assert (out / "run_config.json").read_bytes() == stored  # the first start's record stays


def test_overwrite_moves_the_old_run_aside_and_starts_afresh(tmp_path, capsys, task):
    out = tmp_path / "o"
    run.main([*ARGS, "--out-dir", str(out)])
    (out / "notes.txt").write_text("mine")  # not a run's file: stays
    old = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "notes.txt"}
    run.main([*ARGS, "--out-dir", str(out), "--spec.rank", "4", "--overwrite"])
    assert "moved to" in capsys.readouterr().out
    assert json.loads((out / "run_config.json").read_text())["spec"]["rank"] == 4
    assert (out / "notes.txt").read_text() == "mine"
    [aside] = tmp_path.glob("o.replaced-*")
    assert {p.relative_to(aside): p.read_bytes() for p in aside.rglob("*") if p.is_file()} == old


def test_resume_never(tmp_path, capsys, task):
    out = tmp_path / "o"
    run.main([*ARGS, "--out-dir", str(out), "--resume", "never"])  # nothing there yet: fine
    line = refused(capsys, [*ARGS, "--out-dir", str(out), "--resume", "never"])
    assert "--resume never" in line and str(out) in line
    assert len(task.runs) == 1


def test_resume_must(tmp_path, capsys, task):
    out = tmp_path / "o"
    line = refused(capsys, [*ARGS, "--out-dir", str(out), "--resume", "must"])
    assert "--resume must" in line and "no run" in line
    assert not out.exists() and not task.runs
    run.main([*ARGS, "--out-dir", str(out)])
    run.main([*ARGS, "--out-dir", str(out), "--resume", "must"])  # checkpoints and results there: resumes
    assert len(task.runs) == 2
    for p in (out / "lora", out / "results.json"):  # a recorded run that never reached a checkpoint
        p.rename(tmp_path / p.name)
    assert "--resume must" in refused(capsys, [*ARGS, "--out-dir", str(out), "--resume", "must"])


def test_a_run_of_unknown_config_is_refused(tmp_path, capsys, task):
    """An out_dir of an older launcher (results, no run_config.json) is not silently re-attributed."""
    out = tmp_path / "o"
    (out / "lora" / "checkpoints" / "3").mkdir(parents=True)
    (out / "results.md").write_text("# old\n")
    line = refused(capsys, [*ARGS, "--out-dir", str(out)])
    assert "run_config.json" in line and "--overwrite" in line
    assert not task.runs and (out / "results.md").read_text() == "# old\n"
    run.main([*ARGS, "--out-dir", str(out), "--overwrite"])
    assert len(task.runs) == 1 and not (out / "results.md").exists()


def test_a_hand_supplied_base_alone_is_not_a_run(tmp_path, task):
    out = tmp_path / "o"
    (out / "base").mkdir(parents=True)
    (out / "base" / "config.json").write_text("{}")
    run.main([*ARGS, "--out-dir", str(out)])
    assert len(task.runs) == 1 and (out / "base" / "config.json").exists()


def test_fields_added_later_take_their_defaults(tmp_path, task):
    """A run_config.json written before a field existed matches a run that keeps that field's default."""
    out = tmp_path / "o"
    run.main([*ARGS, "--out-dir", str(out)])
    stored = json.loads((out / "run_config.json").read_text())
    del stored["encoding"], stored["on_nonfinite"]
    (out / "run_config.json").write_text(json.dumps(stored))
    run.main([*ARGS, "--out-dir", str(out)])
    assert len(task.runs) == 2


def test_an_input_that_fails_to_load_leaves_no_out_dir(tmp_path, capsys, monkeypatch):
    """The tasks record the config only once their inputs are loaded: a bad file writes nothing."""
    class Failing:
        def run(self, cfg):
            raise ValueError("comedy_gut.txt yields no speeches")
    monkeypatch.setattr(run, "load_task", lambda name: Failing())
    out = tmp_path / "o"
    assert "comedy_gut.txt" in refused(capsys, [*ARGS, "--out-dir", str(out)])
    assert not out.exists()


def test_differences_and_identity_fields():
    a = run_identity.as_json(RunConfig(task="lm"))
    b = run_identity.as_json(RunConfig(task="lm", out_dir="elsewhere", progress=False, mesh="data=2", keep=9))
    assert run_identity.differences(a, b) == []
    c = run_identity.as_json(RunConfig(task="lm", encoding="latin-1", on_nonfinite="skip"))
    assert run_identity.differences(a, c) == ["--encoding 'utf-8' -> 'latin-1'",
                                              "--on-nonfinite 'stop' -> 'skip'"]
