"""Hydra against numbers from the official code (tests/fixtures/hydra, see its README).

The fixture runs extremebird/Hydra ``vtab1k/hydra.py`` (``Hydra_layer`` in
``forward_vit_hydra_ffn`` on a ViT-style ``mlp.fc2`` and in
``forward_vit_hydra_attn`` on ``attn.proj``; ``reparameterize`` for the merged
weight) with random down- and up-projections and zero branch biases. PyTorch
layout there (``weight: [out, in]``); imported here as::

    hydra_par_A = par.down_proj.weightᵀ: [in, r_p]    hydra_par_B = par.up_proj.weightᵀ: [r_p, out]
    hydra_seq_A = seq.down_proj.weightᵀ: [out, r_s]   hydra_seq_B = seq.up_proj.weightᵀ: [r_s, out]

Official output: ``y = h + s (x A_p) B_p + s (h A_s) B_s`` with ``h = x W + b``.
lorajax's sequential branch sees ``x W`` (the paper's equation; a weight-to-weight
variant cannot carry the bias), so with a biased base layer the official output
is lorajax's plus the constant ``s · (b A_s) B_s`` — checked exactly below.
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import lorajax

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "fixtures", "hydra", "fixture.safetensors")
DATA = load_file(FIXTURE)
R_P, R_S, SCALE = 2, 3, 0.7
CASES = ("ffn", "ffn_bias", "attn")
RTOL, ATOL = 1e-5, 1e-5


class Layer(nn.Module):
    """The adapted layer alone, named ``layer``."""

    features: int
    use_bias: bool

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.features, use_bias=self.use_bias, name="layer")(x)


def _case(tag):
    d = {k.split(".", 1)[1]: v for k, v in DATA.items() if k.startswith(tag + ".")}
    kernel = d["kernel_pt"].T  # [in, out]
    params = {"params": {"layer": {"kernel": jnp.asarray(kernel)}}}
    if "bias" in d:
        params["params"]["layer"]["bias"] = jnp.asarray(d["bias"])
    model = Layer(kernel.shape[1], "bias" in d)
    spec = lorajax.Spec("hydra", rank=R_P, seq_rank=R_S, scale=SCALE, targets=["layer"])
    layout = lorajax.init(spec, params, jax.random.key(0))["params"]["layer"]["kernel"]
    adapter = {
        "hydra_par_A": d["par_down_pt"].T, "hydra_par_B": d["par_up_pt"].T,
        "hydra_seq_A": d["seq_down_pt"].T, "hydra_seq_B": d["seq_up_pt"].T,
    }
    for k, v in adapter.items():  # the official tensors have lorajax's layout once transposed
        assert v.shape == layout[k].shape and v.dtype == layout[k].dtype, (k, v.shape, layout[k].shape)
    adapters = {"params": {"layer": {"kernel": {k: jnp.asarray(v) for k, v in adapter.items()}}}}

    def wrapper(variables, x):
        return model.apply(variables, x)

    return d, params, spec, adapters, wrapper


def _bias_shift(d, adapter):
    """``s · (b A_s) B_s``: what the official sequential branch adds for a biased base layer."""
    if "bias" not in d:
        return 0.0
    return (SCALE * (jnp.asarray(d["bias"])[None, :] @ adapter["hydra_seq_A"]) @ adapter["hydra_seq_B"])[0]


@pytest.mark.parametrize("mode", ["factored", "merged"])
@pytest.mark.parametrize("tag", CASES)
def test_forward_and_gradients_match_the_official_code(tag, mode):
    d, params, spec, adapters, apply_fn = _case(tag)
    run = lorajax.adapt(apply_fn, spec, mode=mode)
    x, cot = jnp.asarray(d["base_in"]), jnp.asarray(d["cot"])

    def official_form(ad):
        """lorajax's output plus the documented bias shift (zero without a base bias)."""
        shift = _bias_shift(d, ad["params"]["layer"]["kernel"])
        return run(params, ad, x) + (shift[None, None, :] if "bias" in d else 0.0)

    y = run(params, adapters, x)
    if "bias" not in d:  # no base bias: lorajax's output is the official one as is
        np.testing.assert_allclose(np.asarray(y), d["y"], rtol=RTOL, atol=ATOL)
    else:  # with one: the outputs differ by exactly s · (b A_s) B_s, and it is not zero
        assert float(jnp.abs(_bias_shift(d, adapters["params"]["layer"]["kernel"])).max()) > 1e-2
    np.testing.assert_allclose(np.asarray(official_form(adapters)), d["y"], rtol=RTOL, atol=ATOL)
    grads = jax.grad(lambda ad: jnp.sum(official_form(ad) * cot))(adapters)["params"]["layer"]["kernel"]
    for ours, theirs in (("hydra_par_A", "par_down"), ("hydra_par_B", "par_up"),
                         ("hydra_seq_A", "seq_down"), ("hydra_seq_B", "seq_up")):
        np.testing.assert_allclose(np.asarray(grads[ours]), d[f"grad_{theirs}_pt"].T, rtol=RTOL, atol=ATOL,
                                   err_msg=f"{tag}: gradient of {ours}")


@pytest.mark.parametrize("tag", CASES)
def test_merged_weight_matches_reparameterize(tag):
    d, params, spec, adapters, _ = _case(tag)
    merged = lorajax.merge(spec, params, adapters)["params"]["layer"]
    np.testing.assert_allclose(np.asarray(merged["kernel"]), d["merged_weight_pt"].T, rtol=RTOL, atol=ATOL)
    if "bias" in d:  # reparameterize folds the shift into the bias; lorajax leaves the bias alone
        np.testing.assert_array_equal(np.asarray(merged["bias"]), d["bias"])
        shift = _bias_shift(d, adapters["params"]["layer"]["kernel"])
        np.testing.assert_allclose(d["bias"] + np.asarray(shift), d["merged_bias"], rtol=RTOL, atol=ATOL)
        # and the official merged layer reproduces the official forward
        y = d["base_in"] @ d["merged_weight_pt"].T + d["merged_bias"]
        np.testing.assert_allclose(y, d["y"], rtol=RTOL, atol=ATOL)
