"""Adapter-input dropout (PEFT's ``lora_dropout``, ``vera_dropout``, ``miss_dropout``, ``randlora_dropout``,
``unilora_dropout``) against PEFT in train mode, given the same masks, and its defining equation.

PEFT draws its masks with torch's RNG; the test replaces each adapted module's dropout with one that applies
lorajax's mask for that target (`lorajax.variants.base.dropout_mask` of the target's key), so both sides drop
the same entries. The adapters come from PEFT's own folder through `lorajax.peft.load`, which also reads the rate.
"""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import lorajax  # noqa: E402
from lorajax.adapters import target_key  # noqa: E402
from lorajax.variants.base import Context, dropout_mask  # noqa: E402

from _torch_models import (  # noqa: E402
    FlaxNet,
    assert_close,
    flax_variables,
    get_leaf_dict,
    inputs,
    make_torch_net,
    peft_module,
)

P = 0.3
TARGETS = ["q_proj", "o_proj"]
# PEFT config, the module dict holding its dropout
CASES = {
    "lora": (lambda: peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=P, target_modules=TARGETS), "lora_dropout"),
    "dora": (
        lambda: peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=P, target_modules=TARGETS, use_dora=True),
        "lora_dropout",
    ),
    "vera": (lambda: peft.VeraConfig(r=4, vera_dropout=P, target_modules=["q_proj"]), "vera_dropout"),
    "miss": (lambda: peft.MissConfig(r=4, miss_dropout=P, target_modules=TARGETS), "miss_dropout"),
    "randlora": (lambda: peft.RandLoraConfig(r=4, randlora_dropout=P, target_modules=TARGETS), "randlora_dropout"),
    "unilora": (lambda: peft.UniLoraConfig(r=4, unilora_dropout=P, target_modules=TARGETS), "unilora_dropout"),
}


class MaskDropout(torch.nn.Module):
    """``x ⊙ m / (1 − p)`` with lorajax's mask of one target (drawn for the flattened ``[T, in]`` input)."""

    def __init__(self, key):
        super().__init__()
        self.key = key

    def forward(self, x):
        if not self.training:  # as torch.nn.Dropout
            return x
        keep = np.asarray(dropout_mask(self.key, P, (int(np.prod(x.shape[:-1])), x.shape[-1])))
        return x * torch.from_numpy(keep.reshape(x.shape).astype(np.float32)) / (1 - P)


@pytest.fixture(scope="module")
def rng():
    return jax.random.key(11)


@pytest.mark.parametrize("name", sorted(CASES))
def test_train_mode_output_matches_peft_given_the_same_masks(name, rng, tmp_path):
    make_config, attr = CASES[name]
    net = make_torch_net(0)
    variables = flax_variables(net)
    peft_model = peft.get_peft_model(net, make_config())
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # every adapter tensor random, so the adapter path is not zero
        for p in peft_model.parameters():
            if p.requires_grad:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    peft_model.save_pretrained(tmp_path)
    spec, adapters = lorajax.peft.load(tmp_path, variables)
    assert spec.options["dropout"] == P
    fwd = lorajax.adapt(FlaxNet().apply, spec, "factored")
    x = inputs(4)

    for t in lorajax.select(spec, variables):
        getattr(peft_module(peft_model, t.name), attr)["default"] = MaskDropout(target_key(rng, t))
    peft_model.train()
    with torch.no_grad():
        want = peft_model(torch.from_numpy(x)).numpy()
    got = fwd(variables, adapters, jnp.asarray(x), adapter_rng=rng, adapter_train=True)
    assert_close(got, want, what=f"{name} train mode")

    peft_model.eval()  # evaluation: no dropout on either side
    with torch.no_grad():
        want_eval = peft_model(torch.from_numpy(x)).numpy()
    got_eval = fwd(variables, adapters, jnp.asarray(x), adapter_rng=rng, adapter_train=False)
    assert_close(got_eval, want_eval, what=f"{name} eval mode")
    assert np.abs(np.asarray(got) - np.asarray(got_eval)).max() > 1e-3  # the masks did change something


def test_lora_equation_round_trip_and_errors(rng, tmp_path):
    """``x W + s (x ⊙ m / (1 − p)) A B``; eval and p = 0 are dropout-free; the rate survives save/load;
    training without a key, merged mode in training and a rate outside [0, 1) are refused."""
    variables = flax_variables(make_torch_net(0))
    spec = lorajax.Spec("lora", rank=3, alpha=6, targets=["q_proj"], init_weights=False, dropout=P)
    adapters = lorajax.init(spec, variables, jax.random.key(0))
    t = lorajax.select(spec, variables)[0]
    variant = lorajax.registry.get("lora")
    entry, w = get_leaf_dict(adapters, t.keys), get_leaf_dict(variables, t.keys[:-1])["kernel"]
    x = jnp.asarray(inputs(5, (6, w.shape[0])))
    key = jax.random.key(4)
    got = variant.apply(x, w, entry, t, Context(rng=key, train=True))
    keep = np.asarray(dropout_mask(key, P, x.shape))
    assert 0.5 < keep.mean() < 0.9  # about 1 − p of the entries kept
    x_drop = np.where(keep, np.asarray(x) / (1 - P), 0.0)
    want = np.asarray(x) @ np.asarray(w) + 2.0 * (x_drop @ np.asarray(entry["lora_A"])) @ np.asarray(entry["lora_B"])
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    clean = np.asarray(x) @ np.asarray(w) + 2.0 * (np.asarray(x) @ np.asarray(entry["lora_A"])) @ entry["lora_B"]
    np.testing.assert_allclose(np.asarray(variant.apply(x, w, entry, t, Context(rng=key))), clean, rtol=1e-5, atol=1e-5)
    t0 = lorajax.select(spec.replace(dropout=0.0), variables)[0]
    np.testing.assert_allclose(np.asarray(variant.apply(x, w, entry, t0, Context(rng=key, train=True))), clean,
                               rtol=1e-5, atol=1e-5)

    lorajax.peft.save(tmp_path, spec, adapters, variables)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["lora_dropout"] == P
    assert lorajax.peft.load(tmp_path, variables)[0].options["dropout"] == P

    with pytest.raises(ValueError, match="q_proj.*dropout=0.3.*adapter_rng"):
        variant.apply(x, w, entry, t, Context(train=True))
    merged = lorajax.adapt(FlaxNet().apply, spec, "merged")
    with pytest.raises(ValueError, match="dropout=0.3.*mode='factored'"):
        merged(variables, adapters, x, adapter_rng=rng, adapter_train=True)
    for bad in (1.0, -0.1, True):
        with pytest.raises(ValueError, match="dropout must be a number in \\[0, 1\\)"):
            lorajax.Spec("lora", rank=2, targets=["q_proj"], dropout=bad)
