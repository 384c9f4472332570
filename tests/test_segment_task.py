"""The segment task: TopoLoRA-SAM's trainable groups and counts, its loss, config refusals, launcher runs (slow)."""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax
from experiments.config import OptimConfig, RunConfig, SpecConfig
from experiments.tasks import segment
from experiments.validate import ConfigError, validate
from lorajax.cldice import cldice_loss, soft_dice_loss
from lorajax.models import segmenter, vit
from tests.launcher_kill import killed_and_resumed

ROOT = Path(__file__).parents[1]
CONFIG = ROOT / "experiments" / "configs" / "segment_curves.py"
TOY = vit.Config(
    hidden_size=16,
    num_hidden_layers=3,
    num_attention_heads=2,
    intermediate_size=64,
    image_size=16,
    patch_size=4,
    add_pooling_layer=False,
)


def _abstract(model, cfg=TOY):
    x = jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.num_channels))
    return jax.eval_shape(lambda: model.init(jax.random.key(0), x))


def test_lora_count_is_twice_layers_rank_d_plus_4d_on_the_mlp_only():
    """Spec §2: LoRA on (intermediate, output) dense at r=8 has 2·n_layers·8·(d + 4d) parameters."""
    variables = _abstract(segmenter.build(TOY, "topolora", embed_channels=8))  # shapes only: nothing compiled
    spec = segmenter.lora_spec()
    names = [w.name for w in spec.selection.resolve(variables["params"])]
    assert len(names) == 2 * TOY.num_hidden_layers
    assert not any("attention" in n for n in names)  # attention.output.dense is not adapted
    adapters = jax.eval_shape(lambda v: lorajax.init(spec, v, jax.random.key(0)), variables)
    d = TOY.hidden_size
    n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(adapters))
    assert n == 2 * TOY.num_hidden_layers * 8 * (d + 4 * d)


def test_conv_adapter_count_matches_topolora_sam():
    """C = h = 256, k = 3: 2,304 depthwise + 2·65,536 pointwise + 512 BN affine = 133,888 (spec §2)."""
    v = jax.eval_shape(lambda: segmenter.ConvAdapter().init(jax.random.key(0), jnp.zeros((1, 4, 4, 256))))
    assert segmenter.param_count(v["params"]) == 133_888
    assert jax.tree.map(lambda a: a.shape, v["batch_stats"]) == {"norm": {"mean": (256,), "var": (256,)}}


def test_arms_train_exactly_their_groups():
    params = {k: {"w": jnp.ones(1)} for k in ("image_encoder", "neck", "adapter", "decoder")}
    for arm, want in {"topolora": {"adapter", "decoder"}, "decoder": {"decoder"}}.items():
        trained, frozen = segmenter.groups(arm, params)
        assert set(trained) == want and set(frozen) == set(params) - want
    trained, frozen = segmenter.groups("full", {k: v for k, v in params.items() if k != "adapter"})
    assert set(trained) == {"image_encoder", "neck", "decoder"} and not frozen
    with pytest.raises(ValueError, match="arm must be one of"):
        segmenter.groups("lora_only", params)


def test_conv_adapter_equation_and_batchnorm_modes():
    """Residual DW -> PW -> BN -> GELU -> PW on random inputs (numpy reference), batch statistics in training."""
    from scipy.special import erf

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 5, 4)).astype(np.float32)
    fwd = jax.jit(  # one compile: init, a training-mode apply (mutable stats) and the zero_init_last variant
        lambda x: (
            (v := segmenter.ConvAdapter(hidden=6).init(jax.random.key(1), x)),
            segmenter.ConvAdapter(hidden=6).apply(v, x, train=True, mutable=["batch_stats"]),
            segmenter.ConvAdapter(hidden=6, zero_init_last=True).apply(
                segmenter.ConvAdapter(hidden=6, zero_init_last=True).init(jax.random.key(1), x), x
            ),
        )
    )
    v, (y, new), y0 = jax.tree.map(np.asarray, fwd(x))
    p = v["params"]
    dw = p["depthwise"]["kernel"]  # [3, 3, 1, C]
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    z = sum(xp[:, i : i + 5, j : j + 5, :] * dw[i, j, 0] for i in range(3) for j in range(3))
    h = z @ p["pointwise_in"]["kernel"][0, 0]
    mean, var = h.mean((0, 1, 2)), h.var((0, 1, 2))
    hn = (h - mean) / np.sqrt(var + 1e-5) * p["norm"]["scale"] + p["norm"]["bias"]
    gelu = 0.5 * hn * (1 + erf(hn / np.sqrt(2)))
    want = x + gelu @ p["pointwise_out"]["kernel"][0, 0]
    np.testing.assert_allclose(y, want, atol=1e-5)
    np.testing.assert_allclose(new["batch_stats"]["norm"]["mean"], 0.1 * mean, atol=1e-6)  # torch momentum 0.1
    assert np.abs(y - x).max() > 1e-3  # not the identity at init (zero_init_last=False, as Seglab)
    np.testing.assert_array_equal(y0, x)


def test_seg_loss_is_bce_plus_dice_plus_half_cldice():
    logits = jax.random.normal(jax.random.key(0), (2, 16, 16))
    masks = (jax.random.uniform(jax.random.key(1), (2, 16, 16)) > 0.7).astype(jnp.float32)
    p = jax.nn.sigmoid(logits)
    bce = -jnp.mean(masks * jnp.log(p) + (1 - masks) * jnp.log1p(-p))
    want = bce + soft_dice_loss(p, masks) + 0.5 * cldice_loss(p, masks, iters=segmenter.CLDICE_ITERS)
    np.testing.assert_allclose(segmenter.seg_loss(logits, masks), want, rtol=1e-5)
    with pytest.raises(ValueError, match=r"\[B, H, W\]"):
        segmenter.seg_loss(logits, masks[:1])


def test_check_images_names_the_expected_shape():
    cfg = segment.tiny_vit_config()
    imgs = np.zeros((2, 64, 64, 3), np.float32)
    segment.check_images(imgs, np.zeros((2, 64, 64)), cfg)
    with pytest.raises(ValueError, match=r"images must be \[n, 64, 64, 3\]"):
        segment.check_images(np.zeros((2, 32, 32, 3)), np.zeros((2, 32, 32)), cfg)
    with pytest.raises(ValueError, match=r"images must be \[n, 64, 64, 3\]"):
        segment.check_images(np.zeros((2, 64, 64, 1)), np.zeros((2, 64, 64)), cfg)
    with pytest.raises(ValueError, match="masks must be"):
        segment.check_images(imgs, np.zeros((3, 64, 64)), cfg)


def _cfg(**kw) -> RunConfig:
    base = RunConfig(task="segment", model="tiny", spec=SpecConfig(targets=segmenter.MLP_TARGETS))
    return dataclasses.replace(base, **kw)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(spec=SpecConfig(variant="dora")), "--spec.variant must be lora"),
        (dict(optim=OptimConfig(name="sgd")), "--optim.name must be one of adamw"),
        (dict(data="somewhere"), "--data is not read"),
        (dict(mesh="data=2"), "--mesh"),
        (dict(model="/no/such/folder"), "--model must be tiny or a HF ViT folder"),
    ],
)
def test_config_refusals(kw, match):
    with pytest.raises(ConfigError, match=match):
        segment.check_config(_cfg(**kw))


def test_config_refuses_a_non_vit_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ConfigError, match="takes a ViT"):
        segment.check_config(_cfg(model=str(tmp_path)))
    validate(_cfg(spec=SpecConfig(variant="none")))  # the decoder-only arm passes the whole launcher check


# ----------------------------------------------------------------------------- launcher runs (slow)


def _argv(out: Path, steps: int = 4) -> list[str]:
    return [
        "--config", str(CONFIG), "--out-dir", str(out), "--steps", str(steps), "--batch-size", "4",
        "--max-train", "16", "--max-test", "8", "--ckpt-every", "2", "--no-progress",
    ]  # fmt: skip


@pytest.mark.slow  # a launcher run (pre-training + LoRA) and a decoder-only run on its base: ~2 min on 2 cores
def test_launcher_end_to_end(tmp_path):
    from experiments.run import main, parse
    from experiments.segment_curves import one_run

    res = main(_argv(tmp_path / "run"))
    out = tmp_path / "run"
    assert res["arm"] == "topolora" and 0 <= res["dice"] <= 1 and 0 <= res["cldice"] <= 1 and res["betti0_error"] >= 0
    assert (out / "base" / segment.HEAD_FILE).is_file() and (out / "loss.png").is_file()
    assert "SYNTHETIC" in (out / "results.md").read_text()
    cfg = dataclasses.replace(
        parse(_argv(tmp_path / "dec")),
        model=str(out / "base"),
        spec=SpecConfig(variant="none", targets=segmenter.MLP_TARGETS),
    )
    res2 = one_run(cfg)  # the decoder-only arm on the saved base: no pre-training, the same base scores
    assert res2["arm"] == "decoder" and not (tmp_path / "dec" / "pretrain").exists()
    assert res2["base_dice"] == res["base_dice"] and res2["trainable"] < res["trainable"]


@pytest.mark.slow  # two launcher runs and a kill: ~3 min on 2 cores
def test_launcher_run_resumes_after_a_kill_with_the_same_results(tmp_path):
    got = tmp_path / "killed"  # killed in stage 2, after the base was saved
    a, b = killed_and_resumed(lambda out: _argv(out, steps=12), tmp_path / "ref", got, "train/metrics.jsonl")
    assert (got / "base" / segment.HEAD_FILE).is_file()
    for key in ("dice", "cldice", "betti0_error", "base_dice", "trainable", "final_loss"):
        assert a[key] == b[key], key
