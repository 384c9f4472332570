"""Shared tiny model for the ESSA tests: a 2-layer MLP with LoRA on both layers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import lorajax


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4, name="out")(jnp.tanh(nn.Dense(16, name="hidden")(x)))


MODEL = MLP()
X = jax.random.normal(jax.random.key(0), (8, 6))
VARIABLES = MODEL.init(jax.random.key(1), X)
Y = jax.random.normal(jax.random.key(2), (8, 4))
SPEC = lorajax.Spec("lora", rank=3, alpha=6, targets=["hidden", "out"], init_weights=False)
ADAPTERS = lorajax.init(SPEC, VARIABLES, jax.random.key(3))
FWD = lorajax.adapt(MODEL.apply, SPEC, mode="factored")


def reward(adapters, variables, x, y):
    """Black-box reward, higher is better."""
    return -jnp.mean((FWD(variables, adapters, x) - y) ** 2)


def close(a, b, **kw):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **{"rtol": 1e-5, "atol": 1e-6, **kw})


