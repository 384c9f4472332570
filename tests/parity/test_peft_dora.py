"""DoRA against Hugging Face PEFT's ``LoraConfig(use_dora=True)``.

PEFT keeps the magnitude ``m`` (``lora_magnitude_vector``, one value per output
feature) and detaches the row norm ``‖W + s·BA‖``; lorajax's ``"dora"`` keeps
``magnitude: [out]`` and stops the gradient through the same norm. We copy A, B
and a perturbed magnitude (so that ``m != ‖W + s·BA‖``) and compare outputs,
merged weights (``merge_and_unload``) and gradients w.r.t. A, B and m.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import lorajax  # noqa: E402
from lorajax.variants.lora import scaling  # noqa: E402

from _torch_models import (  # noqa: E402
    FlaxNet,
    assert_close,
    assert_weights_match,
    flax_variables,
    get_leaf_dict,
    import_lora,
    inputs,
    lorajax_names,
    make_torch_net,
    peft_adapted_names,
    peft_module,
    to_np,
    torch_out,
)

TARGETS = ["q_proj", "v_proj", "o_proj"]
MODES = ("merged", "factored")


def build(use_rslora=False, init=False, perturb=True):
    net = make_torch_net(0)
    variables = flax_variables(net)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True,
                             use_rslora=use_rslora, init_lora_weights=init)
    peft_model = peft.get_peft_model(net, config).eval()
    if perturb:  # m != ||W + s BA||, so that the m / n factor matters
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name in peft_adapted_names(peft_model):
                m = peft_module(peft_model, name).lora_magnitude_vector["default"].weight
                m.mul_(0.5 + torch.rand(m.shape, generator=gen))
    spec = lorajax.Spec("dora", rank=4, alpha=8, targets=TARGETS, use_rslora=use_rslora, init_weights=init)
    assert lorajax_names(spec, variables) == peft_adapted_names(peft_model)
    return peft_model, variables, spec


def test_dora_magnitude_init_is_row_norm():
    """With the default init (B = 0) lorajax's magnitude equals PEFT's: the norm per output feature."""
    peft_model, variables, spec = build(init=True, perturb=False)
    adapters = lorajax.init(spec, variables, jax.random.key(0))
    for t in lorajax.select(spec, variables):
        mod = peft_module(peft_model, t.name)
        got = get_leaf_dict(adapters, t.keys)["magnitude"]
        assert_close(got, to_np(mod.lora_magnitude_vector["default"].weight), what=t.name)
        assert_close(got, np.linalg.norm(to_np(mod.base_layer.weight), axis=1), what=t.name)


def test_dora_magnitude_with_nonzero_b():
    """PEFT's init magnitude with random B is ||W + s BA|| per output feature (lorajax's formula)."""
    peft_model, variables, spec = build(init=False, perturb=False)
    adapters = import_lora(spec, variables, peft_model, dora=True)
    for t in lorajax.select(spec, variables):
        a = get_leaf_dict(adapters, t.keys)
        kernel = get_leaf_dict(variables, t.keys[:-1])["kernel"]
        want = jnp.linalg.norm(kernel + scaling(t) * a["lora_A"] @ a["lora_B"], axis=0)
        assert_close(a["magnitude"], want, what=t.name)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_dora_forward_and_merge(use_rslora):
    peft_model, variables, spec = build(use_rslora=use_rslora)
    adapters = import_lora(spec, variables, peft_model, dora=True)
    model = FlaxNet()
    x = inputs(1)
    want = torch_out(peft_model, x)
    assert np.abs(want - np.asarray(model.apply(variables, x))).max() > 1e-2
    for mode in MODES:
        assert_close(lorajax.adapt(model.apply, spec, mode=mode)(variables, adapters, jnp.asarray(x)), want,
                     what=mode)
    merged = lorajax.merge(spec, variables, adapters)
    torch_merged = peft_model.merge_and_unload()
    assert_weights_match(merged, torch_merged)
    assert_close(model.apply(merged, x), want, what="apply(merge)")


@pytest.mark.parametrize("use_rslora", [False, True])
def test_dora_gradients(use_rslora):
    peft_model, variables, spec = build(use_rslora=use_rslora)
    peft_model.train()  # dropout is 0: same function, and PEFT skips the DoRA caches in train mode
    adapters = import_lora(spec, variables, peft_model, dora=True)
    x = inputs(3)
    g = np.random.default_rng(4).standard_normal(x.shape).astype(np.float32)
    peft_model.zero_grad()
    (peft_model(torch.from_numpy(x)) * torch.from_numpy(g)).sum().backward()

    model = FlaxNet()
    for mode in MODES:
        fwd = lorajax.adapt(model.apply, spec, mode=mode)
        grads = jax.grad(lambda a: jnp.sum(fwd(variables, a, jnp.asarray(x)) * g))(adapters)
        for t in lorajax.select(spec, variables):
            mod = peft_module(peft_model, t.name)
            gt = get_leaf_dict(grads, t.keys)
            want = {
                "lora_A": to_np(mod.lora_A["default"].weight.grad).T,
                "lora_B": to_np(mod.lora_B["default"].weight.grad).T,
                "magnitude": to_np(mod.lora_magnitude_vector["default"].weight.grad),
            }
            for k, w in want.items():
                assert_close(gt[k], w, what=f"{mode} d{k} {t.name}")
