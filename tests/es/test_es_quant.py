"""ESSA's inference base on `lorajax.quant` (int8 / int4 / NF4 / bf16): accuracy against float32 on a tiny Llama,
no wrapper needed, LoRA on top, a vmapped population."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax
from lorajax import quant as lquant
from lorajax.es import quant
from lorajax.models import llama

CFG = llama.Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
MODEL = llama.build(CFG)
VARIABLES = MODEL.init(jax.random.key(0), *llama.example_inputs(CFG))
TOKENS = jax.random.randint(jax.random.key(1), (2, 16), 0, CFG.vocab_size)
SPEC = lorajax.Spec("lora", rank=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"], init_weights=False)
ADAPTERS = lorajax.init(SPEC, VARIABLES, jax.random.key(2))
APPLY = jax.jit(MODEL.apply)  # one compile per params structure


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def ref():
    return APPLY(VARIABLES, TOKENS)


@pytest.fixture(scope="module")
def int8():
    return jax.jit(lambda v: quant.quantize(v, "int8"))(VARIABLES)


def test_int8_is_lorajax_quant_and_runs_without_a_wrapper(ref, int8):
    kernel = int8["params"]["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
    assert quant.is_quantized(kernel) and kernel.kind == "int8"
    assert kernel.codes.dtype == jnp.int8 and kernel.codes.shape == (64, 64) and kernel.scales.shape == (64,)
    w = VARIABLES["params"]["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
    np.testing.assert_allclose(np.asarray(kernel.scales), np.abs(np.asarray(w)).max(0) / 127, rtol=1e-6)
    assert quant.is_quantized(int8["params"]["lm_head"]["kernel"])  # every kernel by default, the head too
    assert int8["params"]["model"]["embed_tokens"]["embedding"].dtype == jnp.float32  # embeddings untouched
    # about a quarter of the float32 bytes for the quantised matrices
    assert quant.nbytes(int8) < 0.45 * quant.nbytes(VARIABLES)
    out = APPLY(int8, TOKENS)  # the model's own apply
    err = rel(out, ref)
    assert err < 2.5e-2, err  # 1.6e-2 measured (random init, 2 layers)
    # the same as running the model on the dequantised weights
    assert rel(out, APPLY(quant.dequantize(int8), TOKENS)) < 1e-5
    # greedy next tokens mostly agree
    assert np.mean(np.argmax(out, -1) == np.argmax(ref, -1)) > 0.9


# bf16: every kernel but the head; NF4: the MLP's up projections only (one compile less heavy; int4 and NF4 are
# tested in tests/test_quant.py, `quantize` only forwards the kind)
@pytest.mark.parametrize("dtype, targets, bound", [("bfloat16", None, 1.5e-2), ("nf4", ".*up_proj", 0.15)])
def test_other_dtypes_close_to_float32(ref, dtype, targets, bound):
    q = jax.jit(lambda v: quant.quantize(v, dtype, targets, exclude="lm_head"))(VARIABLES)
    up = q["params"]["model"]["layers"]["1"]["mlp"]["up_proj"]["kernel"]
    if dtype == "bfloat16":
        assert up.dtype == jnp.bfloat16
    else:
        assert quant.is_quantized(up) and up.kind == dtype
        assert quant.nbytes(up) == lquant.expected_bytes((64, 128), dtype)
    assert q["params"]["lm_head"]["kernel"].dtype == jnp.float32
    out = APPLY(q, TOKENS)
    err = rel(out, ref)
    assert err < bound, err  # measured: bf16 0.6e-2, NF4 (up_proj) 0.086; every kernel NF4: 0.32, int4: 0.30
    assert rel(out, APPLY(quant.dequantize(q), TOKENS)) < 1e-5


def test_lora_on_an_int8_base(int8):
    fwd = jax.jit(lorajax.adapt(MODEL.apply, SPEC, mode="factored"))
    qfwd = jax.jit(quant.adapt(MODEL.apply, SPEC))
    ref = fwd(VARIABLES, ADAPTERS, TOKENS)
    # unquantised params: the same as lorajax.adapt
    assert rel(qfwd(VARIABLES, ADAPTERS, TOKENS), ref) < 1e-5
    out = qfwd(int8, ADAPTERS, TOKENS)
    assert rel(out, fwd(quant.dequantize(int8), ADAPTERS, TOKENS)) < 1e-5
    assert rel(out, ref) < 3e-2  # 2.1e-2 measured
    # the adapters really act: zero them and the output changes
    zero = jax.tree.map(jnp.zeros_like, ADAPTERS)
    assert rel(qfwd(int8, zero, TOKENS), out) > 1e-3
    # vmapped over a population of adapters (ESSA's evaluation)
    pop = jax.tree.map(lambda x: jnp.stack([x, 0.5 * x]), ADAPTERS)
    outs = jax.jit(jax.vmap(lambda a: quant.adapt(MODEL.apply, SPEC)(int8, a, TOKENS)))(pop)
    assert rel(outs[0], out) < 1e-5


def test_any_kernel_is_quantised_and_bad_input():
    with pytest.raises(ValueError, match="dtype must be one of"):
        quant.quantize(VARIABLES, "int2")
    with pytest.raises(ValueError, match="selects no weight"):
        quant.quantize(VARIABLES, targets="nothing")

    class Ein(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Einsum((4, 3), "bi,ij->bj", name="e")(x)

    m, x = Ein(), jax.random.normal(jax.random.key(0), (2, 4))
    v = m.init(jax.random.key(1), x)
    q = quant.quantize(v)  # not only nn.Dense: linen unboxes the quantised kernel wherever it is read
    assert quant.is_quantized(q["params"]["e"]["kernel"])
    np.testing.assert_allclose(np.asarray(m.apply(q, x)), np.asarray(m.apply(quant.dequantize(q), x)), rtol=1e-6)
