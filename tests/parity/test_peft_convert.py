"""`lorajax.inits.to_plain_lora` against PEFT's PiSSA-to-LoRA conversion.

PEFT: save the initial PiSSA adapter (with ``init_lora_weights=True`` so that
loading it does not decompose again), "train", then
``save_pretrained(out, path_initial_model_for_weight_conversion=init_dir)``
writes a LoRA of rank 2r, alpha 2α, with ``lora_A = [A; A_0]`` and
``lora_B = [B, -B_0]`` (``LoraModel.subtract_mutated_init``), meant for the
ORIGINAL base model. lorajax: the same initial and trained factors (imported
from PEFT, since SVD signs differ across LAPACKs) through ``to_plain_lora``
must give the same tensors, the same config (read back with
``lorajax.peft.load``) and the same outputs on the original base.
"""

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import jax.numpy as jnp  # noqa: E402

import lorajax  # noqa: E402
from lorajax.variants.lora import scaling  # noqa: E402

from _torch_models import (  # noqa: E402
    FlaxNet,
    assert_close,
    flax_variables,
    get_leaf_dict,
    import_lora,
    inputs,
    make_torch_net,
    torch_out,
)

TARGETS = ["q_proj", "v_proj", "o_proj"]


@pytest.mark.parametrize("kw", [{}, {"use_rslora": True}, {"rank_pattern": {"o_proj": 2}}])
def test_pissa_conversion_matches_peft(tmp_path, kw):
    net = make_torch_net(0)
    original = copy.deepcopy(net)
    variables = flax_variables(net)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="pissa", **kw)
    peft_model = peft.get_peft_model(net, config)
    peft_model.peft_config["default"].init_lora_weights = True
    peft_model.save_pretrained(str(tmp_path / "init"))

    spec = lorajax.Spec("lora", rank=4, alpha=8, targets=TARGETS, **kw)
    initial = import_lora(spec, variables, peft_model)
    with torch.no_grad():  # stands for training
        gen = torch.Generator().manual_seed(1)
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.add_(0.2 * p.abs().mean() * torch.randn(p.shape, generator=gen))
    trained = import_lora(spec, variables, peft_model)
    residual = flax_variables(peft_model.base_model.model)

    peft_model.save_pretrained(str(tmp_path / "lora"),
                               path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    peft_spec, peft_plain = lorajax.peft.load(tmp_path / "lora", variables)

    spec2, plain = lorajax.inits.to_plain_lora(spec, trained, variables, initial)
    ours_t, peft_t = lorajax.select(spec2, variables), lorajax.select(peft_spec, variables)
    assert [(t.keys, t.rank) for t in ours_t] == [(t.keys, t.rank) for t in peft_t]
    assert [scaling(t) for t in ours_t] == pytest.approx([scaling(t) for t in peft_t], rel=1e-12)
    assert peft_spec.options["use_rslora"] == spec2.options["use_rslora"]
    for t in lorajax.select(spec2, variables):
        ours, theirs = get_leaf_dict(plain, t.keys), get_leaf_dict(peft_plain, t.keys)
        assert_close(ours["lora_A"], theirs["lora_A"], what=f"A' {t.name}")
        assert_close(ours["lora_B"], theirs["lora_B"], what=f"B' {t.name}")

    # on the original base: PEFT's converted adapter, lorajax's, and the trained PiSSA model agree
    x = inputs(2)
    want = torch_out(peft_model.eval(), x)
    loaded = peft.PeftModel.from_pretrained(original, str(tmp_path / "lora")).eval()
    assert_close(torch_out(loaded, x), want, what="PEFT converted")
    for mode in ("merged", "factored"):
        assert_close(lorajax.adapt(FlaxNet().apply, spec2, mode=mode)(variables, plain, jnp.asarray(x)), want,
                     what=f"lorajax converted {mode}")
        assert_close(lorajax.adapt(FlaxNet().apply, spec, mode=mode)(residual, trained, jnp.asarray(x)), want,
                     what=f"lorajax residual {mode}")
    assert np.isfinite(want).all()
