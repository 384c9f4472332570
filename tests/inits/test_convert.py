"""`lorajax.inits.to_plain_lora`: a base-shifting adapter as a rank-2r LoRA on the original base.

``W_res + s·B A = W_0 + s·(B A - B_0 A_0) = W_0 + s'·[B, -B_0] [A; A_0]`` with
``s' = s`` (rank 2r, alpha 2α; alpha √2·α with rsLoRA).
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax
from lorajax.variants.lora import scaling


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(16, name="up")(x))
        h = nn.Dense(16, name="mid")(h)
        return nn.Dense(8, name="down")(h)


MODEL = Net()
X = jax.random.normal(jax.random.key(9), (4, 12))


def _variables():
    return MODEL.init(jax.random.key(0), X)


@functools.lru_cache(maxsize=1)
def _grads():
    loss = lambda p, x: jnp.mean(MODEL.apply(p, x) ** 2)
    spec = lorajax.Spec("lora", rank=2, targets=["up", "mid", "down"])
    return lorajax.inits.estimate_gradients(spec, loss, _variables(), [X, 2 * X + 1])


def _init(method, spec, variables):
    if method == "pissa":
        return lorajax.inits.pissa(spec, variables)
    if method == "olora":
        return lorajax.inits.olora(spec, variables)
    return lorajax.inits.lora_ga(spec, variables, _grads(), scale="unit")


def _train(adapters, seed=3):
    """Stands for training: every factor moved by a random amount of its own size."""
    leaves, tree = jax.tree_util.tree_flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    moved = [x + 0.3 * jnp.std(x) * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(tree, moved)


SPECS = {
    "plain": dict(rank=2, alpha=6.0),
    "rslora": dict(rank=2, alpha=6.0, use_rslora=True),
    "patterns": dict(rank=2, alpha=6.0, rank_pattern={"down": 3}, alpha_pattern={"mid": 2.0}),
    "rslora+patterns": dict(rank=2, alpha=6.0, use_rslora=True, rank_pattern={"down": 3},
                            alpha_pattern={"mid": 2.0}),
}


# the residual path differs only in how B_0 A_0 is found: checked with two of the configs
CASES = [(c, "initial") for c in SPECS] + [(c, "residual") for c in ("plain", "patterns")]


@pytest.mark.parametrize("config,how", CASES)
@pytest.mark.parametrize("method", ["pissa", "olora", "lora_ga"])
def test_outputs_on_the_original_base_equal_the_trained_model(method, config, how):
    variables = _variables()
    spec = lorajax.Spec("lora", targets=["up", "mid", "down"], **SPECS[config])
    init, residual = _init(method, spec, variables)
    trained = _train(init)
    if how == "initial":
        spec2, plain = lorajax.inits.to_plain_lora(spec, trained, variables, init)
    else:
        spec2, plain = lorajax.inits.to_plain_lora(spec, trained, variables, residual_params=residual)
    # same scaling per target, twice the rank
    old = {t.keys: t for t in lorajax.select(spec, variables)}
    for t in lorajax.select(spec2, variables):
        assert t.rank == 2 * old[t.keys].rank
        assert math.isclose(scaling(t), scaling(old[t.keys]), rel_tol=1e-12)
        ad = plain["params"][t.keys[1]]["kernel"]
        assert ad["lora_A"].shape == (t.matrix_shape[0], t.rank) and ad["lora_B"].shape == (t.rank, t.matrix_shape[1])
    assert spec2.options["init_weights"] is True
    for mode in ("merged", "factored"):
        want = lorajax.adapt(MODEL.apply, spec, mode=mode)(residual, trained, X)
        got = lorajax.adapt(MODEL.apply, spec2, mode=mode)(variables, plain, X)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5 * np.abs(want).max())
    merged_plain = lorajax.merge(spec2, variables, plain)
    merged_trained = lorajax.merge(spec, residual, trained)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5),
                           merged_plain, merged_trained)


def test_concatenation_layout():
    variables = _variables()
    spec = lorajax.Spec("lora", rank=2, alpha=4.0, targets=["up"])
    init, _ = lorajax.inits.pissa(spec, variables)
    trained = _train(init)
    spec2, plain = lorajax.inits.to_plain_lora(spec, trained, variables, init)
    assert (spec2.rank, spec2.alpha) == (4, 8.0)
    a, b = trained["params"]["up"]["kernel"]["lora_A"], trained["params"]["up"]["kernel"]["lora_B"]
    a0, b0 = init["params"]["up"]["kernel"]["lora_A"], init["params"]["up"]["kernel"]["lora_B"]
    got = plain["params"]["up"]["kernel"]
    np.testing.assert_array_equal(np.asarray(got["lora_A"]), np.concatenate([a, a0], axis=1))
    np.testing.assert_array_equal(np.asarray(got["lora_B"]), np.concatenate([b, -b0], axis=0))
    # untrained: the plain LoRA is exactly zero
    _, zero = lorajax.inits.to_plain_lora(spec, init, variables, init)
    z = zero["params"]["up"]["kernel"]
    np.testing.assert_allclose(np.asarray(z["lora_A"] @ z["lora_B"]), 0.0, atol=1e-6)


def test_bare_initial_adapters_with_a_variables_dict():
    variables = _variables()
    spec = lorajax.Spec("lora", rank=2, alpha=4.0, targets=["up"])
    init, residual = lorajax.inits.olora(spec, variables)
    trained = _train(init)
    _, a = lorajax.inits.to_plain_lora(spec, trained, variables, init["params"])
    _, b = lorajax.inits.to_plain_lora(spec, trained, variables, residual_params=residual["params"])
    np.testing.assert_allclose(
        np.asarray(a["params"]["up"]["kernel"]["lora_A"] @ a["params"]["up"]["kernel"]["lora_B"]),
        np.asarray(b["params"]["up"]["kernel"]["lora_A"] @ b["params"]["up"]["kernel"]["lora_B"]), atol=1e-5)


def test_errors():
    variables = _variables()
    spec = lorajax.Spec("lora", rank=2, targets=["up", "mid"])
    init, _ = lorajax.inits.pissa(spec, variables)
    with pytest.raises(ValueError, match="initial_adapters"):
        lorajax.inits.to_plain_lora(spec, init, variables)
    with pytest.raises(ValueError, match="lora_xs"):
        lorajax.inits.to_plain_lora(lorajax.Spec("lora_xs", rank=2, targets=["up"]), init, variables, init)
    other = lorajax.Spec("lora", rank=1, targets=["up", "mid"])
    init1, _ = lorajax.inits.pissa(other, variables)
    with pytest.raises(ValueError, match=r"initial adapter at params/(mid|up)/kernel has lora_A \(16, 1\)"):
        lorajax.inits.to_plain_lora(spec, init, variables, init1)
    with pytest.raises(ValueError, match="mid"):
        lorajax.inits.to_plain_lora(spec, init, variables, {"params": {"up": init["params"]["up"]}})
    big = lorajax.Spec("lora", rank=7, targets=["up"])  # up: [12, 16] -> 2r = 14 > 12
    init7, _ = lorajax.inits.pissa(big, variables)
    with pytest.raises(ValueError, match=r"2r = 14 > min\(in, out\) = 12"):
        lorajax.inits.to_plain_lora(big, init7, variables, init7)
