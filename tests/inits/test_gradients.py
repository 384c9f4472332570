"""`lorajax.inits.estimate_gradients`: averaged float32 gradients of the targeted weights only.

Reference: ``jax.grad`` of the same loss with respect to the whole params
tree, averaged over the batches, restricted to the targeted kernels.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax
from lorajax.inits import gradients


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(12, name="up")(x)
        h = nn.tanh(nn.Dense(12, name="mid")(h))
        return nn.Dense(5, name="down")(h)  # untargeted below: kernel [12, 5]


def _setup(dtype=jnp.float32, n=3):
    model = Net()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 7)))
    variables = jax.tree_util.tree_map(lambda x: x.astype(dtype), variables)
    rng = np.random.default_rng(0)
    batches = [(rng.standard_normal((4, 7)).astype(np.float32), rng.standard_normal((4, 5)).astype(np.float32))
               for _ in range(n)]

    def loss_fn(params, batch):
        x, y = batch
        out = model.apply(params, x.astype(dtype)).astype(jnp.float32)
        return jnp.mean((out - y) ** 2)

    return model, variables, batches, loss_fn


SPEC = lorajax.Spec("lora", rank=2, targets=["up", "mid"])


def test_equals_the_mean_of_full_gradients():
    _, variables, batches, loss_fn = _setup()
    got = lorajax.inits.estimate_gradients(SPEC, loss_fn, variables, batches)
    full = [jax.grad(loss_fn)(variables, b) for b in batches]
    assert set(got) == {"params"} and set(got["params"]) == {"up", "mid"}
    for name in ("up", "mid"):
        want = np.mean([np.asarray(g["params"][name]["kernel"]) for g in full], axis=0)
        leaf = got["params"][name]["kernel"]
        assert leaf.dtype == jnp.float32 and leaf.shape == variables["params"][name]["kernel"].shape
        np.testing.assert_allclose(np.asarray(leaf), want, rtol=1e-6, atol=1e-7)


def test_bare_params_and_generators():
    _, variables, batches, loss_fn = _setup()
    params = variables["params"]
    got = lorajax.inits.estimate_gradients(SPEC, lambda p, b: loss_fn({"params": p}, b), params,
                                           (b for b in batches), progress=True)
    ref = lorajax.inits.estimate_gradients(SPEC, loss_fn, variables, batches)
    assert set(got) == {"up", "mid"}
    np.testing.assert_allclose(np.asarray(got["up"]["kernel"]), np.asarray(ref["params"]["up"]["kernel"]),
                               rtol=1e-6)


def test_num_batches_limits_the_average():
    _, variables, batches, loss_fn = _setup(n=4)
    got = lorajax.inits.estimate_gradients(SPEC, loss_fn, variables, iter(batches), num_batches=2)
    want = lorajax.inits.estimate_gradients(SPEC, loss_fn, variables, batches[:2])
    np.testing.assert_array_equal(np.asarray(got["params"]["mid"]["kernel"]),
                                  np.asarray(want["params"]["mid"]["kernel"]))


def test_bf16_params_accumulate_in_float32():
    _, v32, batches, loss32 = _setup()
    _, v16, _, loss16 = _setup(jnp.bfloat16)
    got = lorajax.inits.estimate_gradients(SPEC, loss16, v16, batches)
    want = lorajax.inits.estimate_gradients(SPEC, loss32, v32, batches)
    g = got["params"]["up"]["kernel"]
    assert g.dtype == jnp.float32
    w = np.asarray(want["params"]["up"]["kernel"])
    np.testing.assert_allclose(np.asarray(g), w, atol=0.05 * np.abs(w).max())


def test_compiles_once_for_same_shaped_batches():
    _, variables, batches, loss_fn = _setup(n=5)
    traces = []

    def counting(params, batch):
        traces.append(1)
        return loss_fn(params, batch)

    lorajax.inits.estimate_gradients(SPEC, counting, variables, batches)
    assert len(traces) == 1


def test_no_gradient_of_untargeted_weights_is_formed():
    """The step's jaxpr never produces an array shaped like the untargeted [12, 5] kernel."""
    _, variables, batches, loss_fn = _setup()
    leaves = dict(lorajax.targets.weight_leaves(variables))
    weights = {"/".join(t.keys): leaves[t.keys] for t in lorajax.select(SPEC, variables)}
    acc = {k: jnp.zeros(w.shape, jnp.float32) for k, w in weights.items()}
    jaxpr = jax.make_jaxpr(gradients._grad_step(loss_fn))(acc, weights, variables, batches[0])

    def shapes(jp):  # output shapes of every equation, nested jaxprs (pjit, custom_jvp, ...) included
        for eqn in jp.eqns:
            for v in eqn.outvars:
                yield tuple(getattr(v.aval, "shape", ()))
            for val in eqn.params.values():
                for sub in val if isinstance(val, (tuple, list)) else (val,):
                    sub = getattr(sub, "jaxpr", sub)
                    if hasattr(sub, "eqns"):
                        yield from shapes(sub)

    produced = set(shapes(jaxpr.jaxpr))
    assert (7, 12) in produced and (12, 12) in produced  # the targets' gradients
    assert (12, 5) not in produced                       # no gradient for "down"'s kernel
    # while differentiating everything would form it
    full = jax.make_jaxpr(jax.grad(loss_fn))(variables, batches[0])
    assert (12, 5) in set(shapes(full.jaxpr))


def test_errors():
    _, variables, batches, loss_fn = _setup()
    with pytest.raises(ValueError, match="no batches"):
        lorajax.inits.estimate_gradients(SPEC, loss_fn, variables, [])
    with pytest.raises(ValueError, match="num_batches"):
        lorajax.inits.estimate_gradients(SPEC, loss_fn, variables, batches, num_batches=0)
    with pytest.raises(ValueError, match="matches no weight"):
        lorajax.inits.estimate_gradients(lorajax.Spec("lora", rank=2, targets=["nope"]), loss_fn, variables, batches)


def test_lookup_errors_name_the_path():
    grads = {"a": {"kernel": jnp.zeros((3, 2))}}
    assert gradients.lookup({"params": grads}, ("a", "kernel"), (3, 2)).shape == (3, 2)
    assert gradients.lookup(grads, ("params", "a", "kernel"), (3, 2)).shape == (3, 2)
    with pytest.raises(ValueError, match="b/kernel"):
        gradients.lookup(grads, ("b", "kernel"), (3, 2))
    with pytest.raises(ValueError, match=r"a/kernel has shape \(3, 2\)"):
        gradients.lookup(grads, ("a", "kernel"), (2, 3))
