"""LoLDU against numbers from the official code (tests/fixtures/loldu, SKDDJ/LoLDU @ 4fe87a05).

The fixture holds, per case, the official layer's factors (``P``, ``L = lora_B``,
``U = lora_A``), its perturbed ``vector_z``, the parametrized weight, the layer
output and the gradients of ``sum(y * g)`` (PyTorch orientation ``[out, in]``).
lorajax imports the factors (`loldu.from_ldu`) and must give the same ``W'``
(``K' = W'ᵀ``), outputs and gradients; its own LDU of the same weight must give
the same factors.
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
from lorajax.variants import loldu

PATH = os.path.join(os.path.dirname(__file__), "..", "fixtures", "loldu", "fixture.safetensors")
CASES = {"wide": (3, 2.0), "tall": (4, 2.0), "square": (7, 1.0)}  # rank, alpha (see README.md)
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def fx():
    return load_file(PATH)


def _case(fx, name):
    return {k.split(".", 1)[1]: v for k, v in fx.items() if k.startswith(name + ".")}


class Net(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.features, name="layer")(x)


def _setup(c, name, **options):
    rank, alpha = CASES[name]
    model = Net(c["w"].shape[0])
    params = {"params": {"layer": {"kernel": jnp.asarray(c["w"].T), "bias": jnp.asarray(c["bias"])}}}
    spec = lorajax.Spec("loldu", rank=rank, alpha=alpha, targets=["layer"], **options)
    adapters = lorajax.init(spec, params, jax.random.key(0))
    return model, params, spec, adapters


def _imported(c, sigma=None):
    return loldu.from_ldu(c["P"], c["L"], c["U"], c["d_r"], c["z"], sigma=sigma)


@pytest.mark.parametrize("name", sorted(CASES))
def test_official_sigma_and_residual(fx, name):
    c = _case(fx, name)
    rank, alpha = CASES[name]
    np.testing.assert_allclose(c["sigma"][0], alpha / rank, rtol=1e-7)
    # the official residual: W − σ P L_r diag(D_r) Ũ_r
    want = c["w"] - c["sigma"][0] * (c["P"] @ c["L"] @ np.diag(c["d_r"]) @ c["U"])
    np.testing.assert_allclose(c["w_res"], want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", sorted(CASES))
def test_imported_factors_give_official_weight_and_outputs(fx, name):
    c = _case(fx, name)
    model, params, spec, adapters = _setup(c, name)
    adapters["params"]["layer"]["kernel"] = _imported(c)
    merged = lorajax.merge(spec, params, adapters)
    np.testing.assert_allclose(np.asarray(merged["params"]["layer"]["kernel"]), c["w_merged"].T, rtol=RTOL, atol=ATOL)
    x = jnp.asarray(c["x"])
    for mode in ("factored", "merged"):
        y = lorajax.adapt(model.apply, spec, mode=mode)(params, adapters, x)
        np.testing.assert_allclose(np.asarray(y), c["y"], rtol=RTOL, atol=ATOL, err_msg=mode)


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradients_match_official(fx, name):
    """d sum(y·g) / dz, and / dσ with train_sigma=True (σ z − σ₀ d0 has the official σ-gradient)."""
    c = _case(fx, name)
    model, params, spec, adapters = _setup(c, name, train_sigma=True)
    adapters["params"]["layer"]["kernel"] = _imported(c, sigma=c["sigma"][0])
    x, g = jnp.asarray(c["x"]), jnp.asarray(c["g"])
    trainable, frozen = lorajax.partition(spec, adapters)
    for mode in ("factored", "merged"):
        fwd = lorajax.adapt(model.apply, spec, mode=mode)
        grads = jax.grad(lambda tr: jnp.sum(fwd(params, lorajax.combine(tr, frozen), x) * g))(trainable)
        leaf = grads["params"]["layer"]["kernel"]
        np.testing.assert_allclose(np.asarray(leaf["loldu_z"]), c["grad_z"], rtol=RTOL, atol=ATOL, err_msg=mode)
        np.testing.assert_allclose(float(leaf["loldu_sigma"]), c["grad_sigma"][0], rtol=RTOL, err_msg=mode)


@pytest.mark.parametrize("name", sorted(CASES))
def test_own_decomposition_matches_official(fx, name):
    """lorajax's LDU of the kernel's transpose gives the official P, L_r, D_r, Ũ_r."""
    c = _case(fx, name)
    _, params, spec, adapters = _setup(c, name)
    ad = adapters["params"]["layer"]["kernel"]
    np.testing.assert_array_equal(np.asarray(ad["loldu_perm"]), np.argmax(c["P"], axis=1))
    np.testing.assert_allclose(np.asarray(ad["loldu_L"]), c["L"].T, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(ad["loldu_U"]), c["U"].T, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(ad["loldu_d0"]), c["d_r"], rtol=RTOL, atol=ATOL)
    # with the official z, lorajax's own factors give the official W'
    ad = {**ad, "loldu_z": jnp.asarray(c["z"])}
    adapters["params"]["layer"]["kernel"] = ad
    merged = lorajax.merge(spec, params, adapters)
    np.testing.assert_allclose(np.asarray(merged["params"]["layer"]["kernel"]), c["w_merged"].T, rtol=RTOL, atol=ATOL)
