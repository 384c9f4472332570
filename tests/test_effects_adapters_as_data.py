"""The effects ``perk`` and ``adapter_library``: declarations, and their runners' one-run entries (cheap sizes)."""

import json
from pathlib import Path

import pytest

from experiments import adapter_library, effects, perk_toy
from experiments.effect_list import EFFECTS

BY_NAME = {e.name: e for e in EFFECTS}
RUNNERS = {"perk": perk_toy, "adapter_library": adapter_library}


@pytest.mark.parametrize("name", sorted(RUNNERS))
def test_declaration_matches_its_runner(name, tmp_path):
    e = BY_NAME[name]
    assert e.runner == f"experiments.{RUNNERS[name].__name__.split('.')[-1]}" and not e.shared_base
    assert e.seeds >= 3 and e.contrasts and all(c.terms for c in e.contrasts)
    for arm in e.arms:  # every arm's launcher command line parses, with the flags it names
        for lr in arm.lrs or e.lrs:
            argv = effects.launcher_argv(e, arm, lr, 0, tmp_path / arm.name, effects.Sweep(tmp_path))
            args = RUNNERS[name].parse_run(argv)
            assert args.method == arm.name and args.steps == e.steps and args.lr == lr and args.seed == 0
    keys = {key for c in e.contrasts for _, key, _ in c.terms} | set(e.report)
    assert keys <= {"test_accuracy", "no_context_test_accuracy", "val_accuracy", "test_loss", "base_test_loss"}


@pytest.mark.parametrize("module", [perk_toy, adapter_library])
@pytest.mark.parametrize("bad", [["--steps", "0"], ["--optim.lr", "-1"], ["--method", "nope"]])
def test_runner_rejects_bad_flags(module, bad, tmp_path, capsys):
    argv = ["--method", "ttt" if module is perk_toy else "base", "--out-dir", str(tmp_path), *bad]
    with pytest.raises(SystemExit) as e:
        module.main(argv)
    assert e.value.code == 2 and bad[0] in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize("method", ["perk", "ttt"])
def test_perk_run_writes_the_metrics_the_contrasts_read(method, tmp_path, monkeypatch):
    """results.json holds each evaluation where the contrasts look for it (the evaluations are stubbed: the
    compiled inner loop costs ~30 s on the shared CPU; the harness's runs exercise it)."""
    calls = []

    def fake_eval(params, meta, ctxs, adapt_steps):  # a distinct value per (adapter, split, inner loop)
        calls.append((meta, len(ctxs["answers"]), adapt_steps))
        return 0.01 * len(calls)

    def fake_meta_train(params, plain, seed, meta_steps, lr):
        assert (seed, meta_steps, lr) == (1, 7, 0.002)
        return {**plain, "trained": True}, [(0, 1.0, 2.0, 1.5)]

    monkeypatch.setattr(perk_toy, "pretrain", lambda params, seed: (params, 0.5))
    monkeypatch.setattr(perk_toy, "eval_all", fake_eval)
    monkeypatch.setattr(perk_toy, "meta_train", fake_meta_train)
    monkeypatch.setattr(perk_toy, "build", lambda seed: {"params": {}})
    monkeypatch.setattr(perk_toy.lorajax, "init", lambda spec, params, key: {"lora_A": perk_toy.jnp.zeros(2)})
    out = tmp_path / method
    argv = ["--method", method, "--steps", "7", "--optim.lr", "0.002", "--seed", "1", "--out-dir", str(out)]
    perk_toy.main(argv + ["--task", "perk_toy", "--eval-every", "7", "--ckpt-every", "3", "--no-progress"])
    r = json.loads((out / "results.json").read_text())
    by_call = {(("trained" in m), n, a): 0.01 * (i + 1) for i, (m, n, a) in enumerate(calls)}
    adapted = method == "perk"  # the arm's adapter: meta-learned (perk) or the standard init at the run's lr
    assert r["test_accuracy"] == pytest.approx(by_call[adapted, perk_toy.N_TEST, True])
    assert r["val_accuracy"] == pytest.approx(by_call[adapted, perk_toy.N_VAL, True])
    assert r["val_error"] == pytest.approx(1.0 - r["val_accuracy"])
    assert r["base_no_context_test_accuracy"] == pytest.approx(by_call[False, perk_toy.N_TEST, False])
    if method == "perk":
        assert r["meta_steps"] == 7 and r["meta_curve"] == [[0, 1.0, 2.0, 1.5]]
        assert r["no_context_test_accuracy"] == pytest.approx(by_call[True, perk_toy.N_TEST, False])
    else:
        assert r["meta_steps"] == 0 and "no_context_test_accuracy" not in r
        log_lrs = [perk_toy.np.ravel(x) for m, n, a in calls if a for x in perk_toy.jax.tree.leaves(m["log_lr"])]
        assert log_lrs and all(x == pytest.approx(perk_toy.np.log(0.002)) for x in log_lrs)  # the run's inner lr
    assert (out / "results.md").exists()


BASE = Path(__file__).resolve().parents[1] / adapter_library.BASE


@pytest.mark.skipif(not (BASE / "config.json").exists(), reason="needs the committed effects base")
def test_adapter_library_base_run_writes_its_metrics(tmp_path, monkeypatch):
    monkeypatch.setattr(adapter_library, "EVAL_WINDOWS", 2)
    out = tmp_path / "run"
    adapter_library.main(["--method", "base", "--model", str(BASE), "--out-dir", str(out), "--seed", "3"])
    r = json.loads((out / "results.json").read_text())
    losses = list(r["held_loss"].values())
    assert len(losses) == len(adapter_library.HELD_OUT) and all(0.5 < x < 5.0 for x in losses)
    assert r["test_loss"] == pytest.approx(sum(losses) / len(losses)) == pytest.approx(r["base_test_loss"])
