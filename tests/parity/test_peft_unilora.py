"""Uni-LoRA against Hugging Face PEFT's ``UniLoraConfig``.

PEFT lays all LoRA factors out in ``model.modules()`` order
(``layers.0.q_proj``, ``v_proj``, ``o_proj``, ``layers.1...``) and builds the
index vector with ``numpy.random.default_rng(proj_seed)``, so lorajax, with
``target_order=("q_proj", "v_proj", "o_proj")``, reproduces PEFT's indices bit
for bit (checked against the buffers of PEFT's state dict,
``save_indices=True``). The other path imports those buffers instead: with
lorajax's own (pytree) layout order the regenerated indices differ, and the
imported ones give PEFT's outputs. ``θ_d`` comes from torch's global RNG in
PEFT, so it is always imported.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import lorajax  # noqa: E402

from _torch_models import (  # noqa: E402
    FlaxNet,
    assert_close,
    assert_weights_match,
    flax_variables,
    get_leaf_dict,
    inputs,
    lorajax_names,
    make_torch_net,
    peft_adapted_names,
    peft_module,
    set_adapter,
    to_np,
    torch_name,
    torch_out,
)

MODES = ("merged", "factored")
ALL = ["q_proj", "v_proj", "o_proj"]
ORDER = ("q_proj", "v_proj", "o_proj")  # TorchBlock's registration order


def build(targets, r=4, d=64, seed=42, order=ORDER, randomize=True):
    net = make_torch_net(0)
    variables = flax_variables(net)
    torch.manual_seed(1)
    config = peft.UniLoraConfig(r=r, target_modules=targets, theta_d_length=d, proj_seed=seed, save_indices=True)
    peft_model = peft.get_peft_model(net, config).eval()
    if randomize:  # larger than PEFT's U(±0.02), so that the update is well above rounding
        gen = torch.Generator().manual_seed(2)
        with torch.no_grad():
            theta = peft_model.base_model.unilora_theta_d["default"]
            theta.copy_(torch.randn(theta.shape, generator=gen))
    spec = lorajax.Spec("unilora", rank=r, targets=targets, theta_d_length=d, proj_seed=seed, target_order=order)
    assert lorajax_names(spec, variables) == peft_adapted_names(peft_model)
    return peft_model, variables, spec


def peft_state(peft_model):
    """θ_d and, per module, ``(indices_A [r, in], indices_B [out, r], scales_A, scales_B)`` from the state dict."""
    state = peft.get_peft_model_state_dict(peft_model)
    theta = to_np(state["base_model.unilora_theta_d"])
    per = {}
    for name in peft_adapted_names(peft_model):
        pre = f"base_model.model.{name}.unilora_"
        per[name] = tuple(to_np(state[pre + k]) for k in ("indices_A", "indices_B", "scales_A", "scales_B"))
    return theta, per


def import_unilora(spec, variables, peft_model, indices=True):
    """lorajax adapters with PEFT's θ_d and (with ``indices``) PEFT's index buffers, transposed to Flax."""
    adapters = lorajax.init(spec, variables, jax.random.key(0))
    theta, per = peft_state(peft_model)
    shared = dict(adapters["_shared"])
    shared["unilora_theta_d"] = jnp.asarray(theta)
    if indices:
        blocks = {}
        norm = np.zeros(theta.shape, np.float32)
        for t in lorajax.select(spec, variables):
            ia, ib, sa, sb = per[torch_name(t.name)]
            blocks[t.name] = {"unilora_indices_A": jnp.asarray(ia.T, jnp.int32),
                              "unilora_indices_B": jnp.asarray(ib.T, jnp.int32)}
            norm[ia], norm[ib] = sa, sb  # PEFT's per-position scales are c[index]
        shared["unilora_indices"] = blocks
        shared["unilora_norm"] = jnp.asarray(norm)
    return {**adapters, "_shared": shared}


@pytest.mark.parametrize("targets,r,d,seed", [(ALL, 4, 64, 42), (ALL, 3, 100, 7), (["v_proj", "o_proj"], 2, 512, 0)],
                         ids=["qvo-r4-d64", "qvo-r3-d100", "vo-r2-d512"])
def test_unilora_reproduces_peft_indices(targets, r, d, seed):
    """lorajax.init's indices equal PEFT's buffers exactly, its scales c[idx] PEFT's scales (D < d included)."""
    peft_model, variables, spec = build(targets, r=r, d=d, seed=seed, randomize=False)
    ours = lorajax.init(spec, variables, jax.random.key(0))["_shared"]
    _, per = peft_state(peft_model)
    norm = np.asarray(ours["unilora_norm"])
    for t in lorajax.select(spec, variables):
        ia, ib, sa, sb = per[torch_name(t.name)]
        blk = ours["unilora_indices"][t.name]
        np.testing.assert_array_equal(np.asarray(blk["unilora_indices_A"]), ia.T, err_msg=t.name)
        np.testing.assert_array_equal(np.asarray(blk["unilora_indices_B"]), ib.T, err_msg=t.name)
        np.testing.assert_allclose(norm[ia], sa, rtol=1e-6, err_msg=t.name)
        np.testing.assert_allclose(norm[ib], sb, rtol=1e-6, err_msg=t.name)
    # the whole vector equals PEFT's own generator
    big_d = sum(r * sum(t.matrix_shape) for t in lorajax.select(spec, variables))
    want = peft.tuners.unilora.model.UniLoraModel.generate_index(big_d, d, seed).numpy()
    np.testing.assert_array_equal(lorajax.variants.unilora.generate_index(big_d, d, seed), want)


def test_unilora_pytree_order_differs_and_imported_indices_match():
    """Without ``target_order`` the layout is lorajax's (o, q, v per layer): other indices; importing fixes it."""
    peft_model, variables, spec = build(ALL, order=None)
    _, per = peft_state(peft_model)
    ours = lorajax.init(spec, variables, jax.random.key(0))["_shared"]["unilora_indices"]
    assert not np.array_equal(np.asarray(ours["model.layers.0.q_proj"]["unilora_indices_A"]),
                              per["model.layers.0.q_proj"][0].T)
    adapters = import_unilora(spec, variables, peft_model, indices=True)
    x = inputs(5)
    want = torch_out(peft_model, x)
    for mode in MODES:
        assert_close(lorajax.adapt(FlaxNet().apply, spec, mode=mode)(variables, adapters, jnp.asarray(x)), want,
                     what=mode)


@pytest.mark.parametrize("indices", ["reproduced", "imported"])
@pytest.mark.parametrize("targets", [ALL, ["o_proj"]], ids=["qvo", "o"])
def test_unilora_forward_and_merge(indices, targets):
    peft_model, variables, spec = build(targets)
    adapters = import_unilora(spec, variables, peft_model, indices=indices == "imported")
    model = FlaxNet()
    x = inputs(1)
    want = torch_out(peft_model, x)
    assert np.abs(want - np.asarray(model.apply(variables, x))).max() > 1e-2
    for mode in MODES:
        assert_close(lorajax.adapt(model.apply, spec, mode=mode)(variables, adapters, jnp.asarray(x)), want,
                     what=mode)
    merged = lorajax.merge(spec, variables, adapters)
    for t in lorajax.select(spec, variables):
        delta = get_leaf_dict(merged, t.keys[:-1])["kernel"] - get_leaf_dict(variables, t.keys[:-1])["kernel"]
        assert_close(delta, to_np(peft_module(peft_model, t.name).get_delta_weight("default")).T, what=t.name)
    assert_weights_match(merged, peft_model.merge_and_unload())


def test_unilora_init_changes_the_output_in_both_libraries():
    """PEFT's default θ_d ~ U(±0.02): the model differs from the base at step 0, here and there."""
    peft_model, variables, spec = build(ALL, randomize=False)
    adapters = import_unilora(spec, variables, peft_model, indices=False)
    x = inputs(6)
    want = torch_out(peft_model, x)
    base = np.asarray(FlaxNet().apply(variables, x))
    assert np.abs(want - base).max() > 1e-5
    assert_close(lorajax.adapt(FlaxNet().apply, spec, mode="factored")(variables, adapters, jnp.asarray(x)), want)


def test_unilora_gradients():
    peft_model, variables, spec = build(ALL)
    adapters = import_unilora(spec, variables, peft_model, indices=False)
    x = inputs(3)
    g = np.random.default_rng(4).standard_normal(x.shape).astype(np.float32)
    peft_model.zero_grad()
    (peft_model(torch.from_numpy(x)) * torch.from_numpy(g)).sum().backward()
    want = to_np(peft_model.base_model.unilora_theta_d["default"].grad)
    trainable, frozen = lorajax.partition(spec, adapters)
    model = FlaxNet()
    for mode in MODES:
        fwd = lorajax.adapt(model.apply, spec, mode=mode)
        grads = jax.grad(
            lambda tr: jnp.sum(fwd(variables, lorajax.combine(tr, frozen), jnp.asarray(x)) * g)
        )(trainable)
        assert [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(grads)[0]] == \
            ["['_shared']['unilora_theta_d']"]
        assert_close(grads["_shared"]["unilora_theta_d"], want, what=mode)
