"""ESSA's SVD form of LoRA adapters: both readings round-trip; bad input gives clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax
from lorajax.es import svd

PARAMS = {"a": {"kernel": jnp.ones((12, 7))}, "b": {"kernel": jnp.ones((5, 9))}}


def make(rank=3, rslora=False, seed=0, **kw):
    spec = lorajax.Spec("lora", rank=rank, alpha=6.0, targets=["a", "b"], init_weights=False, use_rslora=rslora, **kw)
    return spec, lorajax.init(spec, PARAMS, jax.random.key(seed))


def delta(spec, adapters):
    m = lorajax.merge(spec, PARAMS, adapters)
    return {k: np.asarray(m[k]["kernel"] - PARAMS[k]["kernel"]) for k in PARAMS}


@pytest.mark.parametrize("rslora", [False, True])
def test_product_round_trip(rslora):
    spec, adapters = make(rslora=rslora)
    tree = svd.to_svd(spec, PARAMS, adapters, "product")
    for k in PARAMS:
        e = tree[k]["kernel"]
        d_in, d_out = PARAMS[k]["kernel"].shape
        assert e["U"].shape == (d_in, 3) and e["V"].shape == (d_out, 3) and e["sigma"].shape == (3,)
        np.testing.assert_allclose(e["U"].T @ e["U"], np.eye(3), atol=1e-5)
        np.testing.assert_allclose(e["V"].T @ e["V"], np.eye(3), atol=1e-5)
        assert np.all(np.diff(np.asarray(e["sigma"])) <= 0)
        # U diag(σ) Vᵀ is s·A·B itself
        np.testing.assert_allclose((e["U"] * e["sigma"][None, :]) @ e["V"].T, delta(spec, adapters)[k], rtol=1e-5, atol=1e-6)
        # σ are the singular values of s·A·B
        np.testing.assert_allclose(e["sigma"], np.linalg.svd(delta(spec, adapters)[k], compute_uv=False)[:3],
                                   rtol=1e-5)
    back = svd.from_svd(spec, PARAMS, tree)
    for k, d in delta(spec, back).items():
        np.testing.assert_allclose(d, delta(spec, adapters)[k], rtol=1e-5, atol=1e-6)
    # twice: the same tree (canonical signs)
    again = svd.to_svd(spec, PARAMS, back, "product")
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(tree)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_factor_round_trip_gives_the_factors_back():
    spec, adapters = make()
    tree = svd.to_svd(spec, PARAMS, adapters, "factor")
    e = tree["a"]["kernel"]
    assert e["U_A"].shape == (12, 3) and e["V_A"].shape == (3, 3) and e["U_B"].shape == (3, 3)
    assert e["V_B"].shape == (7, 3) and e["sigma_A"].shape == e["sigma_B"].shape == (3,)
    np.testing.assert_allclose(e["sigma_A"], np.linalg.svd(adapters["a"]["kernel"]["lora_A"], compute_uv=False),
                               rtol=1e-5)
    back = svd.from_svd(spec, PARAMS, tree)
    for k in PARAMS:
        for f in ("lora_A", "lora_B"):
            np.testing.assert_allclose(back[k]["kernel"][f], adapters[k]["kernel"][f], rtol=1e-5, atol=1e-6)
    again = svd.to_svd(spec, PARAMS, back, "factor")
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(tree)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_scaled_sigma_scales_the_update():
    spec, adapters = make()
    tree = svd.to_svd(spec, PARAMS, adapters, "product")
    tree2 = jax.tree_util.tree_map_with_path(
        lambda p, x: 2 * x if str(p[-1].key) == "sigma" else x, tree)
    d1, d2 = delta(spec, adapters), delta(spec, svd.from_svd(spec, PARAMS, tree2))
    for k in PARAMS:
        np.testing.assert_allclose(d2[k], 2 * d1[k], rtol=1e-5, atol=1e-6)


def test_variables_dict_and_as_svd_pass_through():
    spec, adapters = make()
    variables = {"params": PARAMS}
    wrapped = lorajax.init(spec, variables, jax.random.key(0))
    tree = svd.as_svd(spec, variables, wrapped, "factor")
    assert "params" in tree
    assert svd.as_svd(spec, variables, tree, "factor") is tree
    assert svd.form_of(tree) == "factor" and svd.form_of(wrapped) == "lora"
    assert [k for _, k in svd.sigma_leaves(tree)] == ["sigma_A", "sigma_B"] * 2


def test_bad_input():
    spec, adapters = make()
    tree = svd.to_svd(spec, PARAMS, adapters, "product")
    with pytest.raises(ValueError, match="SVD form 'product'.*'factor'"):
        svd.as_svd(spec, PARAMS, tree, "factor")
    with pytest.raises(ValueError, match="already in SVD form"):
        svd.to_svd(spec, PARAMS, tree)
    with pytest.raises(ValueError, match="form must be one of"):
        svd.to_svd(spec, PARAMS, adapters, "both")
    with pytest.raises(ValueError, match="expected LoRA adapters"):
        svd.as_svd(spec, PARAMS, {"a": {"kernel": {"foo": jnp.ones(3)}}, "b": {"kernel": {"foo": jnp.ones(3)}}})
    dora = lorajax.Spec("dora", rank=3, targets=["a", "b"])
    with pytest.raises(ValueError, match="plain LoRA adapters.*'dora'"):
        svd.as_svd(dora, PARAMS, lorajax.init(dora, PARAMS, 0))
    nan = jax.tree.map(lambda x: x, adapters)
    nan["a"]["kernel"]["lora_B"] = nan["a"]["kernel"]["lora_B"].at[0, 0].set(jnp.nan)
    with pytest.raises(ValueError, match="non-finite"):
        svd.to_svd(spec, PARAMS, nan)
    wrong = jax.tree.map(lambda x: x, adapters)
    wrong["a"]["kernel"]["lora_A"] = jnp.ones((12, 2))
    with pytest.raises(ValueError, match="do not fit"):
        svd.to_svd(spec, PARAMS, wrong)
    bad_shape = jax.tree.map(lambda x: x, tree)
    bad_shape["a"]["kernel"]["U"] = jnp.ones((12, 2))
    with pytest.raises(ValueError, match="expected"):
        svd.as_svd(spec, PARAMS, bad_shape)


def test_fresh_lora_warns():
    spec = lorajax.Spec("lora", rank=2, targets=["a"])
    with pytest.warns(UserWarning, match="all singular values are zero"):
        tree = svd.to_svd(spec, PARAMS, lorajax.init(spec, PARAMS, 0))
    np.testing.assert_array_equal(tree["a"]["kernel"]["sigma"], 0.0)
