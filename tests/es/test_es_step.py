"""ESSA.step: the vmapped population equals a Python loop over members; genome <-> adapters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax
from lorajax.es import ESSA, run
from _es_common import ADAPTERS, SPEC, VARIABLES, X, Y, close, reward

pytest.importorskip("evosax")

@pytest.mark.parametrize("strategy,form", [("cma_es", "product"), ("open_es", "factor"), ("sep_cma_es", "factor")])
def test_vmapped_step_equals_loop_over_members(strategy, form):
    essa = ESSA(SPEC, VARIABLES, ADAPTERS, population_size=8, strategy=strategy, form=form)
    state = essa.init(jax.random.key(0))
    key = jax.random.key(5)
    new, metrics = essa.step(state, key, reward, VARIABLES, X, Y)
    # the same generation by hand: ask, one jitted fitness per member in a Python loop, tell
    k_ask, k_tell = jax.random.split(key)
    pop, st = essa.ask(state, k_ask)
    one = jax.jit(lambda g: reward(essa.to_adapters(st.frozen, g), VARIABLES, X, Y))
    fit = jnp.stack([one(pop[i]) for i in range(essa.population_size)])
    by_hand, m2 = essa.tell(st, k_tell, pop, fit)
    close(new.es, by_hand.es)
    np.testing.assert_allclose(metrics["fitness_mean"], float(jnp.mean(fit)), rtol=1e-5)
    assert int(new.generation) == 1 and int(metrics["n_nonfinite"]) == 0
    if strategy != "cma_es":
        return
    # chunked evaluation (lax.map over chunks of vmapped members) gives the same generation
    chunked = ESSA(SPEC, VARIABLES, ADAPTERS, population_size=8, strategy=strategy, form=form, member_chunk=4)
    close(chunked.step(chunked.init(jax.random.key(0)), key, reward, VARIABLES, X, Y)[0].es, new.es)


def test_genome_starts_at_the_adapters_and_maps_back():
    essa = ESSA(SPEC, VARIABLES, ADAPTERS, population_size=8, form="factor")
    state = essa.init(jax.random.key(0))
    assert essa.num_dims == 2 * (3 + 3)
    back = essa.mean_adapters(state)
    close(back, ADAPTERS)
    rel = ESSA(SPEC, VARIABLES, ADAPTERS, population_size=8, genome="relative", fraction=0.5)
    assert rel.num_dims == 2 * 2  # ceil(0.5 * 3) = 2 per weight, product form
    np.testing.assert_array_equal(rel.mean0, 1.0)
    m = lorajax.merge(SPEC, VARIABLES, rel.mean_adapters(rel.init(jax.random.key(0))))
    ref = lorajax.merge(SPEC, VARIABLES, ADAPTERS)
    close(m, ref)
