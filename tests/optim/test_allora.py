"""ALLoRA (specs/optim.md §2.4, for the implemented candidate form)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lorajax.optim import allora
from lorajax.optim.allora import allora_coefficient, scale_by_allora


def test_coefficient_at_zero_monotone_and_asymptote():
    eta = 2.0
    assert float(allora_coefficient(jnp.zeros((4, 3)), eta)[0, 0]) == pytest.approx(eta)
    norms = jnp.linspace(0.0, 50.0, 30)
    c = jax.vmap(lambda n: allora_coefficient(jnp.stack([n, 0.0 * n])[:, None], eta)[0, 0])(norms)
    assert np.all(np.diff(np.asarray(c)) < 0)
    big = allora_coefficient(jnp.full((1, 1), 1e4), eta)
    assert float(big[0, 0] * 1e4) == pytest.approx(1.0, rel=1e-6)


def test_rows_are_torch_rows():
    """Flax lora_B [r, out] column j = torch B row j: the norm runs over axis 0."""
    b = jax.random.normal(jax.random.key(0), (3, 5))
    c = allora_coefficient(b, 1.5)
    want = 1.0 / np.sqrt(np.sum(np.asarray(b) ** 2, axis=0) + 1 / 1.5 ** 2)
    np.testing.assert_allclose(c[0], want, rtol=1e-6)
    c1 = allora_coefficient(b, 1.5, power=1)
    np.testing.assert_allclose(c1[0], 1.0 / np.sqrt(np.sqrt(np.sum(np.asarray(b) ** 2, 0)) + 1 / 1.5 ** 2), rtol=1e-6)


def test_zero_rows_of_b_step_eta_times_lr():
    p = {"lora_B": jnp.zeros((2, 4)), "lora_A": jnp.ones((5, 2))}
    g = jax.tree.map(jnp.ones_like, p)
    tx = allora(1e-2, eta=3.0, optimizer=optax.sgd)
    u, _ = tx.update(g, tx.init(p), p)
    np.testing.assert_allclose(u["lora_B"], -3e-2, rtol=1e-6)
    np.testing.assert_allclose(u["lora_A"], -1e-2 / np.sqrt(5 + 1 / 9), rtol=1e-6)


def test_pre_and_post_and_errors():
    p = {"w": jax.random.normal(jax.random.key(1), (3, 2))}
    g = {"w": jax.random.normal(jax.random.key(2), (3, 2))}
    pre = allora(0.1, optimizer=optax.sgd, position="pre")
    post = allora(0.1, optimizer=optax.sgd, position="post")
    u1, _ = pre.update(g, pre.init(p), p)
    u2, _ = post.update(g, post.init(p), p)
    np.testing.assert_allclose(u1["w"], u2["w"], rtol=1e-6)  # SGD is linear: both orders agree
    with pytest.raises(ValueError, match="position"):
        allora(0.1, position="middle")
    with pytest.raises(ValueError, match="eta"):
        scale_by_allora(eta=0.0)
    tx = scale_by_allora()
    with pytest.raises(ValueError, match="needs params"):
        tx.update(g, tx.init(p))
