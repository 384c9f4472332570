"""MiSS against Hugging Face PEFT's ``MissConfig`` in all three modes.

``miss_block`` has the same layout on both sides (``[r, out]``, ``[r, mini_r]``
or ``[out/r, r, r]``), so it is copied as is. The net's layers are 16->24
(q, v) and 24->16 (o); r=5 exercises the zero-padding of the input
(16 % 5 = 1, 24 % 5 = 4). Compared: outputs in both modes, merged weights
(``merge_and_unload``), and the gradient of ``miss_block`` for one loss.
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
    torch_out,
)

MODES = ("merged", "factored")
ALL = ["q_proj", "v_proj", "o_proj"]
CASES = {  # id: (r, init_weights, mini_r)
    "default-r4": (4, True, 1),
    "default-r5-padded": (5, True, 1),
    "mini-r4-m8": (4, "mini", 8),
    "bat-r4": (4, "bat", 1),
    "bat-r8": (8, "bat", 1),
}


def build(case, randomize=True):
    r, mode, mini_r = CASES[case]
    net = make_torch_net(0)
    variables = flax_variables(net)
    config = peft.MissConfig(r=r, target_modules=ALL, init_weights=mode, mini_r=mini_r)
    peft_model = peft.get_peft_model(net, config).eval()
    if randomize:
        gen = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for name in peft_adapted_names(peft_model):
                p = peft_module(peft_model, name).miss_block["default"]
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    spec = lorajax.Spec("miss", rank=r, targets=ALL, init_weights=mode, mini_r=mini_r)
    assert lorajax_names(spec, variables) == peft_adapted_names(peft_model)
    return peft_model, variables, spec


def import_miss(spec, variables, peft_model):
    adapters = lorajax.init(spec, variables, jax.random.key(0))
    state = peft.get_peft_model_state_dict(peft_model)
    for t in lorajax.select(spec, variables):
        block = to_np(state[f"base_model.model.{t.name}.miss_block"])  # no transpose in any mode
        adapters = set_adapter(adapters, t.keys, {"miss_block": block})
    return adapters


@pytest.mark.parametrize("case", ["default-r5-padded", "mini-r4-m8", "bat-r4"])
def test_miss_init_is_identity_and_same_shapes(case):
    peft_model, variables, spec = build(case, randomize=False)
    ours = lorajax.init(spec, variables, jax.random.key(0))
    for t in lorajax.select(spec, variables):
        theirs = to_np(peft_module(peft_model, t.name).miss_block["default"])
        np.testing.assert_array_equal(get_leaf_dict(ours, t.keys)["miss_block"], theirs)
    x = inputs(0)
    for mode in MODES:
        assert_close(lorajax.adapt(FlaxNet().apply, spec, mode)(variables, ours, jnp.asarray(x)),
                     torch_out(peft_model, x), what=mode)


@pytest.mark.parametrize("case", list(CASES))
def test_miss_forward_and_merge(case):
    peft_model, variables, spec = build(case)
    adapters = import_miss(spec, variables, peft_model)
    model = FlaxNet()
    x = inputs(1)
    want = torch_out(peft_model, x)
    assert np.abs(want - np.asarray(model.apply(variables, x))).max() > 1e-2
    for mode in MODES:
        assert_close(lorajax.adapt(model.apply, spec, mode=mode)(variables, adapters, jnp.asarray(x)), want,
                     what=mode)
    merged = lorajax.merge(spec, variables, adapters)
    if CASES[case][1] == "bat":  # PEFT's bat get_delta_weight is W' - W in torch layout
        for t in lorajax.select(spec, variables):
            mod = peft_module(peft_model, t.name)
            w = mod.get_base_layer().weight.detach().clone()
            delta = get_leaf_dict(merged, t.keys[:-1])["kernel"] - get_leaf_dict(variables, t.keys[:-1])["kernel"]
            assert_close(delta, to_np(mod.get_delta_weight("default", w)).T, what=t.name)
    assert_weights_match(merged, peft_model.merge_and_unload())


@pytest.mark.parametrize("case", ["default-r5-padded", "mini-r4-m8", "bat-r4"])
def test_miss_gradients(case):
    peft_model, variables, spec = build(case)
    adapters = import_miss(spec, variables, peft_model)
    x = inputs(3)
    g = np.random.default_rng(4).standard_normal(x.shape).astype(np.float32)
    peft_model.zero_grad()
    (peft_model(torch.from_numpy(x)) * torch.from_numpy(g)).sum().backward()
    model = FlaxNet()
    for mode in MODES:
        fwd = lorajax.adapt(model.apply, spec, mode=mode)
        grads = jax.grad(lambda ad: jnp.sum(fwd(variables, ad, jnp.asarray(x)) * g))(adapters)
        for t in lorajax.select(spec, variables):
            theirs = to_np(peft_module(peft_model, t.name).miss_block["default"].grad)
            assert_close(get_leaf_dict(grads, t.keys)["miss_block"], theirs, what=f"{mode} {t.name}")


@pytest.mark.parametrize("case", ["default-r5-padded", "bat-r4"])
def test_miss_unmerge_matches_peft(case):
    """Unmerging PEFT's merged weights gives PEFT's unmerged weights (bat: (W' - D_q)(I + D_q)^-1 per block)."""
    peft_model, variables, spec = build(case)
    adapters = import_miss(spec, variables, peft_model)
    inner = peft_model.base_model.model
    peft_model.merge_adapter()
    merged = flax_variables(inner)  # the base layers now hold PEFT's merged weights
    assert_weights_match(lorajax.merge(spec, variables, adapters), inner)
    ours = lorajax.unmerge(spec, merged, adapters)
    peft_model.unmerge_adapter()
    assert_weights_match(ours, inner)
    assert_weights_match(variables, inner)
