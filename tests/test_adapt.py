"""adapt(): mode errors, factored coverage checks, NaN debug flag, mismatched adapters."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="out")(nn.relu(nn.Dense(5, name="hidden")(x)))


@pytest.fixture(scope="module")
def setup():
    model = MLP()
    x = jax.random.normal(jax.random.key(0), (2, 4))
    variables = model.init(jax.random.key(1), x)
    spec = lorajax.Spec("lora", rank=2, targets=["hidden", "out"], init_weights=False)
    adapters = lorajax.init(spec, variables, jax.random.key(2))
    return model, x, variables, spec, adapters


def test_bad_mode(setup):
    model, _, _, spec, _ = setup
    with pytest.raises(ValueError, match="mode"):
        lorajax.adapt(model.apply, spec, mode="fused")


def test_factored_equals_hand_formula(setup):
    model, x, v, spec, a = setup
    p, s = v["params"], spec.alpha / spec.rank
    h_a, o_a = a["params"]["hidden"]["kernel"], a["params"]["out"]["kernel"]
    h = x @ (p["hidden"]["kernel"] + s * h_a["lora_A"] @ h_a["lora_B"]) + p["hidden"]["bias"][None, :]
    want = jax.nn.relu(h) @ (p["out"]["kernel"] + s * o_a["lora_A"] @ o_a["lora_B"]) + p["out"]["bias"][None, :]
    for mode in ("factored", "merged"):
        np.testing.assert_allclose(lorajax.adapt(model.apply, spec, mode)(v, a, x), want, rtol=1e-5, atol=1e-6)


def test_factored_on_non_linen_function_raises(setup):
    _, x, v, spec, a = setup

    def plain(variables, x):  # uses the weights without any linen module
        return x @ variables["params"]["hidden"]["kernel"]

    with pytest.raises(ValueError, match="reached none"):
        lorajax.adapt(plain, spec, mode="factored")(v, a, x)
    # merged mode works for any function of the params
    out = lorajax.adapt(plain, spec, mode="merged")(v, a, x)
    assert out.shape == (2, 5)


def test_missing_and_extra_adapters_name_the_path(setup):
    model, x, v, spec, a = setup
    missing = {"params": {"out": a["params"]["out"]}}
    with pytest.raises(ValueError, match="no adapter for params/hidden/kernel"):
        lorajax.merge(spec, v, missing)
    extra = {"params": {**a["params"], "other": {"kernel": a["params"]["out"]["kernel"]}}}
    with pytest.raises(ValueError, match="params/other"):
        lorajax.adapt(model.apply, spec, "factored")(v, extra, x)


def test_wrong_adapter_shape_names_the_path(setup):
    _, _, v, spec, a = setup
    bad = jax.tree.map(lambda t: t, a)
    bad["params"]["hidden"]["kernel"]["lora_A"] = jnp.zeros((7, 2))
    with pytest.raises(ValueError, match="params/hidden/kernel"):
        lorajax.merge(spec, v, bad)


def test_debug_flag_catches_nan(setup):
    model, x, v, spec, a = setup
    bad = jax.tree.map(lambda t: t, a)
    bad["params"]["out"]["kernel"]["lora_B"] = a["params"]["out"]["kernel"]["lora_B"].at[0, 0].set(jnp.nan)
    fn = lorajax.adapt(model.apply, spec, "factored", debug=True)
    with pytest.raises(FloatingPointError, match="params/out/kernel/lora_B"):
        fn(v, bad, x)
    with pytest.raises(Exception, match="params/out/kernel/lora_B"):  # inside jit: via debug.callback
        jax.block_until_ready(jax.jit(fn)(v, bad, x))
    # without the flag, no check (and no error)
    assert bool(jnp.isnan(lorajax.adapt(model.apply, spec, "factored")(v, bad, x)).any())


def test_init_accepts_int_seed_and_rejects_junk(setup):
    _, _, v, spec, a = setup
    a2 = lorajax.init(spec, v, 2)
    np.testing.assert_array_equal(a2["params"]["out"]["kernel"]["lora_A"], a["params"]["out"]["kernel"]["lora_A"])
    with pytest.raises(TypeError, match="key"):
        lorajax.init(spec, v, "seed")


def test_adding_a_target_changes_no_other_init(setup):
    _, _, v, _, _ = setup
    one = lorajax.init(lorajax.Spec("lora", 2, targets=["out"]), v, 0)
    two = lorajax.init(lorajax.Spec("lora", 2, targets=["out", "hidden"]), v, 0)
    np.testing.assert_array_equal(one["params"]["out"]["kernel"]["lora_A"], two["params"]["out"]["kernel"]["lora_A"])


def test_count_params(setup):
    _, _, v, spec, a = setup
    c = lorajax.count_params(spec, v, a)
    assert c["trainable"] == 2 * (4 + 5) + 2 * (5 + 3)
    assert c["base"] == 4 * 5 + 5 + 5 * 3 + 3
    assert c["total"] == c["base"] + c["trainable"]


def test_vera_partition_keeps_projections_out_of_grads():
    params = {"a": {"kernel": jnp.ones((4, 6))}, "b": {"kernel": jnp.ones((6, 4))}}
    spec = lorajax.Spec("vera", rank=3, targets=["a", "b"])
    adapters = lorajax.init(spec, params, 0)
    trainable, frozen = lorajax.partition(spec, adapters)
    assert trainable["_shared"]["vera_A"] is None and frozen["_shared"]["vera_A"] is not None
    mask = lorajax.trainable_mask(spec, adapters)
    assert mask["_shared"]["vera_B"] is False and mask["a"]["kernel"]["vera_lambda_b"] is True
    g = jax.grad(lambda tr: jnp.sum(lorajax.merge(spec, params, lorajax.combine(tr, frozen))["a"]["kernel"] ** 2))(
        trainable)
    assert g["_shared"]["vera_A"] is None
    assert jax.tree.structure(lorajax.combine(trainable, frozen)) == jax.tree.structure(adapters)


def test_adapters_for_bare_params_work_with_variables(setup):
    model, x, v, spec, a = setup
    bare = lorajax.init(spec, v["params"], jax.random.key(2))  # same keys per target: same values
    for mode in ("factored", "merged"):
        fwd = lorajax.adapt(model.apply, spec, mode)
        np.testing.assert_array_equal(fwd(v, bare, x), fwd(v, a, x))
    merged = lorajax.merge(spec, v["params"], a)  # and variables-made adapters on bare params
    np.testing.assert_array_equal(merged["out"]["kernel"], lorajax.merge(spec, v, a)["params"]["out"]["kernel"])
