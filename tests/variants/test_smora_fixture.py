"""SMoRA against numbers from the official code (tests/fixtures/smora/README.md).

The fixture holds the authors' ``SRMoLELinear`` (dense path, training mode) for
``rank_partition`` 1 and 2: weights with a random B and random load-balancing
biases, the output, the biases after the forward, and one loss's gradients. The
weights are imported (PyTorch ``[out, in]`` -> Flax ``[in, out]``) and compared
with lorajax's factored forward (dense and gather paths), aux counts +
`lorajax.update_state`, and gradients.
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

import lorajax

PATH = os.path.join(os.path.dirname(__file__), os.pardir, "fixtures", "smora", "fixture.safetensors")
F = load_file(PATH)
with safe_open(PATH, "np") as fh:
    META = fh.metadata()
R = int(META["r"])
RTOL, ATOL = 1e-5, 1e-5
TAGS = ("p1", "p2")


class Net(nn.Module):
    d_out: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.d_out, name="proj")(x)


def _setup(tag, dense_compute=True):
    f = {k.split("/", 1)[1]: v for k, v in F.items() if k.startswith(tag + "/")}
    spec = lorajax.Spec("smora", rank=R, alpha=float(META["lora_alpha"]), targets=["proj"],
                        activate_r=int(META[f"{tag}/activate_r"]), rank_partition=int(META[f"{tag}/rank_partition"]),
                        bias_update_rate=float(META["bias_update_rate"]), dense_compute=dense_compute)
    variables = {"params": {"proj": {"kernel": jnp.asarray(f["base_weight"].T), "bias": jnp.asarray(f["base_bias"])}}}
    adapters = lorajax.init(spec, variables, jax.random.key(0))
    adapters["params"]["proj"]["kernel"] = {
        "lora_A": jnp.asarray(f["lora_A"].T), "lora_B": jnp.asarray(f["lora_B"].T),
        "lora_router": jnp.asarray(f["lora_router"].T), "lora_biases": jnp.asarray(f["bias_0"]),
    }
    return f, spec, variables, adapters, lorajax.adapt(Net(f["base_weight"].shape[0]).apply, spec)


@pytest.mark.parametrize("dense_compute", [True, False])
@pytest.mark.parametrize("tag", TAGS)
def test_forward_and_bias_update_match_official(tag, dense_compute):
    f, spec, variables, adapters, fwd = _setup(tag, dense_compute)
    y, aux = fwd(variables, adapters, jnp.asarray(f["x"]), adapter_aux=True)
    np.testing.assert_allclose(np.asarray(y), f["y"], rtol=RTOL, atol=ATOL)
    new = lorajax.update_state(spec, variables, adapters, aux)
    np.testing.assert_allclose(np.asarray(new["params"]["proj"]["kernel"]["lora_biases"]), f["bias_1"],
                               rtol=RTOL, atol=1e-7)
    assert not np.allclose(f["bias_1"], f["bias_0"])  # the fixture exercises the update


@pytest.mark.parametrize("dense_compute", [True, False])
@pytest.mark.parametrize("tag", TAGS)
def test_gradients_match_official(tag, dense_compute):
    f, spec, variables, adapters, fwd = _setup(tag, dense_compute)
    trainable, frozen = lorajax.partition(spec, adapters)
    cot = jnp.asarray(f["cotangent"])

    def loss(tr, x):
        return jnp.sum(fwd(variables, lorajax.combine(tr, frozen), x) * cot)

    g_tr, g_x = jax.grad(loss, argnums=(0, 1))(trainable, jnp.asarray(f["x"]))
    g = g_tr["params"]["proj"]["kernel"]
    for name in ("lora_A", "lora_B", "lora_router"):
        np.testing.assert_allclose(np.asarray(g[name]), f[f"grad_{name}"].T, rtol=RTOL, atol=ATOL, err_msg=name)
    np.testing.assert_allclose(np.asarray(g_x), f["grad_x"], rtol=RTOL, atol=ATOL)
