"""PaCA against numbers from the official code (tests/fixtures/paca, see its README).

The fixture runs WooSunghyeon/paca ``peft/src/peft/tuners/paca/layer.py``
(``Linear``: ``paca_init``, one training ``forward`` through ``pacalinear`` and
its custom backward, ``merge``) on a ``torch.nn.Linear(10, 7)`` with ``r = 3``,
``paca_alpha = 5`` (``s = 5/3``) and a random ``paca_w``. PyTorch layout there
(``weight: [out, in]``, ``paca_w: [out, r]``, columns ``idx``); imported here as::

    paca_indices = idx (sorted, as lorajax stores them)      paca_w = paca_w_pt[:, order]ᵀ: [r, out]
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

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "fixtures", "paca", "fixture.safetensors")
D = load_file(FIXTURE)
R, ALPHA = 3, 5.0
RTOL, ATOL = 1e-5, 1e-5


class Layer(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(D["weight_pt"].shape[0], name="layer")(x)


MODEL = Layer()
PARAMS = {"params": {"layer": {"kernel": jnp.asarray(D["weight_pt"].T), "bias": jnp.asarray(D["bias"])}}}
SPEC = lorajax.Spec("paca", rank=R, alpha=ALPHA, targets=["layer"])


def _adapters(order="sorted"):
    """The official ``paca_w`` / ``paca_indices`` in lorajax's layout (rows of ``paca_w`` follow the indices)."""
    idx = D["paca_indices"]
    perm = np.argsort(idx) if order == "sorted" else np.arange(R)
    layout = lorajax.init(SPEC, PARAMS, jax.random.key(0))["params"]["layer"]["kernel"]
    adapter = {"paca_w": jnp.asarray(D["paca_w_pt"].T[perm]), "paca_indices": jnp.asarray(idx[perm], jnp.int32)}
    for k, v in adapter.items():
        assert v.shape == layout[k].shape and v.dtype == layout[k].dtype, (k, v.shape, layout[k].shape)
    return {"params": {"layer": {"kernel": adapter}}}, perm


def test_scale_and_init_follow_the_official_rule():
    """Official: ``s = paca_alpha / r`` and ``paca_w = W[:, idx] / s``; lorajax's init keeps the same rule."""
    s = float(D["scaling"][0])
    assert s == pytest.approx(ALPHA / R, rel=1e-7)
    w = D["weight_pt"].T  # [in, out]
    np.testing.assert_allclose(D["paca_w_init_pt"].T, w[D["paca_indices"]] / s, rtol=1e-6)
    ours = lorajax.init(SPEC, PARAMS, jax.random.key(3))["params"]["layer"]["kernel"]
    np.testing.assert_allclose(np.asarray(ours["paca_w"]), w[np.asarray(ours["paca_indices"])] / s, rtol=1e-6)


@pytest.mark.parametrize("order", ["sorted", "official"])
@pytest.mark.parametrize("mode", ["factored", "merged"])
def test_training_forward_and_gradients_match(mode, order):
    adapters, perm = _adapters(order)
    run = lorajax.adapt(MODEL.apply, SPEC, mode=mode)
    x, cot = jnp.asarray(D["x"]), jnp.asarray(D["cot"])
    np.testing.assert_allclose(np.asarray(run(PARAMS, adapters, x)), D["y"], rtol=RTOL, atol=ATOL)

    def loss(paca_w, x):
        ad = {"params": {"layer": {"kernel": {**adapters["params"]["layer"]["kernel"], "paca_w": paca_w}}}}
        return jnp.sum(run(PARAMS, ad, x) * cot)

    g_w, g_x = jax.grad(loss, argnums=(0, 1))(adapters["params"]["layer"]["kernel"]["paca_w"], x)
    np.testing.assert_allclose(np.asarray(g_w), D["grad_paca_w_pt"].T[perm], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(g_x), D["grad_x"], rtol=RTOL, atol=ATOL)


def test_merged_weight_matches_official_merge():
    adapters, _ = _adapters()
    merged = lorajax.merge(SPEC, PARAMS, adapters)["params"]["layer"]
    np.testing.assert_allclose(np.asarray(merged["kernel"]), D["merged_weight_pt"].T, rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(np.asarray(merged["bias"]), D["bias"])


def test_official_eval_forward_before_training_ignores_paca_w():
    """A quirk of the official layer, recorded so the reference above is understood.

    ``forward`` writes ``s·paca_w`` into ``W`` only in training mode; in eval mode a layer that has
    not run a training forward (or ``merge``) returns the base output, whatever ``paca_w`` is.
    lorajax's forward is the trained/merged one in both modes (the reference in the tests above).
    """
    base = D["x_eval"] @ D["weight_pt"].T + D["bias"]
    np.testing.assert_allclose(D["y_eval"], base, rtol=RTOL, atol=ATOL)
    adapters, _ = _adapters()
    ours = np.asarray(lorajax.adapt(MODEL.apply, SPEC)(PARAMS, adapters, jnp.asarray(D["x_eval"])))
    assert np.abs(ours - base).max() > 1e-2
