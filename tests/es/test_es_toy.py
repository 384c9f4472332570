"""ES sanity on a toy (spec §4.5): maximise -||σ - σ*||² over d = 64 singular values; every strategy converges."""

import jax
import jax.numpy as jnp
import pytest

import lorajax
from lorajax.es import ESSA, run

pytest.importorskip("evosax")

PARAMS = {f"w{i}": {"kernel": jnp.ones((16, 16))} for i in range(8)}
SPEC = lorajax.Spec("lora", rank=8, alpha=8, targets=".*", init_weights=False)
ADAPTERS = lorajax.init(SPEC, PARAMS, jax.random.key(0))


@pytest.mark.parametrize("strategy,generations", [("cma_es", 120), ("sep_cma_es", 120), ("open_es", 120)])
def test_toy_converges(strategy, generations):
    essa = ESSA(SPEC, PARAMS, ADAPTERS, population_size=16, strategy=strategy, fitness_input="genome",
                std_init=0.05)
    assert essa.num_dims == 64
    target = essa.mean0 + 0.3 * jnp.sin(jnp.arange(64.0))

    def reward(g):
        return -jnp.sum((g - target) ** 2)

    state, hist = run(essa, reward, jax.random.key(1), generations, progress=False)
    start = float(-reward(essa.mean0))
    end = float(-reward(state.es.mean))
    assert end < 0.1 * start, (strategy, start, end)
