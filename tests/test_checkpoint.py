"""Checkpointer: zero-size leaves (optax GaLore's placeholders) survive a save/restore."""

import jax
import jax.numpy as jnp
import numpy as np

import lorajax
from lorajax.train.checkpoint import Checkpointer


def test_zero_size_and_none_leaves_round_trip(tmp_path):
    state = {"a": jnp.arange(3.0), "placeholder": jnp.zeros((0, 4)), "none": None, "t": (jnp.zeros((0,)), 2 * jnp.ones(2))}
    ck = Checkpointer(tmp_path, keep=1)
    ck.save(5, state, {"step": 5})
    like = jax.tree.map(jnp.zeros_like, state)
    out, meta = ck.restore(like)
    assert meta["step"] == 5 and out["none"] is None
    assert out["placeholder"].shape == (0, 4) and out["t"][0].shape == (0,)
    np.testing.assert_array_equal(out["a"], state["a"])
    np.testing.assert_array_equal(out["t"][1], state["t"][1])


def test_galore_state_checkpoints(tmp_path):
    params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (8, 6))}, "scale": jnp.ones(6)}
    tx = lorajax.optim.galore(1e-3, targets=["dense"], rank=2, params=params)
    state = tx.init(params)
    assert any(x.size == 0 for x in jax.tree.leaves(state))  # the placeholders this is about
    _, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    ck = Checkpointer(tmp_path, keep=1)
    ck.save(1, state)
    out, _ = ck.restore(tx.init(params))
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(state)):
        np.testing.assert_array_equal(a, b)
