"""Launcher task "protein": config refusals, the FLOP count against its formula, the tag experiment, resume."""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

import lorajax
from experiments.config import RunConfig, SpecConfig
from experiments.tasks import protein
from experiments.validate import ConfigError, validate
from lorajax.models import llama
from tests.launcher_kill import killed_and_resumed

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "experiments" / "configs" / "protein_tags.py"


def _cfg(**kw) -> RunConfig:
    base = RunConfig(task="protein", model="tiny", spec=SpecConfig(targets="all-linear"), out_dir="/tmp/unused")
    return dataclasses.replace(base, **kw)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"model": "/some/folder"}, "--model: the protein task pre-trains its own"),
        ({"data": "x.tar.gz"}, "--data"),  # validate's existence check or the task's refusal
        ({"max_train": 10}, "--max-train"),
        ({"max_length": 40}, "--max-length must be >= 53"),
        ({"mesh": "data=1"}, "--mesh"),
        ({"spec": SpecConfig(targets=("query", "value"))}, r"--spec.targets .*'query' matches no weight"),
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
    assert (cfg.task, cfg.spec.rank, cfg.spec.alpha, cfg.optim.lr, cfg.steps) == ("protein", 8, 16.0, 3e-3, 300)


def test_generation_flops_equal_the_formula():
    """HLO count = (prompt + new - 1) tokens x [2·Σ in·out + 4·H·hd·slots per layer] (+ 2·r·(in+out) per target)."""
    d, f, v, layers, heads, kv = 16, 24, 11, 1, 2, 1
    cfg = llama.Config(
        vocab_size=v,
        hidden_size=d,
        intermediate_size=f,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=32,
    )
    model = llama.build(cfg)
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]  # abstract
    prompt, new = 3, 6
    slots, tokens, hd = prompt + new, prompt + new - 1, d // heads
    kernels = d * d + 2 * d * kv * hd + d * d + 3 * d * f
    per_token = 2 * layers * kernels + 2 * d * v + layers * 4 * heads * hd * slots

    def plain(p, ids, **kw):
        return model.apply({"params": p}, ids, **kw)

    assert protein.generation_flops(plain, params, cfg, prompt, new, batch=4) == tokens * per_token
    spec = lorajax.Spec("lora", rank=3, targets="all-linear")
    adapters = jax.eval_shape(lambda p: lorajax.init(spec, {"params": p}, jax.random.key(1)), params)
    fwd = lorajax.adapt(model.apply, spec, mode="factored")
    lora_extra = 2 * 3 * layers * (2 * (d + d) + 2 * (d + kv * hd) + 3 * (d + f))  # q, o; k, v; gate, up, down

    def adapted(pa, ids, **kw):
        return fwd({"params": pa[0]}, pa[1], ids, **kw)

    got = protein.generation_flops(adapted, (params, adapters), cfg, prompt, new, batch=4)
    assert got == tokens * (per_token + lora_extra)


@pytest.mark.slow
def test_tag_experiment_lora_makes_generation_honour_the_tag(tmp_path):
    """The spec's synthetic-tag experiment (seed 0): oracle accuracy <= 0.4 before LoRA and >= 0.9 after."""
    from experiments.run import main

    res = main(["--config", str(CONFIG), "--out-dir", str(tmp_path / "run"), "--no-baseline", "--no-progress"])
    assert res["arms"]["base"]["tag_accuracy"] <= 0.4
    assert res["arms"]["lora"]["tag_accuracy"] >= 0.9
    assert res["arms"]["lora"]["perplexity"] < res["arms"]["base"]["perplexity"]
    assert 0 < res["arms"]["lora"]["trainable"] < res["base_params"]


def _resume_argv(out: Path) -> list[str]:
    return [
        "--config",
        str(CONFIG),
        "--out-dir",
        str(out),
        "--steps",
        "30",
        "--batch-size",
        "8",
        "--max-test",
        "4",
        "--ckpt-every",
        "5",
        "--no-progress",
    ]


@pytest.mark.slow
def test_launcher_run_resumes_after_a_kill_with_the_same_results(tmp_path):
    got = tmp_path / "killed"  # killed in stage 2, after the base was saved
    a, b = killed_and_resumed(_resume_argv, tmp_path / "ref", got, "lora/metrics.jsonl")
    assert (got / "base" / protein.TOKENIZER_FILE).is_file()
    for arm in ("base", "lora", "full"):
        for key in ("tag_accuracy", "perplexity", "valid_rate", "flops_per_sequence", "samples"):
            assert a["arms"][arm][key] == b["arms"][arm][key], (arm, key)
    assert (got / "loss.png").is_file() and "SYNTHETIC" in (got / "results.md").read_text()
