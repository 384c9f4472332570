"""Launcher task "vqa": config refusals, the VLM under LoRA on all three groups, bad input, end to end, resume."""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax
from experiments.config import OptimConfig, RunConfig, SpecConfig
from experiments.tasks import vqa
from experiments.validate import ConfigError, validate
from lorajax.data import scenes
from lorajax.models import vlm
from tests.launcher_kill import killed_and_resumed

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "experiments" / "configs" / "vqa_scenes.py"


def _cfg(**kw) -> RunConfig:
    base = RunConfig(task="vqa", model="tiny", spec=SpecConfig(targets=("vision", "lm")), out_dir="/tmp/unused")
    return dataclasses.replace(base, **kw)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"spec": SpecConfig(targets=("vision", "text"))}, r"--spec.targets entries must be groups .*'text'"),
        ({"spec": SpecConfig(targets=("lm", "lm:2"))}, "names group 'lm' twice"),
        ({"spec": SpecConfig(targets=("lm:fast",))}, "multiplier must be a number"),
        ({"spec": SpecConfig(variant="dora", targets=("lm",))}, "--spec.variant lora"),
        ({"optim": OptimConfig(name="sgd")}, "adamw"),
        ({"model": "/no/such/folder"}, "--model must be one of tiny"),
        ({"mesh": "data=1"}, "--mesh"),
        ({"init": "pissa"}, "--init is supported with --task lm"),
    ],
)
def test_config_refusals(fields, message):
    with pytest.raises(ConfigError, match=message):
        validate(_cfg(**fields))


def test_the_committed_config_is_valid():
    from experiments.run import load_config

    cfg = load_config(str(CONFIG))
    validate(cfg)
    assert (cfg.spec.rank, cfg.spec.alpha, cfg.spec.targets) == (64, 16.0, ("vision", "projector", "lm"))
    assert vqa.rules(cfg).mults() == {"vision": 1.0, "projector": 1.0, "lm": 1.0}
    assert vqa.parse_groups(("vision:0.1", "lm")) == {"vision": 0.1, "lm": 1.0}


@pytest.fixture(scope="module")
def tiny():
    cfg = vlm.tiny_config(scenes.TOKENIZER.vocab_size, image_size=16, patch_size=8, width=16, heads=2)
    model = vlm.VLM(cfg)
    d = scenes.make(3, seed=0, size=16)
    x, q = jnp.asarray(d["images"]), jnp.asarray(d["questions"])
    params = jax.jit(model.init)(jax.random.key(0), x, q)
    return model, params, x, q


def test_lora_on_all_three_groups_factored_equals_merged(tiny):
    model, params, x, q = tiny
    cfg = _cfg(spec=SpecConfig(rank=4, alpha=8.0, targets=("vision:0.1", "projector", "lm")))
    g = vqa.rules(cfg).apply(params, jax.random.key(1))
    assert set(g.report.counts) == {"vision", "projector", "lm"}
    names = [n for ns in g.report.matched.values() for n in ns]
    assert "vision.encoder.layer.1.output.dense" in names and "projector.linear_2" in names
    assert "lm.model.layers.0.self_attn.q_proj" in names and "lm.lm_head" not in names
    # B != 0 in every group so each group changes the output
    a = jax.tree_util.tree_map(lambda t: t + 0.05 * jnp.cos(jnp.arange(t.size).reshape(t.shape)), g.adapters)
    factored = jax.jit(lorajax.adapt(model.apply, g.spec, mode="factored"))
    fac = factored(params, a, x, q)
    mer = jax.jit(lorajax.adapt(model.apply, g.spec, mode="merged"))(params, a, x, q)
    np.testing.assert_allclose(fac, mer, rtol=1e-4, atol=1e-5)
    zero = jax.tree_util.tree_map(jnp.zeros_like, a)
    base = factored(params, zero, x, q)  # zero adapters: the base model
    for grp in ("vision", "projector", "lm"):  # adapters of one group alone move the logits
        only = {"params": {**zero["params"], grp: a["params"][grp]}}
        assert not np.allclose(factored(params, only, x, q), base, atol=1e-4), grp


def test_bad_input_is_refused(tiny):
    model, params, x, q = tiny
    with pytest.raises(ValueError, match=r"images must be \[batch, 16, 16, 3\]"):
        model.apply(params, jnp.zeros((3, 32, 32, 3)), q)
    with pytest.raises(ValueError, match=r"images must be \[batch, 16, 16, 3\]"):
        model.apply(params, jnp.zeros((3, 16, 16, 1)), q)
    with pytest.raises(ValueError, match="'elephant' is not in the vocabulary"):
        scenes.TOKENIZER.question("is there a elephant ?")
    rules = vqa.Rules([vqa.Rule(r"vision\.decoder\..*", "vision")])
    with pytest.raises(ValueError, match="rules matched nothing"):
        rules.apply(params, 0)


def _argv(out: Path, steps: int = 4) -> list[str]:
    return [
        "--config",
        str(CONFIG),
        "--out-dir",
        str(out),
        "--steps",
        str(steps),
        "--batch-size",
        "8",
        "--max-train",
        "64",
        "--max-test",
        "50",
        "--eval-every",
        "2",
        "--ckpt-every",
        "2",
        "--no-progress",
    ]


@pytest.mark.slow  # two launcher runs (stage 1 + 2, then stage 2 on the saved base): 45 s on 2 busy cores
def test_launcher_end_to_end(tmp_path):
    from experiments.run import main

    res = main(_argv(tmp_path / "run"))
    assert 0 <= res["test_acc"] <= 1 and 0 <= res["frozen_test_acc"] <= 1
    assert set(res["trainable"]) == {"vision", "projector", "lm"}
    out = tmp_path / "run"
    assert (out / "base" / vqa.WEIGHTS).is_file() and (out / "loss.png").is_file()
    assert "SYNTHETIC" in (out / "results.md").read_text()
    # a second run on the saved base (the lm_only arm) pre-trains nothing and sees the same frozen model
    res2 = main([*_argv(tmp_path / "lm_only"), "--model", str(out / "base"), "--spec.targets", "lm"])
    assert res2["frozen"] == res["frozen"] and set(res2["trainable"]) == {"lm"}
    assert not (tmp_path / "lm_only" / "pretrain").exists()


@pytest.mark.slow  # three launcher runs and a kill: 4.6 min on 2 busy cores
def test_launcher_run_resumes_after_a_kill_with_the_same_results(tmp_path):
    got = tmp_path / "killed"  # killed in stage 2, after the base was saved
    a, b = killed_and_resumed(lambda out: _argv(out, steps=12), tmp_path / "ref", got, "lora/metrics.jsonl")
    assert (got / "base" / vqa.WEIGHTS).is_file()
    for key in ("after", "frozen", "trainable", "val_acc", "test_acc"):
        assert a[key] == b[key], key
