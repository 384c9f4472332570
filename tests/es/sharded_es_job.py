"""Run in a subprocess with 8 fake CPU devices: ESSA generations of a tiny int8 MLP on several meshes.

Usage: python sharded_es_job.py OUT.json MESH [MESH ...]   (MESH "1" = one device, no mesh)
Writes {mesh: {"means": [...], "fitness": [...], "fitness_spec": str}} to OUT.json.
"""

import json
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import lorajax  # noqa: E402
from lorajax.es import ESSA, quant  # noqa: E402
import flax.linen as nn  # noqa: E402

out_path, meshes = sys.argv[1], sys.argv[2:]
assert len(jax.devices()) == 8, jax.devices()


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(5, name="out")(jnp.tanh(nn.Dense(32, name="hidden")(x)))


model = MLP()
x = jax.random.normal(jax.random.key(2), (16, 12))
labels = jax.random.randint(jax.random.key(5), (16,), 0, 5)
variables = model.init(jax.random.key(0), x)
spec = lorajax.Spec("lora", rank=4, alpha=8, targets=["hidden", "out"], init_weights=False)
adapters = lorajax.init(spec, variables, jax.random.key(1))
qvars = quant.quantize(variables, "int8")
fwd = quant.adapt(model.apply, spec)


def reward(adapters, qvars, x):  # minus the cross-entropy, int8 base
    return -optax.softmax_cross_entropy_with_integer_labels(fwd(qvars, adapters, x), labels).mean()


out = {}
for mesh in meshes:
    essa = ESSA(spec, variables, adapters, population_size=8, mesh=None if mesh == "1" else mesh)
    state = essa.init(jax.random.key(3))
    means, fits = [], []
    for g in range(2):
        key = jax.random.fold_in(jax.random.key(4), g)
        pop, st = essa.ask(state, jax.random.split(key)[0])
        fit = jax.jit(essa.evaluate, static_argnums=2)(st, pop, reward, qvars, x)
        fits.append(fit.tolist())
        state, _ = essa.step(state, key, reward, qvars, x)
        means.append(state.es.mean.tolist())
    out[mesh] = {"means": means, "fitness": fits, "fitness_spec": str(getattr(fit.sharding, "spec", "")),
                 "n_devices": len(fit.sharding.device_set)}
with open(out_path, "w") as f:
    json.dump(out, f)
