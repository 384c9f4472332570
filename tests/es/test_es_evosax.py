"""evosax's strategies wired in: antithetic pairs, centred-rank shaping, sign of the reward, bad options."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lorajax
from lorajax.es import ESSA, run
from _es_common import ADAPTERS, SPEC, VARIABLES, X, Y, close, reward

pytest.importorskip("evosax")

def test_open_es_antithetic_and_centered_rank_are_evosax_s():
    lr = 0.05
    essa = ESSA(SPEC, VARIABLES, ADAPTERS, population_size=8, strategy="open_es", fitness_input="genome",
                optimizer=optax.sgd(lr), std_init=0.2)
    state = essa.init(jax.random.key(0))
    c = jnp.linspace(-1.0, 1.0, essa.num_dims)
    linear = lambda g: jnp.dot(c, g)  # noqa: E731
    key = jax.random.key(7)
    new, _ = essa.step(state, key, linear)
    pop, st = essa.ask(state, jax.random.split(key)[0])
    pop, mean, std, half = np.asarray(pop), np.asarray(st.es.mean), 0.2, essa.population_size // 2
    # antithetic: mirrored pairs around the mean
    np.testing.assert_allclose(pop[:half] - mean, -(pop[half:] - mean), atol=1e-6)
    # centred ranks of the loss (= -reward) in [-0.5, 0.5], OpenAI-ES gradient, one SGD step
    loss = -np.asarray(jax.vmap(linear)(pop))
    ranks = np.argsort(np.argsort(loss)).astype(np.float32)
    shaped = ranks / (essa.population_size - 1) - 0.5
    grad = shaped @ ((pop - mean) / std) / (essa.population_size * std)
    np.testing.assert_allclose(new.es.mean, mean - lr * grad, rtol=1e-5, atol=1e-6)
    # the step goes up the reward
    assert float(linear(new.es.mean)) > float(linear(mean))


def test_antithetic_gradient_estimate_is_unbiased_for_a_linear_reward():
    essa = ESSA(SPEC, VARIABLES, ADAPTERS, population_size=16, strategy="open_es", fitness_input="genome",
                fitness_shaping="identity", optimizer=optax.sgd(1.0), std_init=0.1)
    state = essa.init(jax.random.key(0))
    c = jnp.linspace(-1.0, 1.0, essa.num_dims)

    def update(key):
        return essa.step(state, key, lambda g: jnp.dot(c, g))[0].es.mean - state.es.mean

    steps = jax.vmap(update)(jax.random.split(jax.random.key(1), 400))
    # E[mean step] = lr * E[grad of the reward] = c
    np.testing.assert_allclose(steps.mean(0), c, atol=0.12)


def test_search_improves_the_reward():
    essa = ESSA(SPEC, VARIABLES, ADAPTERS, population_size=16, std_init=0.3)
    state, hist = run(essa, reward, jax.random.key(0), 25, VARIABLES, X, Y, progress=False)
    r0 = float(reward(ADAPTERS, VARIABLES, X, Y))
    assert float(reward(essa.mean_adapters(state), VARIABLES, X, Y)) > r0 + 0.1 * abs(r0)
    assert hist[-1]["best_fitness"] >= hist[0]["fitness_max"]


def test_bad_options():
    with pytest.raises(ValueError, match="odd.*antithetic"):
        ESSA(SPEC, VARIABLES, ADAPTERS, population_size=7, strategy="open_es")
    with pytest.raises(ValueError, match="odd.*even population"):
        ESSA(SPEC, VARIABLES, ADAPTERS, population_size=7, strategy="open_es", antithetic=False)
    ESSA(SPEC, VARIABLES, ADAPTERS, population_size=7)  # CMA-ES: any size
    with pytest.raises(ValueError, match="antithetic sampling is an OpenAI-ES option"):
        ESSA(SPEC, VARIABLES, ADAPTERS, population_size=8, antithetic=True)
    with pytest.raises(ValueError, match="strategy must be one of"):
        ESSA(SPEC, VARIABLES, ADAPTERS, strategy="ppo")
    with pytest.raises(ValueError, match="fitness_shaping must be one of"):
        ESSA(SPEC, VARIABLES, ADAPTERS, population_size=8, strategy="open_es", fitness_shaping="softmax")
    with pytest.raises(ValueError, match="member_chunk"):
        ESSA(SPEC, VARIABLES, ADAPTERS, population_size=8, member_chunk=0)
    with pytest.raises(ValueError, match="fraction"):
        ESSA(SPEC, VARIABLES, ADAPTERS, fraction=0.0)
    essa = ESSA(SPEC, VARIABLES, ADAPTERS, population_size=8)
    with pytest.raises(ValueError, match="must return a scalar"):
        essa.step(essa.init(jax.random.key(0)), jax.random.key(1), lambda a: jnp.ones(2))
