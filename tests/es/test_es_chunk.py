"""ESSA's chunked population evaluation: the automatic chunk rule, and chunks equal the plain vmap reference."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _es_common import ADAPTERS, SPEC, VARIABLES, X, Y, close, reward

from lorajax.es import ESSA
from lorajax.es import essa as essa_mod
from lorajax.es.essa import auto_member_chunk, member_bytes

pytest.importorskip("evosax")


def test_auto_member_chunk_is_valid_and_deterministic():
    mib = 2**20
    assert auto_member_chunk(32, mib, 8 * mib) == 8  # cap 8 divides 32
    assert auto_member_chunk(128, int(0.85 * mib), 8 * mib) == 8  # cap 9 -> divisor 8
    assert auto_member_chunk(37, int(0.85 * mib), 8 * mib) == 8  # prime: 5 chunks of 8, 3 padded
    assert auto_member_chunk(8, mib, 64 * mib) == 8  # everything fits: one vmap
    assert auto_member_chunk(8, mib, None) == 8  # no budget (accelerators): one vmap
    assert auto_member_chunk(8, 100 * mib, 8 * mib) == 1  # one member exceeds the budget
    for p in range(1, 70):
        for per, budget, m in [(1, 5, 1), (1, 7, 1), (3, 20, 2), (1, 9, 4), (2, 3, 1)]:
            if p % m:
                continue
            c = auto_member_chunk(p, per, budget, m)
            assert c == auto_member_chunk(p, per, budget, m)
            cap = max(m, budget // per // m * m)
            assert 1 <= c <= p and (c == p or c % m == 0), (p, per, budget, m, c)
            assert c == p if cap >= p else c <= cap, (p, cap, c)
            assert -(-p // c) == -(-p // min(cap, p)) or p % c == 0  # padded: as few chunks as the cap allows
            assert (-p % c) < c and (-(-p // c) * c) % m == 0


def test_member_bytes_counts_live_member_dependent_values():
    shared = jnp.ones((100, 100))
    g = jax.ShapeDtypeStruct((100,), jnp.float32)
    assert member_bytes(lambda x: jnp.sum(x * 2.0), g) == 800  # x and 2x live together
    assert member_bytes(lambda x: jnp.sum(x) + jnp.sum(shared @ shared), g) == 404  # shared @ shared: once


@pytest.mark.parametrize("population_size,chunk", [(7, None), (8, 3)])
def test_chunked_evaluation_equals_vmap_reference(monkeypatch, population_size, chunk):
    monkeypatch.setattr(ESSA, "_platform", lambda self: "cpu")  # the automatic rule on any backend
    essa = ESSA(SPEC, VARIABLES, ADAPTERS, population_size=population_size, member_chunk=chunk)
    frozen = essa.svd0
    state = essa_mod.State(es=None, frozen=frozen, generation=jnp.zeros((), jnp.int32), n_nonfinite=jnp.zeros(()))
    pop = essa.mean0[None] + 0.3 * jax.random.normal(jax.random.key(1), (population_size, essa.num_dims))
    if chunk is None:  # budget of 3 members: chunks of 3, the last one padded (7 = 3 + 3 + 1)
        per = member_bytes(essa._one(state, reward, (VARIABLES, X, Y)), pop[0])
        monkeypatch.setattr(essa_mod, "CPU_CHUNK_BYTES", 3 * per)
    assert essa.chunk_size(state, pop, reward, VARIABLES, X, Y) == 3
    w = jax.random.normal(jax.random.key(2), (population_size,))

    @jax.jit
    def ref(pop):  # pure-jnp reference: one vmap over every member; weighted sum for the gradient
        fit = jax.vmap(lambda g: reward(essa.to_adapters(frozen, g), VARIABLES, X, Y))(pop)
        return fit @ w, fit

    @jax.jit
    def fast(pop):
        fit = essa.evaluate(state, pop, reward, VARIABLES, X, Y)
        return fit @ w, fit

    (_, fit), grad = jax.value_and_grad(fast, has_aux=True)(pop)
    (_, fit_ref), grad_ref = jax.value_and_grad(ref, has_aux=True)(pop)
    np.testing.assert_allclose(fit, fit_ref, rtol=1e-5, atol=1e-6)
    close(grad, grad_ref)


def test_bad_member_chunk():
    bad_values: list[Any] = [0, -1, 2.0, True]
    for bad in bad_values:
        with pytest.raises(ValueError, match="member_chunk"):
            ESSA(SPEC, VARIABLES, ADAPTERS, population_size=8, member_chunk=bad)
