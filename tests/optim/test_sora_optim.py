"""SoRA's gate optimiser (specs/optim.md §8.6): soft threshold, quirk, L1 term, zero gates, pruning."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lorajax
from lorajax.optim import gate_penalty, prune, sora
from lorajax.optim.sora import proximal, quirk_threshold, soft_threshold


def test_soft_threshold_grid_and_quirk():
    xi = 0.3
    x = jnp.array([-1.0, -0.6, -0.45, -0.3, -0.1, 0.0, 0.1, 0.3, 0.45, 0.5, 0.6, 1.0])
    np.testing.assert_allclose(soft_threshold(x, xi), np.sign(x) * np.maximum(np.abs(x) - xi, 0), atol=1e-7)
    np.testing.assert_allclose(soft_threshold(jnp.array([0.5]), xi), [0.2], rtol=1e-6)
    q = np.asarray(quirk_threshold(x, xi))
    assert q[9] == 0.0 and q[8] == 0.0  # official: ξ < |g| < 2ξ (0.5, 0.45) -> 0, not |g| - ξ
    assert q[7] == np.float32(0.3) and q[3] == np.float32(-0.3)  # |g| = ξ survives unchanged
    big = np.abs(np.asarray(x)) >= 2 * xi
    np.testing.assert_allclose(q[big], np.asarray(soft_threshold(x, xi))[big], atol=1e-7)
    small = np.abs(np.asarray(x)) < xi
    assert np.all(q[small] == 0)


def test_l1_term_gradient():
    params = {"a": {"kernel": jnp.ones((6, 4))}, "b": {"kernel": jnp.ones((4, 5))}}
    spec = lorajax.Spec("sora", rank=3, targets=["a", "b"])
    adapters = lorajax.init(spec, params, 0)
    g = jax.grad(lambda t: gate_penalty(t, 10.0))(adapters)
    for k in ("a", "b"):
        gate = adapters[k]["kernel"]["gate"]
        np.testing.assert_allclose(g[k]["kernel"]["gate"], 10.0 * np.sign(gate) / 6, rtol=1e-6)
        assert float(jnp.abs(g[k]["kernel"]["lora_A"]).sum()) == 0.0


def test_zero_gate_stays_zero_and_main_optimizer_elsewhere():
    params = {"a": {"kernel": jnp.ones((6, 4))}}
    spec = lorajax.Spec("sora", rank=3, targets=["a"])
    adapters = lorajax.init(spec, params, 0)
    adapters["a"]["kernel"]["gate"] = jnp.array([0.0, 0.5, -2.0])
    tx = sora(0.1, optimizer=optax.sgd, gate_lr=1e-3, threshold=5e-3)
    grads = jax.tree.map(jnp.ones_like, adapters)
    u, _ = tx.update(grads, tx.init(adapters), adapters)
    new = optax.apply_updates(adapters, u)
    gate = np.asarray(new["a"]["kernel"]["gate"])
    assert gate[0] == 0.0  # |Adam step| = 1e-3 < ξ
    np.testing.assert_allclose(gate[1:], [0.5 - 1e-3 - 5e-3, -2.0 - 1e-3 + 5e-3], rtol=1e-5)
    np.testing.assert_allclose(u["a"]["kernel"]["lora_A"], -0.1, rtol=1e-6)  # plain SGD on A


def test_proximal_needs_params():
    tx = proximal(0.1)
    with pytest.raises(ValueError, match="needs params"):
        tx.update({"g": jnp.ones(2)}, tx.init({"g": jnp.ones(2)}))


def test_proximal_threshold_times_lr():
    tx = proximal(0.5, learning_rate=0.1)
    p = {"g": jnp.array([0.2, -0.04])}
    u, _ = tx.update({"g": jnp.zeros(2)}, tx.init(p), p)
    np.testing.assert_allclose(p["g"] + u["g"], [0.15, 0.0], rtol=1e-6)


def test_prune_keeps_the_adapted_weights():
    params = {
        "a": {"kernel": jax.random.normal(jax.random.key(0), (6, 4))},
        "b": {"kernel": jax.random.normal(jax.random.key(1), (4, 5))},
        "c": {"kernel": jax.random.normal(jax.random.key(2), (5, 5))},
    }
    spec = lorajax.Spec("sora", rank=3, alpha=6, targets=["a", "b", "c"])
    adapters = lorajax.init(spec, params, 0)
    adapters = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(x.size), x.shape), adapters)
    adapters["a"]["kernel"]["gate"] = adapters["a"]["kernel"]["gate"].at[1].set(0.0)
    adapters["b"]["kernel"]["gate"] = adapters["b"]["kernel"]["gate"].at[0].set(0.0).at[2].set(0.0)
    adapters["c"]["kernel"]["gate"] = jnp.zeros(3)
    new_spec, new = prune(spec, params, adapters)
    assert new_spec.variant == "lora"
    assert new["a"]["kernel"]["lora_A"].shape == (6, 2) and new["b"]["kernel"]["lora_B"].shape == (1, 5)
    assert "c" not in new
    want, got = lorajax.merge(spec, params, adapters), lorajax.merge(new_spec, params, new)
    for k in ("a", "b", "c"):
        np.testing.assert_allclose(got[k]["kernel"], want[k]["kernel"], rtol=1e-5, atol=1e-6)
    # and the model outputs are the same
    x = jax.random.normal(jax.random.key(9), (2, 6))
    np.testing.assert_allclose(x @ got["a"]["kernel"], x @ want["a"]["kernel"], rtol=1e-5, atol=1e-6)


def test_prune_errors():
    params = {"a": {"kernel": jnp.ones((6, 4))}}
    spec = lorajax.Spec("sora", rank=2, targets=["a"])
    adapters = lorajax.init(spec, params, 0)
    adapters["a"]["kernel"]["gate"] = jnp.zeros(2)
    with pytest.raises(ValueError, match="every gate entry is zero"):
        prune(spec, params, adapters)
    with pytest.raises(ValueError, match="SoRA"):
        prune(lorajax.Spec("lora", rank=2, targets=["a"]), params, adapters)


def test_threshold_values_match_the_official_lambda_lists():
    # SparseAdamW._build_lambda_list, TsinghuaC3I/SoRA @ c275ac23 src/sparse_optimizer.py
    from lorajax.optim.sora import threshold_values

    np.testing.assert_allclose(threshold_values(0.0, 7e-4, 7), np.arange(7) * 7e-4 / 6, atol=1e-18)
    np.testing.assert_allclose(threshold_values(1e-4, 1e-2, 3, "exp_linear"), [1e-4, 1e-3, 1e-2], rtol=1e-12)
    want = np.log(np.array([np.exp(0.0), (np.exp(0.0) + np.exp(2.0)) / 2, np.exp(2.0)]))
    np.testing.assert_allclose(threshold_values(0.0, 2.0, 3, "log_linear"), want, rtol=1e-12)
    with pytest.raises(ValueError, match="start must be > 0"):
        threshold_values(0.0, 1e-3, 3, "exp_linear")
    with pytest.raises(ValueError, match="kind must be one of"):
        threshold_values(0.0, 1e-3, 3, "cosine")


def test_sparsifying_schedule_switches_threshold_at_phase_boundaries():
    from lorajax.optim.sora import sparsifying_schedule

    sched = sparsifying_schedule(0.0, 0.3, 4, first_steps=3, phase_steps=2)
    got = [float(sched(t)) for t in range(11)]
    np.testing.assert_allclose(got, [0, 0, 0, 0.1, 0.1, 0.2, 0.2, 0.3, 0.3, 0.3, 0.3], atol=1e-7)
    # inside the optimiser: ξ = 0 leaves a small gate alone, the next phase's ξ zeroes it
    tx = proximal(sched)
    p = {"g": jnp.array([0.05, 1.0])}
    state = tx.init(p)
    for _ in range(3):
        u, state = tx.update({"g": jnp.zeros(2)}, state, p)
        p = optax.apply_updates(p, u)
    np.testing.assert_allclose(p["g"], [0.05, 1.0], rtol=1e-6)
    u, state = tx.update({"g": jnp.zeros(2)}, state, p)
    p = optax.apply_updates(p, u)
    np.testing.assert_allclose(p["g"], [0.0, 0.9], rtol=1e-6)
