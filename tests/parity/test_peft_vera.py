"""VeRA against Hugging Face PEFT's ``VeraConfig``.

PEFT draws one shared pair ``vera_A: [r, in_max]``, ``vera_B: [out_max, r]``
with a torch generator that JAX cannot reproduce, so the test imports them
(``save_projection=True`` makes them part of the checkpoint) into
``adapters["_shared"]`` (transposed) and copies random ``vera_lambda_b/d``.
The targeted layers have different shapes (16->24 and 24->16), so each one
uses a different slice of the shared pair.
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


def build(targets, r=4, randomize=True):
    net = make_torch_net(0)
    variables = flax_variables(net)
    config = peft.VeraConfig(r=r, target_modules=targets, save_projection=True, d_initial=0.1)
    peft_model = peft.get_peft_model(net, config).eval()
    if randomize:
        gen = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for name in peft_adapted_names(peft_model):
                mod = peft_module(peft_model, name)
                for p in (mod.vera_lambda_b["default"], mod.vera_lambda_d["default"]):
                    p.copy_(torch.randn(p.shape, generator=gen))
    spec = lorajax.Spec("vera", rank=r, targets=targets, d_initial=0.1)
    assert lorajax_names(spec, variables) == peft_adapted_names(peft_model)
    return peft_model, variables, spec


def shared_projections(peft_model):
    """PEFT's model-level buffers ``vera_A [r, in_max]``, ``vera_B [out_max, r]`` (also in the state dict)."""
    a, b = peft_model.base_model.vera_A["default"], peft_model.base_model.vera_B["default"]
    state = peft.get_peft_model_state_dict(peft_model)
    np.testing.assert_array_equal(to_np(state["base_model.vera_A"]), to_np(a))
    return to_np(a), to_np(b)


def import_vera(spec, variables, peft_model):
    adapters = lorajax.init(spec, variables, jax.random.key(0))
    a, b = shared_projections(peft_model)
    adapters = set_adapter(adapters, ("_shared",), {"vera_A": a.T, "vera_B": b.T})
    for t in lorajax.select(spec, variables):
        mod = peft_module(peft_model, t.name)
        adapters = set_adapter(adapters, t.keys, {
            "vera_lambda_b": to_np(mod.vera_lambda_b["default"]),
            "vera_lambda_d": to_np(mod.vera_lambda_d["default"]),
        })
    return adapters


@pytest.mark.parametrize("targets", [ALL, ["q_proj", "v_proj"], ["o_proj"]])
def test_vera_shared_shapes_and_init(targets):
    """Shared shapes are the element-wise max over targets; the init (b = 0, d = d_initial) is the identity."""
    peft_model, variables, spec = build(targets, randomize=False)
    ours = lorajax.init(spec, variables, jax.random.key(0))
    a, b = shared_projections(peft_model)
    assert ours["_shared"]["vera_A"].shape == a.T.shape
    assert ours["_shared"]["vera_B"].shape == b.T.shape
    in_max, r = ours["_shared"]["vera_A"].shape
    # same kaiming-uniform (gain sqrt 2) bounds on both sides
    for x, bound in ((a, np.sqrt(6 / in_max)), (ours["_shared"]["vera_A"], np.sqrt(6 / in_max)),
                     (b, np.sqrt(6 / r)), (ours["_shared"]["vera_B"], np.sqrt(6 / r))):
        assert 0.5 * bound < np.abs(x).max() <= bound
    for t in lorajax.select(spec, variables):
        mod = peft_module(peft_model, t.name)
        got = get_leaf_dict(ours, t.keys)
        np.testing.assert_array_equal(got["vera_lambda_b"], to_np(mod.vera_lambda_b["default"]))
        np.testing.assert_array_equal(got["vera_lambda_d"], to_np(mod.vera_lambda_d["default"]))
    x = inputs(0)
    out = lorajax.adapt(FlaxNet().apply, spec, "factored")(variables, ours, jnp.asarray(x))
    assert_close(out, torch_out(peft_model, x))


@pytest.mark.parametrize("targets,r", [(ALL, 4), (["v_proj", "o_proj"], 4), (ALL, 20)],
                         ids=["qvo-r4", "vo-r4", "qvo-r20"])
def test_vera_forward_and_merge(targets, r):
    """r=20 exceeds min(in, out)=16: allowed for VeRA in both libraries."""
    peft_model, variables, spec = build(targets, r=r)
    adapters = import_vera(spec, variables, peft_model)
    model = FlaxNet()
    x = inputs(1)
    want = torch_out(peft_model, x)
    assert np.abs(want - np.asarray(model.apply(variables, x))).max() > 1e-2
    for mode in MODES:
        assert_close(lorajax.adapt(model.apply, spec, mode=mode)(variables, adapters, jnp.asarray(x)), want,
                     what=mode)
    # per-layer delta: PEFT's get_delta_weight [out, in] is lorajax's (merge - W) transposed
    merged = lorajax.merge(spec, variables, adapters)
    for t in lorajax.select(spec, variables):
        delta = get_leaf_dict(merged, t.keys[:-1])["kernel"] - get_leaf_dict(variables, t.keys[:-1])["kernel"]
        assert_close(delta, to_np(peft_module(peft_model, t.name).get_delta_weight("default")).T, what=t.name)
    assert_weights_match(merged, peft_model.merge_and_unload())


def test_vera_gradients():
    peft_model, variables, spec = build(ALL)
    adapters = import_vera(spec, variables, peft_model)
    x = inputs(3)
    g = np.random.default_rng(4).standard_normal(x.shape).astype(np.float32)
    peft_model.zero_grad()
    (peft_model(torch.from_numpy(x)) * torch.from_numpy(g)).sum().backward()
    trainable, frozen = lorajax.partition(spec, adapters)
    model = FlaxNet()
    for mode in MODES:
        fwd = lorajax.adapt(model.apply, spec, mode=mode)
        grads = jax.grad(
            lambda tr: jnp.sum(fwd(variables, lorajax.combine(tr, frozen), jnp.asarray(x)) * g)
        )(trainable)
        assert grads["_shared"]["vera_A"] is None and grads["_shared"]["vera_B"] is None
        for t in lorajax.select(spec, variables):
            mod = peft_module(peft_model, t.name)
            gt = get_leaf_dict(grads, t.keys)
            for k in ("vera_lambda_b", "vera_lambda_d"):
                assert_close(gt[k], to_np(getattr(mod, k)["default"].grad), what=f"{mode} d{k} {t.name}")
