"""`lorajax.rank_tools.truncate`: a truncated adapter is the rank-b slice and gives the rank-b model.

Rank-b models (Flax orientation, ``A: [in, r]``, ``B: [r, out]``)::

    dylora: W + (α/b) · A[:, :b] B[:b]      (DyLoRA evaluated at b)
    lora:   W + s · A[:, :b] B[:b],  s = α/r (α/√r with use_rslora): the trained scale is kept
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax
from lorajax.rank_tools import truncate

ALPHA = 6.0


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(9, name="q")(x)
        return nn.Dense(8, use_bias=False, name="v")(jax.nn.relu(h))


MODEL = Net()


def _setup(variant, rank=4, **kw):
    x = jax.random.normal(jax.random.key(0), (5, 10))
    variables = MODEL.init(jax.random.key(1), x)
    spec = lorajax.Spec(variant, rank=rank, alpha=ALPHA, targets=["q", "v"], **kw)
    ad = lorajax.init(spec, variables, jax.random.key(2))
    # random B (B = 0 at init would make every check trivial)
    ad = jax.tree_util.tree_map_with_path(
        lambda p, a: jax.random.normal(jax.random.key(len(jax.tree_util.keystr(p))), a.shape, a.dtype)
        if "lora_B" in jax.tree_util.keystr(p) else a, ad)
    return spec, variables, x, ad


def _kernel(tree, name):
    return np.asarray(tree["params"][name]["kernel"], np.float64)


@pytest.mark.parametrize("b", [1, 2, 3, 4])
def test_dylora_truncation_is_the_slice_and_the_rank_b_model(b):
    spec, variables, x, ad = _setup("dylora")
    spec_b, ad_b = truncate(spec, ad, b)
    assert spec_b.rank == b and spec_b.alpha == ALPHA and spec_b.options["eval_rank"] is None
    for name in ("q", "v"):
        full, cut = ad["params"][name]["kernel"], ad_b["params"][name]["kernel"]
        np.testing.assert_array_equal(np.asarray(cut["lora_A"]), np.asarray(full["lora_A"])[:, :b])
        np.testing.assert_array_equal(np.asarray(cut["lora_B"]), np.asarray(full["lora_B"])[:b])
    # the rank-b model: the original adapter evaluated at eval_rank=b ...
    spec_eval = spec.replace(eval_rank=b)
    merged_b = lorajax.merge(spec_b, variables, ad_b)
    merged_eval = lorajax.merge(spec_eval, variables, ad)
    for name in ("q", "v"):
        w = _kernel(variables, name)
        a = np.asarray(ad["params"][name]["kernel"]["lora_A"], np.float64)
        bb = np.asarray(ad["params"][name]["kernel"]["lora_B"], np.float64)
        want = w + (ALPHA / b) * a[:, :b] @ bb[:b]   # ... and the equation
        np.testing.assert_allclose(_kernel(merged_b, name), want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(_kernel(merged_eval, name), want, rtol=1e-5, atol=1e-5)
    y_b = lorajax.adapt(MODEL.apply, spec_b)(variables, ad_b, x)
    y_eval = lorajax.adapt(MODEL.apply, spec_eval)(variables, ad, x)
    np.testing.assert_allclose(np.asarray(y_b), np.asarray(y_eval), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("b", [1, 3, 4])
def test_lora_truncation_keeps_the_scale(b, use_rslora):
    spec, variables, x, ad = _setup("lora", use_rslora=use_rslora)
    spec_b, ad_b = truncate(spec, ad, b)
    assert spec_b.rank == b and spec_b.options["use_rslora"] == use_rslora
    s = ALPHA / (math.sqrt(4) if use_rslora else 4)
    merged = lorajax.merge(spec_b, variables, ad_b)
    for name in ("q", "v"):
        full, cut = ad["params"][name]["kernel"], ad_b["params"][name]["kernel"]
        np.testing.assert_array_equal(np.asarray(cut["lora_A"]), np.asarray(full["lora_A"])[:, :b])
        np.testing.assert_array_equal(np.asarray(cut["lora_B"]), np.asarray(full["lora_B"])[:b])
        a, bb = np.asarray(full["lora_A"], np.float64), np.asarray(full["lora_B"], np.float64)
        want = _kernel(variables, name) + s * a[:, :b] @ bb[:b]
        np.testing.assert_allclose(_kernel(merged, name), want, rtol=1e-5, atol=1e-5)
    if b == 4:  # full rank: the same model
        y = lorajax.adapt(MODEL.apply, spec)(variables, ad, x)
        y_b = lorajax.adapt(MODEL.apply, spec_b)(variables, ad_b, x)
        np.testing.assert_allclose(np.asarray(y_b), np.asarray(y), rtol=1e-5, atol=1e-5)


def test_lora_with_rank_pattern_gets_per_target_alpha():
    spec, variables, x, ad = _setup("lora", rank=4, rank_pattern={"v": 6}, alpha_pattern={"q": 3.0})
    assert ad["params"]["v"]["kernel"]["lora_A"].shape == (9, 6)
    spec_b, ad_b = truncate(spec, ad, 2)
    assert spec_b.rank == 2 and not spec_b.rank_pattern
    merged = lorajax.merge(spec_b, variables, ad_b)
    for name, r, alpha in (("q", 4, 3.0), ("v", 6, ALPHA)):
        full = ad["params"][name]["kernel"]
        a, bb = np.asarray(full["lora_A"], np.float64), np.asarray(full["lora_B"], np.float64)
        want = _kernel(variables, name) + (alpha / r) * a[:, :2] @ bb[:2]
        np.testing.assert_allclose(_kernel(merged, name), want, rtol=1e-5, atol=1e-5)


def test_dylora_with_rank_pattern():
    spec, variables, x, ad = _setup("dylora", rank=4, rank_pattern={"v": 6})
    spec_b, ad_b = truncate(spec, ad, 3)
    merged = lorajax.merge(spec_b, variables, ad_b)
    want = lorajax.merge(spec.replace(eval_rank=3), variables, ad)
    for name in ("q", "v"):
        np.testing.assert_allclose(_kernel(merged, name), _kernel(want, name), rtol=1e-5, atol=1e-5)


def test_bare_params_and_no_mutation():
    params = {"q": {"kernel": jnp.ones((6, 5))}}
    spec = lorajax.Spec("dylora", rank=3, targets=["q"])
    ad = lorajax.init(spec, params, jax.random.key(0))
    before = jax.tree_util.tree_map(np.asarray, ad)
    _, ad_b = truncate(spec, ad, 1)
    assert ad_b["q"]["kernel"]["lora_A"].shape == (6, 1)
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.tree_util.tree_map(np.asarray, ad), before)


def test_errors():
    spec, variables, x, ad = _setup("dylora", rank=4, rank_pattern={"v": 2})
    with pytest.raises(ValueError, match="rank 2 of the adapter at params/v/kernel"):
        truncate(spec, ad, 3)  # fits q (rank 4), not v (rank 2)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="rank"):
            truncate(spec, ad, bad)
    spec_s = lorajax.Spec("sora", rank=4, targets=["q"])
    with pytest.raises(ValueError, match="truncate supports"):
        truncate(spec_s, lorajax.init(spec_s, variables, jax.random.key(0)), 2)
