"""Members with a non-finite fitness rank last, are counted and logged; the run goes on."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lorajax
from lorajax.es import ESSA, run
from _es_common import ADAPTERS, SPEC, VARIABLES, X, Y, close, reward

pytest.importorskip("evosax")

def test_nonfinite_members_rank_last_and_the_run_goes_on(caplog):
    essa = ESSA(SPEC, VARIABLES, ADAPTERS, population_size=8, strategy="open_es", fitness_input="genome",
                optimizer=optax.sgd(0.1))
    state = essa.init(jax.random.key(0))
    c = jnp.linspace(-1.0, 1.0, essa.num_dims)

    def flaky(g):  # NaN / inf for members on one side of the mean
        r = jnp.dot(c, g)
        return jnp.where(g[0] > essa.mean0[0] + 0.05, jnp.nan, jnp.where(g[1] > essa.mean0[1] + 0.1, jnp.inf, r))

    key = jax.random.key(3)
    new, metrics = essa.step(state, key, flaky)
    k_ask, k_tell = jax.random.split(key)
    pop, st = essa.ask(state, k_ask)
    raw = np.asarray(jax.vmap(flaky)(pop))
    bad = ~np.isfinite(raw)
    assert 0 < bad.sum() < 8 and int(metrics["n_nonfinite"]) == bad.sum() == int(new.n_nonfinite)
    assert np.all(np.isfinite(np.asarray(new.es.mean)))
    # ranked last: the same update as with those members given a reward below every finite one
    patched = np.where(bad, raw[~bad].min() - 1.0, raw)
    ref, _ = essa.tell(st, k_tell, pop, jnp.asarray(patched))
    close(new.es.mean, ref.es.mean)
    np.testing.assert_allclose(metrics["fitness_min"], raw[~bad].min(), rtol=1e-6)
    # every member fails: the distribution stays, the generation counts, the driver logs it
    with caplog.at_level(logging.WARNING, logger="lorajax.es"):
        out, hist = run(essa, lambda g: jnp.nan * g[0], jax.random.key(0), 2, progress=False)
    close(out.es.mean, essa.init(jax.random.key(0)).es.mean)
    assert int(out.generation) == 2 and int(out.n_nonfinite) == 16 and hist[-1]["n_nonfinite"] == 8
    assert "8 of 8 members returned a non-finite fitness" in caplog.text
