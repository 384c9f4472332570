"""RandLoRA against Hugging Face PEFT's ``RandLoraConfig``.

PEFT draws one shared pair of bases ``randlora_A: [r, 1, D_min]``,
``randlora_B: [D_max, N, r]`` with a torch generator that JAX cannot
reproduce, so the test imports them from PEFT's state dict
(``save_projection=True``) into ``adapters["_shared"]`` (same layout) and
copies random ``randlora_lambda [r, nb]`` / ``randlora_gamma [nb, d_min]``.
``q_proj``/``v_proj`` are 16->24 (in < out) and ``o_proj`` is 24->16
(in > out), so both orientations of the update are exercised; the largest
``(out, in)`` is (24, 24), so ``D_min = D_max = 24``.
"""

import math

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


def build(targets, r=4, alpha=8.0, peft_alpha=None, randomize=True, sparse=False, **options):
    net = make_torch_net(0)
    variables = flax_variables(net)
    config = peft.RandLoraConfig(r=r, target_modules=targets, save_projection=True, sparse=sparse,
                                 randlora_alpha=alpha if peft_alpha is None else peft_alpha)
    peft_model = peft.get_peft_model(net, config).eval()
    if randomize:
        gen = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for name in peft_adapted_names(peft_model):
                mod = peft_module(peft_model, name)
                for p in (mod.randlora_lambda["default"], mod.randlora_gamma["default"]):
                    p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    spec = lorajax.Spec("randlora", rank=r, alpha=alpha, targets=targets, sparse=sparse, **options)
    assert lorajax_names(spec, variables) == peft_adapted_names(peft_model)
    return peft_model, variables, spec


def shared_bases(peft_model):
    """PEFT's model-level ``randlora_A``, ``randlora_B`` as saved in its state dict."""
    state = peft.get_peft_model_state_dict(peft_model)
    a, b = to_np(state["base_model.randlora_A"]), to_np(state["base_model.randlora_B"])
    np.testing.assert_array_equal(a, to_np(peft_model.base_model.randlora_A["default"]).astype(a.dtype))
    return a.astype(np.float32), b.astype(np.float32)


def import_randlora(spec, variables, peft_model):
    adapters = lorajax.init(spec, variables, jax.random.key(0))
    a, b = shared_bases(peft_model)
    adapters = set_adapter(adapters, ("_shared",), {"randlora_A": a, "randlora_B": b})
    for t in lorajax.select(spec, variables):
        mod = peft_module(peft_model, t.name)
        adapters = set_adapter(adapters, t.keys, {
            "randlora_lambda": to_np(mod.randlora_lambda["default"]),
            "randlora_gamma": to_np(mod.randlora_gamma["default"]),
        })
    return adapters


@pytest.mark.parametrize("targets,r", [(ALL, 4), (["q_proj", "v_proj"], 5), (["o_proj"], 20)],
                         ids=["qvo-r4", "qv-r5", "o-r20"])
def test_randlora_shapes_and_init(targets, r):
    """Shared shapes, Λ = 0 and Γ = 1/d_min equal PEFT's; the model is unchanged at init."""
    peft_model, variables, spec = build(targets, r=r, randomize=False)
    ours = lorajax.init(spec, variables, jax.random.key(0))
    a, b = shared_bases(peft_model)
    assert ours["_shared"]["randlora_A"].shape == a.shape
    assert ours["_shared"]["randlora_B"].shape == b.shape
    for x in (a, b, ours["_shared"]["randlora_A"], ours["_shared"]["randlora_B"]):
        np.testing.assert_allclose(np.asarray(x, np.float64).std(ddof=1), 1.0, rtol=1e-2)
    for t in lorajax.select(spec, variables):
        mod = peft_module(peft_model, t.name)
        got = get_leaf_dict(ours, t.keys)
        np.testing.assert_array_equal(got["randlora_lambda"], to_np(mod.randlora_lambda["default"]))
        np.testing.assert_array_equal(got["randlora_gamma"], to_np(mod.randlora_gamma["default"]))
    x = inputs(0)
    out = lorajax.adapt(FlaxNet().apply, spec, "factored")(variables, ours, jnp.asarray(x))
    assert_close(out, torch_out(peft_model, x))


@pytest.mark.parametrize("targets,r,sparse", [(ALL, 4, False), (["v_proj", "o_proj"], 5, False),
                                              (ALL, 20, False), (ALL, 4, True)],
                         ids=["qvo-r4", "vo-r5", "qvo-r20", "qvo-r4-sparse"])
def test_randlora_forward_and_merge(targets, r, sparse):
    """r=20 exceeds d_min=16 (one basis per layer): allowed in both libraries."""
    peft_model, variables, spec = build(targets, r=r, sparse=sparse)
    adapters = import_randlora(spec, variables, peft_model)
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


def test_official_scaling_is_peft_with_alpha_over_sqrt_nb():
    """``scaling="official"`` (α/r/√nb) equals PEFT run with randlora_alpha = α/√nb (every layer has nb = 4)."""
    alpha, r = 8.0, 4
    nb = math.ceil(16 / r)
    peft_model, variables, spec = build(ALL, r=r, alpha=alpha, peft_alpha=alpha / math.sqrt(nb), scaling="official")
    adapters = import_randlora(spec, variables, peft_model)
    x = inputs(2)
    want = torch_out(peft_model, x)
    for mode in MODES:
        assert_close(lorajax.adapt(FlaxNet().apply, spec, mode=mode)(variables, adapters, jnp.asarray(x)), want,
                     what=mode)


def test_randlora_gradients():
    peft_model, variables, spec = build(ALL)
    adapters = import_randlora(spec, variables, peft_model)
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
        assert grads["_shared"]["randlora_A"] is None and grads["_shared"]["randlora_B"] is None
        for t in lorajax.select(spec, variables):
            mod = peft_module(peft_model, t.name)
            gt = get_leaf_dict(grads, t.keys)
            for k in ("randlora_lambda", "randlora_gamma"):
                assert_close(gt[k], to_np(getattr(mod, k)["default"].grad), what=f"{mode} d{k} {t.name}")
