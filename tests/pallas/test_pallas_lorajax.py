"""lorajax integration: adapt(..., kernel="pallas") and multi-adapter batches (stack_adapters / adapt_multi)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax
from lorajax.multi_adapter import adapt_multi, stack_adapters


class Net(nn.Module):
    """A 3-D Dense, then the flattened 2-D ``[B·S, D]`` layout lorajax's models use."""

    @nn.compact
    def __call__(self, x):
        b, s, _ = x.shape
        h = nn.relu(nn.Dense(20, name="hidden")(x))
        return nn.Dense(7, name="out")(h.reshape(b * s, -1)).reshape(b, s, -1)


@pytest.fixture(scope="module")
def net():
    model = Net()
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 5, 12)), jnp.float32)
    return model, x, model.init(jax.random.key(0), x)


def test_adapt_pallas_kernel_equals_default_factored(net, close):
    model, x, variables = net
    spec = lorajax.Spec("lora", rank=3, alpha=6, targets=["hidden", "out"], init_weights=False)
    adapters = lorajax.init(spec, variables, 1)

    def loss(fn):
        def f(ad):
            out = fn(variables, ad, x)
            return jnp.sum(jnp.sin(out)), out
        return f

    default = lorajax.adapt(model.apply, spec, "factored")
    fused = lorajax.adapt(model.apply, spec, "factored", kernel="pallas")
    ((l0, out0), g0), ((l1, out1), g1) = (jax.jit(jax.value_and_grad(loss(f), has_aux=True))(adapters)
                                          for f in (default, fused))
    close(out1, out0)
    close(l1, l0)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        close(a, b)


def test_adapt_pallas_kernel_flag_errors(net):
    model, _, _ = net
    spec = lorajax.Spec("lora", rank=2, targets=["hidden"])
    with pytest.raises(ValueError, match="kernel='pallas'.*mode='factored'"):
        lorajax.adapt(model.apply, spec, "merged", kernel="pallas")
    with pytest.raises(ValueError, match="plain LoRA adapters.*got variant 'dora'"):
        lorajax.adapt(model.apply, lorajax.Spec("dora", rank=2, targets=["hidden"]), kernel="pallas")
    with pytest.raises(ValueError, match="kernel must be one of"):
        lorajax.adapt(model.apply, spec, kernel="triton")


@pytest.fixture(scope="module")
def pool_setup(net):
    """Three adapters with different ranks, alphas and rsLoRA, and 4 requests."""
    model, x, variables = net
    targets = ["hidden", "out"]
    specs = [lorajax.Spec("lora", rank=2, alpha=4, targets=targets, init_weights=False),
             lorajax.Spec("lora", rank=3, alpha=8, targets=targets, use_rslora=True, init_weights=False),
             lorajax.Spec("lora", rank=1, alpha=2, targets=targets, rank_pattern={"out": 4}, init_weights=False)]
    adapters = [lorajax.init(s, variables, 10 + i) for i, s in enumerate(specs)]
    x4 = jnp.concatenate([x, x[:1] * 0.5])
    ids = jnp.array([2, 0, 2, 1], jnp.int32)
    single = [jax.jit(lorajax.adapt(model.apply, s)) for s in specs]
    alone = jnp.concatenate([single[int(g)](variables, adapters[int(g)], x4[i:i + 1]) for i, g in enumerate(ids)])
    return model, variables, specs, adapters, x4, ids, alone


@pytest.mark.parametrize("kernel", [None, "pallas"])
def test_adapt_multi_equals_each_request_alone(pool_setup, kernel, close):
    model, variables, specs, adapters, x4, ids, alone = pool_setup
    pool = stack_adapters(specs, adapters)
    assert pool["params"]["out"]["kernel"]["lora_A"].shape == (3, 20, 4)  # ranks 2, 3, 4 padded to 4
    out = jax.jit(adapt_multi(model.apply, specs[0], kernel=kernel))(variables, pool, ids, x4)
    close(out, alone)


def test_adapt_multi_bad_input(pool_setup):
    model, variables, specs, adapters, x4, ids, _ = pool_setup
    pool = stack_adapters(specs, adapters)
    fn = adapt_multi(model.apply, specs[0])
    with pytest.raises(ValueError, match=r"adapter_ids\[1\] = 3 is out of range for a pool of 3"):
        fn(variables, pool, jnp.array([0, 3, 1, 1]), x4)
    with pytest.raises(ValueError, match="1-D integer"):
        fn(variables, pool, jnp.array([0.0, 1.0, 1.0, 1.0]), x4)
    with pytest.raises(ValueError, match="not a multiple of the 3 requests"):
        fn(variables, pool, jnp.array([0, 1, 1]), x4[:2])
    with pytest.raises(ValueError, match="stack_adapters.*plain LoRA adapters"):
        stack_adapters(lorajax.Spec("dora", rank=2, targets=["hidden"]), adapters[:1])
    with pytest.raises(ValueError, match="differ in targets"):
        stack_adapters(specs[0], [adapters[0], {"params": {"hidden": adapters[0]["params"]["hidden"]}}])
    with pytest.raises(ValueError, match="has rank 3 but its spec says 2"):
        stack_adapters(specs[0], [adapters[0], adapters[1]])
    with pytest.raises(ValueError, match="adapt_multi needs plain LoRA adapters"):
        adapt_multi(model.apply, lorajax.Spec("dora", rank=2, targets=["hidden"]))
