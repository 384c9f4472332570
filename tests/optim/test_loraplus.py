"""LoRA+ (specs/optim.md §10.4): labels, |ΔB|/|ΔA| = λ on Adam's first step, λ = 1 is plain AdamW."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lorajax
from lorajax.optim import leaf_labels, loraplus


@pytest.fixture
def setup():
    params = {"q": {"kernel": jnp.ones((6, 5))}, "v": {"kernel": jnp.ones((6, 5))}}
    spec = lorajax.Spec("lora", rank=2, targets=["q", "v"], init_weights=False)  # A and B both non-zero
    adapters = lorajax.init(spec, params, 0)
    adapters["head_bias"] = jnp.zeros(5)
    adapters["head"] = jnp.ones((3, 5))
    grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(x.size), x.shape), adapters)
    return adapters, grads


def test_labels(setup):
    adapters, _ = setup
    labels = leaf_labels(adapters)
    assert labels["q"]["kernel"] == {"lora_A": "A", "lora_B": "B"}
    assert labels["head_bias"] == "other" and labels["head"] == "other"
    assert leaf_labels(adapters, one_d_as="B")["head_bias"] == "B"
    assert leaf_labels(adapters, one_d_as="B")["head"] == "other"


@pytest.mark.parametrize("lam", [1.0, 16.0])
def test_first_adam_step_ratio(setup, lam):
    adapters, grads = setup
    tx = loraplus(1e-3, lr_ratio=lam, optimizer=optax.adam)
    u, _ = tx.update(grads, tx.init(adapters), adapters)
    for name in ("q", "v"):
        ua, ub = u[name]["kernel"]["lora_A"], u[name]["kernel"]["lora_B"]
        # Adam's first step is lr * g / (|g| + eps): ≈ lr element-wise
        np.testing.assert_allclose(np.abs(ub), lam * 1e-3, rtol=1e-3)
        np.testing.assert_allclose(np.abs(ua), 1e-3, rtol=1e-3)
    np.testing.assert_allclose(np.abs(u["head_bias"]), 1e-3, rtol=1e-3)


def test_one_d_quirk(setup):
    adapters, grads = setup
    tx = loraplus(1e-3, lr_ratio=8.0, optimizer=optax.adam, one_d_as_b=True)
    u, _ = tx.update(grads, tx.init(adapters), adapters)
    np.testing.assert_allclose(np.abs(u["head_bias"]), 8e-3, rtol=1e-3)
    np.testing.assert_allclose(np.abs(u["head"]), 1e-3, rtol=1e-3)


def test_ratio_one_is_plain_adamw_bitwise(setup):
    adapters, grads = setup
    a, b = loraplus(1e-3, lr_ratio=1.0, optimizer=functools.partial(optax.adamw, weight_decay=0.1)), optax.adamw(1e-3, weight_decay=0.1)
    sa, sb = a.init(adapters), b.init(adapters)
    pa = pb = adapters
    for _ in range(3):
        ua, sa = a.update(grads, sa, pa)
        ub, sb = b.update(grads, sb, pb)
        pa, pb = optax.apply_updates(pa, ua), optax.apply_updates(pb, ub)
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_array_equal(x, y)


def test_schedule_is_scaled_and_partitioned_tree(setup):
    adapters, grads = setup
    spec = lorajax.Spec("lora", rank=2, targets=["q", "v"])
    trainable, _ = lorajax.partition(spec, {k: adapters[k] for k in ("q", "v")})
    sched = optax.linear_schedule(1e-3, 0.0, 10)
    tx = loraplus(sched, lr_ratio=4.0, optimizer=optax.sgd)
    g = {k: grads[k] for k in ("q", "v")}
    u, _ = tx.update(g, tx.init(trainable), trainable)
    np.testing.assert_allclose(u["q"]["kernel"]["lora_B"], -4e-3 * g["q"]["kernel"]["lora_B"], rtol=1e-6)
    np.testing.assert_allclose(u["q"]["kernel"]["lora_A"], -1e-3 * g["q"]["kernel"]["lora_A"], rtol=1e-6)


def test_bad_ratio():
    with pytest.raises(ValueError, match="lr_ratio"):
        loraplus(1e-3, lr_ratio=0.0)
