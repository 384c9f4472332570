"""FlyLoRA against numbers from the official code (tests/fixtures/flylora/README.md).

The fixture holds the authors' PEFT-fork layer's frozen sparse A, a random B and
routing bias, two forwards (with the bias update in between), and one loss's
gradients. The weights are imported (PyTorch ``[out, in]`` -> Flax ``[in, out]``)
and lorajax's factored forward, aux counts + `lorajax.update_state`, and
gradients are compared with them.
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file

import lorajax

PATH = os.path.join(os.path.dirname(__file__), os.pardir, "fixtures", "flylora", "fixture.safetensors")
F = load_file(PATH)
with safe_open(PATH, "np") as fh:
    META = fh.metadata()
R, K = int(META["r"]), int(META["top_k"])
RTOL, ATOL = 1e-5, 1e-5


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(F["base_weight"].shape[0], name="proj")(x)


def _setup():
    spec = lorajax.Spec("flylora", rank=R, alpha=float(META["lora_alpha"]), targets=["proj"], top_k=K,
                        bias_u=float(META["bias_u"]))
    variables = {"params": {"proj": {"kernel": jnp.asarray(F["base_weight"].T), "bias": jnp.asarray(F["base_bias"])}}}
    adapters = lorajax.init(spec, variables, jax.random.key(0))
    adapters["params"]["proj"]["kernel"] = {
        "lora_A": jnp.asarray(F["lora_A"].T), "lora_B": jnp.asarray(F["lora_B"].T),
        "lora_topk_bias": jnp.asarray(F["bias_0"]),
    }
    return spec, variables, adapters, lorajax.adapt(Net().apply, spec)


def test_official_sparse_a_has_the_density_we_draw():
    """Same rule on both sides: p = in // (r // k) nonzeros per rank."""
    spec, variables, adapters, _ = _setup()
    d_in = F["lora_A"].shape[1]
    np.testing.assert_array_equal((F["lora_A"] != 0).sum(axis=1), d_in // (R // K))
    ours = lorajax.init(spec, variables, jax.random.key(1))["params"]["proj"]["kernel"]["lora_A"]
    np.testing.assert_array_equal(np.asarray(ours != 0).sum(axis=0), d_in // (R // K))


def test_two_forwards_and_bias_updates_match_official():
    spec, variables, adapters, fwd = _setup()
    for step in (1, 2):
        y, aux = fwd(variables, adapters, jnp.asarray(F[f"x{step}"]), adapter_aux=True)
        np.testing.assert_allclose(np.asarray(y), F[f"y{step}"], rtol=RTOL, atol=ATOL, err_msg=f"forward {step}")
        counts = aux["params"]["proj"]["kernel"]["counts"]
        assert float(counts.sum()) == F["x1"].shape[0] * F["x1"].shape[1] * K
        adapters = lorajax.update_state(spec, variables, adapters, aux)
        np.testing.assert_allclose(np.asarray(adapters["params"]["proj"]["kernel"]["lora_topk_bias"]),
                                   F[f"bias_{step}"], rtol=RTOL, atol=1e-7, err_msg=f"bias after forward {step}")
    assert not np.allclose(F["bias_1"], F["bias_0"])  # the fixture exercises the update


def test_gradients_match_official():
    spec, variables, adapters, fwd = _setup()
    trainable, frozen = lorajax.partition(spec, adapters)
    cot = jnp.asarray(F["cotangent"])

    def loss(tr, x):
        return jnp.sum(fwd(variables, lorajax.combine(tr, frozen), x) * cot)

    g_tr, g_x = jax.grad(loss, argnums=(0, 1))(trainable, jnp.asarray(F["x1"]))
    np.testing.assert_allclose(np.asarray(g_tr["params"]["proj"]["kernel"]["lora_B"]), F["grad_lora_B"].T,
                               rtol=RTOL, atol=ATOL)
    # the adapter branch is computed without gradient (torch.no_grad / stop_gradient): d/dx is the base's only
    np.testing.assert_allclose(np.asarray(g_x), F["grad_x1"], rtol=RTOL, atol=ATOL)
