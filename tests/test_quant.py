"""lorajax.quant: NF4 (bitsandbytes parity), int8 / int4 bounds and packing, a 4-bit Llama with PEFT LoRA,
every variant over an NF4 base, errors and memory.

bitsandbytes (CPU build) and PEFT produce the reference numbers in-process.
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax
from lorajax import hlo, quant, registry

torch = pytest.importorskip("torch")
bnb_f = pytest.importorskip("bitsandbytes.functional")

from test_conformance import (  # noqa: E402  (the conformance suite's model, specs and per-variant tables)
    FORWARD_FULL_PRODUCT,
    JIT_IDENTITY_ULPS,
    MODEL,
    NOT_IDENTITY_AT_INIT,
    TOKENS,
    _full_size_dots,
    base,
    frozen_shapes,
    perturb,
    spec_for,
)

torch.set_num_threads(1)


def _kernel(shape, seed=0, scale=0.1):
    w = scale * jax.random.normal(jax.random.key(seed), shape)
    return w.at[0, 0].set(0.0)  # one exact zero


# ----------------------------------------------------------------------------- 1. NF4 == bitsandbytes
@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_matches_bitsandbytes(double_quant):
    # Flax kernel [in=76, out=41]: bitsandbytes sees the torch weight [41, 76]; n = 3116 is not a multiple of
    # 64 (a partial last block) nor is the count of constants, 49, one of 256 (a partial second-level block)
    w = _kernel((76, 41))
    q = quant.quantize_array(w, "nf4", blocksize=64, double_quant=double_quant)
    codes, st = bnb_f.quantize_4bit(
        torch.from_numpy(np.asarray(w).T.copy()), blocksize=64, quant_type="nf4", compress_statistics=double_quant
    )
    np.testing.assert_array_equal(np.asarray(q.codes), codes.numpy().reshape(-1))
    if double_quant:
        np.testing.assert_array_equal(np.asarray(q.scales), st.absmax.numpy())  # 8-bit codes of the constants
        np.testing.assert_allclose(np.asarray(q.scales2), st.state2.absmax.numpy(), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(q.offset), st.offset.numpy(), rtol=1e-6)
        assert q.scales.dtype == jnp.uint8 and q.scales2.shape == (1,)
    else:
        np.testing.assert_array_equal(np.asarray(q.scales), st.absmax.numpy())  # the f32 absmax itself
        assert q.scales2 is None
    want = bnb_f.dequantize_4bit(codes, st).numpy().T
    np.testing.assert_allclose(np.asarray(q.dequantize()), want, rtol=0, atol=1e-6)
    assert q.dequantize().shape == w.shape and q.dequantize().dtype == w.dtype


def test_dynamic_map_matches_bitsandbytes():
    ours, theirs = quant.dynamic_map(), bnb_f.create_dynamic_map().numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=0)  # float64 formula vs float32 linspace: <= 1 ulp
    np.testing.assert_array_equal(quant.NF4_LEVELS, bnb_f.get_4bit_type("nf4", device="cpu").numpy())


# ----------------------------------------------------------------------------- 2. int8 / int4
def test_int8_round_trip_bound():
    w = _kernel((24, 3, 4), seed=1).at[:, 1, 2].set(0.0)  # an all-zero output channel
    q = quant.quantize_array(w, "int8")
    assert q.codes.dtype == jnp.int8 and q.codes.shape == w.shape and q.scales.shape == (3, 4)
    s = np.abs(np.asarray(w).reshape(24, 12)).max(0) / 127
    np.testing.assert_allclose(np.asarray(q.scales).reshape(-1), s, rtol=1e-6)
    err = np.abs(np.asarray(w) - np.asarray(q.dequantize())).reshape(24, 12)
    assert np.all(err <= s / 2 + 1e-7)
    assert np.all(np.abs(np.asarray(q.codes)) <= 127) and np.abs(np.asarray(q.codes)).max() == 127


@pytest.mark.parametrize("group_size", [4, 8, 6])  # 6: groups of 6, 6 and a last one of 4 (zero-padded)
def test_int4_round_trip_bound_and_packing(group_size):
    w = _kernel((16, 5), seed=2)
    q = quant.quantize_array(w, "int4", group_size=group_size)
    n_groups = -(-16 // group_size)
    rows = n_groups * group_size
    assert q.codes.shape == (rows // 2, 5) and q.codes.dtype == jnp.uint8 and q.scales.shape == (n_groups, 5)
    g = np.pad(np.asarray(w), ((0, rows - 16), (0, 0))).reshape(n_groups, group_size, 5)
    s = np.abs(g).max(1) / 7
    np.testing.assert_allclose(np.asarray(q.scales), s, rtol=1e-6)
    deq = np.asarray(q.dequantize())
    assert deq.shape == (16, 5)
    deq_g = np.pad(deq, ((0, rows - 16), (0, 0))).reshape(g.shape)
    assert np.all(np.abs(g - deq_g) <= s[:, None, :] / 2 + 1e-7)
    # packing: byte [i, o] holds input 2i in the high nibble and 2i+1 in the low one, 4-bit two's complement
    codes = np.rint(deq_g / s[:, None, :]).astype(np.int64).reshape(rows, 5)
    assert codes.min() >= -7 and codes.max() <= 7
    packed = ((codes[0::2] & 0xF) << 4) | (codes[1::2] & 0xF)
    np.testing.assert_array_equal(np.asarray(q.codes), packed.astype(np.uint8))
    assert quant.base_bytes(q) == quant.expected_bytes((16, 5), "int4", group_size=group_size)


# ----------------------------------------------------------------------------- 3. 4-bit Llama + PEFT LoRA
def test_llama_nf4_peft_lora_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from lorajax.models import llama

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   bos_token_id=None, eos_token_id=None, pad_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p)) if n.endswith("norm.weight") else p.normal_(0.0, 0.1)
    hf.save_pretrained(tmp_path / "base", safe_serialization=True)
    bnb_config = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )  # fmt: skip
    q_hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", quantization_config=bnb_config, device_map="cpu", dtype=torch.float32
    ).eval()
    # on CPUs with AVX-512 BF16, bitsandbytes repacks a Linear4bit's weight at its first eval forward call for a
    # kernel that computes in bf16 (logits 2e-2 off): keep the reference path (dequantise, f32 matmul) everywhere
    for module in q_hf.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    codes_hf = q_hf.model.layers[1].mlp.down_proj.weight.data.numpy().reshape(-1).copy()
    absmax_hf = q_hf.model.layers[1].mlp.down_proj.weight.quant_state.absmax.numpy().copy()
    pm = peft.get_peft_model(q_hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                   init_lora_weights=False)).eval()  # fmt: skip
    pm.save_pretrained(tmp_path / "adapter")
    ids = np.random.default_rng(0).integers(1, 64, (2, 7)).astype(np.int32)
    with torch.no_grad():
        want = pm(input_ids=torch.from_numpy(ids).long()).logits.numpy()

    model, params = lorajax.models.from_pretrained(tmp_path / "base")
    qparams = quant.quantize(params, None, "nf4")  # all-linear: lm_head stays float, as in load_in_4bit
    assert not quant.is_quantized(qparams["lm_head"]["kernel"])
    # the same codes as transformers' 4-bit model
    leaf = qparams["model"]["layers"]["1"]["mlp"]["down_proj"]["kernel"]
    np.testing.assert_array_equal(np.asarray(leaf.codes), codes_hf)
    np.testing.assert_array_equal(np.asarray(leaf.scales), absmax_hf)

    variables = {"params": qparams}
    spec, adapters = lorajax.peft.load(tmp_path / "adapter", variables)
    for mode in ("factored", "merged"):
        got = jax.jit(lorajax.adapt(model.apply, spec, mode=mode))(variables, adapters, jnp.asarray(ids))
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=2e-5, err_msg=mode)
    out = llama.generate(model, qparams, ids[:, :3], 3)  # generation over the quantised base
    assert out.shape == (2, 6)


# ----------------------------------------------------------------------------- 4. every variant over NF4
def _qsetup(variant):
    variables, x = base()
    spec = spec_for(variant)
    qvars = quant.quantize(variables, spec, "nf4")
    return spec, quant.dequantize(qvars), qvars, x


# one variant per kind of contract in the quick suite (additive; weight-norm; routing);
# every other variant under `make test-all` (≈1-8 s each, eager)
QUICK = {"lora", "dora", "flylora"}


@pytest.mark.parametrize("variant", [v if v in QUICK else pytest.param(v, marks=pytest.mark.slow)
                                     for v in lorajax.list_variants()])
def test_every_variant_over_nf4_base(variant):
    spec, dvars, qvars, x = _qsetup(variant)
    adapters = lorajax.init(spec, qvars, jax.random.key(2))
    fac = lorajax.adapt(MODEL.apply, spec, mode="factored")
    if variant not in NOT_IDENTITY_AT_INIT:
        y0 = np.asarray(MODEL.apply(qvars, x))
        got = np.asarray(fac(qvars, adapters, x))
        if variant in JIT_IDENTITY_ULPS:
            np.testing.assert_allclose(got, y0, rtol=1e-6, atol=1e-6)
        else:
            np.testing.assert_array_equal(got, y0)
    adapters = perturb(spec, adapters)
    ref = np.asarray(fac(dvars, adapters, x))  # factored over the dequantised float params
    tol = 1e-5 * np.abs(ref).max()  # f32 sums in another order: errors relative to the outputs' scale
    np.testing.assert_allclose(np.asarray(fac(qvars, adapters, x)), ref, rtol=1e-5, atol=tol)
    if registry.get(variant).mergeable:
        merged = lorajax.adapt(MODEL.apply, spec, mode="merged")(qvars, adapters, x)
        np.testing.assert_allclose(np.asarray(merged), ref, rtol=1e-5, atol=tol)
        with pytest.raises(ValueError, match=r"is quantised \(nf4\).*dequantize=True"):
            lorajax.merge(spec, qvars, adapters)
    # the adapter gradient forms no weight-sized product (jaxpr walk of the conformance suite; HLO: below)
    trainable, frozen = lorajax.partition(spec, adapters)
    g = jax.random.normal(jax.random.key(3), ref.shape)
    grad = jax.grad(lambda tr: jnp.sum(fac(qvars, lorajax.combine(tr, frozen), x) * g))
    bad = _full_size_dots(jax.make_jaxpr(grad)(trainable).jaxpr, frozen_shapes(dvars), variant in FORWARD_FULL_PRODUCT)
    assert not bad, f"{variant}: full-size weight products in the gradient graph: {bad}"


def test_no_weight_gradient_in_compiled_hlo_over_nf4():
    spec, dvars, qvars, x = _qsetup("lora")
    adapters = perturb(spec, lorajax.init(spec, qvars, jax.random.key(2)))
    fac = lorajax.adapt(MODEL.apply, spec, mode="factored")
    g = jax.random.normal(jax.random.key(3), MODEL.apply(dvars, x).shape)
    text = jax.jit(jax.grad(lambda a: jnp.sum(fac(qvars, a, x) * g))).lower(adapters).compile().as_text()
    shapes = {p for s in frozen_shapes(dvars) for p in itertools.permutations(s)}
    assert hlo.dot_products(text)
    assert not hlo.weight_gradients(text, shapes, TOKENS)


def test_merge_dequantize_equals_merge_on_dequantised():
    spec, dvars, qvars, x = _qsetup("lora")
    adapters = perturb(spec, lorajax.init(spec, qvars, jax.random.key(2)))
    got = lorajax.merge(spec, qvars, adapters, dequantize=True)
    want = lorajax.merge(spec, dvars, adapters)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7, err_msg=str(path))
    assert lorajax.count_params(spec, qvars, adapters)["base"] == lorajax.count_params(spec, dvars, adapters)["base"]


# ----------------------------------------------------------------------------- 5. errors
def test_errors():
    with pytest.raises(ValueError, match=r"shape \(8,\): only matrices"):
        quant.quantize_array(jnp.ones(8), "nf4", name="dense/bias")
    with pytest.raises(ValueError, match=r"blocksize=48 for params/dense_bias/kernel: NF4 supports \(32, 64"):
        quant.quantize(base()[0], ["dense_bias"], "nf4", blocksize=48)
    with pytest.raises(ValueError, match=r"kind must be one of .*'int2'"):
        quant.quantize(base()[0], None, "int2")
    with pytest.raises(ValueError, match="group_size=7 for w: int4 needs an even group size"):
        quant.quantize_array(jnp.ones((12, 4)), "int4", group_size=7, name="w")
    with pytest.raises(ValueError, match="dtype int32: only float kernels"):
        quant.quantize_array(jnp.ones((4, 4), jnp.int32), "int8")
    with pytest.raises(ValueError, match="already quantised"):
        quant.quantize(quant.quantize(base()[0], ["dense_bias"], "int8"), ["dense_bias"], "int8")
    with pytest.raises(TypeError, match="selection must be"):
        quant.quantize(base()[0], 3, "nf4")


# ----------------------------------------------------------------------------- 6. memory
def test_base_bytes_measured_equals_formula():
    w = {"a": {"kernel": _kernel((256, 128))}}  # n = 32768: 512 NF4 blocks, 2 second-level blocks
    for kind, kw in [("nf4", {}), ("nf4", {"double_quant": False}), ("int8", {}), ("int4", {}), ("bf16", {})]:
        q = quant.quantize(w, ".*", kind, **kw)
        assert quant.base_bytes(q) == quant.expected_bytes((256, 128), kind, **kw), (kind, kw)
    nf4 = quant.expected_bytes((256, 128), "nf4")
    assert nf4 == 16384 + 512 + 4 * 2 + 4
    assert math.isclose(nf4 / (256 * 128), 0.5 + 1 / 64 + 4 / (64 * 256) + 4 / 32768)  # ≈ 0.516 bytes/param
    assert quant.expected_bytes((256, 128), "int8") == 32768 + 4 * 128


# ----------------------------------------------------------------------------- 7. training over a quantised base
def test_fit_over_nf4_base_equals_training_on_dequantised_params():
    """`lorajax.train.fit` takes an NF4 params tree as its frozen base: 3 steps lower the loss, move the adapters,
    and give the losses and adapters of the same run on the dequantised float params (the base enters only
    through its dequantised values)."""
    import flax.linen as nn
    import optax

    model = nn.Sequential([nn.Dense(32), nn.relu, nn.Dense(16)])
    x, y = jax.random.normal(jax.random.key(0), (8, 16)), jax.random.normal(jax.random.key(1), (8, 16))
    spec = lorajax.Spec("lora", rank=4, alpha=8, targets=".*", init_weights=False)  # B != 0: every leaf moves
    qvars = jax.jit(lambda x: quant.quantize(model.init(jax.random.key(2), x), spec, "nf4"))(x)  # one compile each
    assert all(quant.is_quantized(layer["kernel"]) for layer in qvars["params"].values())
    dvars = jax.jit(quant.dequantize)(qvars)
    adapters = jax.jit(lambda v: lorajax.init(spec, v, jax.random.key(3)))(qvars)
    fwd = lorajax.adapt(model.apply, spec, mode="factored")

    def loss_fn(params, combined, batch):
        return jnp.mean((fwd(params, combined, batch[0]) - batch[1]) ** 2)

    tx = optax.adam(1e-2)
    runs = {}
    for name, params in (("nf4", qvars), ("float", dvars)):
        trainable, frozen = lorajax.partition(spec, adapters)
        state = lorajax.train.TrainState.create(tx, trainable, frozen)
        state, history = lorajax.train.fit(loss_fn, tx, params, state, lambda step: (x, y), 3, log_every=1,
                                           progress=False)  # fmt: skip
        runs[name] = ([h["loss"] for h in history], state.trainable)
    (losses, trained), (want_losses, want_trained) = runs["nf4"], runs["float"]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    start = lorajax.partition(spec, adapters)[0]
    for a, b, a0 in zip(jax.tree.leaves(trained), jax.tree.leaves(want_trained), jax.tree.leaves(start)):
        assert np.abs(np.asarray(a) - np.asarray(a0)).max() > 1e-3  # every adapter leaf moved
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
