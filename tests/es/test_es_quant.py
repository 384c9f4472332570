"""Inference-only int8 / bf16 base for ESSA: accuracy against float32 on a tiny Llama, LoRA on top."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax
from lorajax.es import quant
from lorajax.models import llama

CFG = llama.Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
MODEL = llama.build(CFG)
VARIABLES = MODEL.init(jax.random.key(0), *llama.example_inputs(CFG))
TOKENS = jax.random.randint(jax.random.key(1), (2, 16), 0, CFG.vocab_size)
SPEC = lorajax.Spec("lora", rank=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"], init_weights=False)
ADAPTERS = lorajax.init(SPEC, VARIABLES, jax.random.key(2))


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def ref():
    return jax.jit(MODEL.apply)(VARIABLES, TOKENS)


def test_int8_logits_close_to_float32(ref):
    q = quant.quantize(VARIABLES, "int8")
    kernel = q["params"]["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
    assert kernel["int8"].dtype == jnp.int8 and kernel["scale"].shape == (64,)
    assert q["params"]["model"]["embed_tokens"]["embedding"].dtype == jnp.float32  # embeddings untouched
    # about a quarter of the float32 bytes for the quantised matrices
    assert quant.nbytes(q) < 0.45 * quant.nbytes(VARIABLES)
    out = jax.jit(quant.quantized(MODEL.apply))(q, TOKENS)
    err = rel(out, ref)
    assert err < 2.5e-2, err  # 1.6e-2 measured (random init, 2 layers)
    # the same as running the model on the dequantised weights (scale commutes with the matmul)
    assert rel(out, jax.jit(MODEL.apply)(quant.dequantize(q), TOKENS)) < 1e-5
    # greedy next tokens mostly agree
    assert np.mean(np.argmax(out, -1) == np.argmax(ref, -1)) > 0.9


def test_bf16_logits_close_to_float32(ref):
    q = quant.quantize(VARIABLES, "bfloat16", exclude="lm_head")
    assert q["params"]["model"]["layers"]["1"]["mlp"]["up_proj"]["kernel"].dtype == jnp.bfloat16
    assert q["params"]["lm_head"]["kernel"].dtype == jnp.float32
    err = rel(jax.jit(quant.quantized(MODEL.apply))(q, TOKENS), ref)
    assert err < 1.5e-2, err  # 0.8e-2 measured


def test_lora_on_an_int8_base():
    fwd = jax.jit(lorajax.adapt(MODEL.apply, SPEC, mode="factored"))
    qfwd = jax.jit(quant.adapt(MODEL.apply, SPEC))
    ref = fwd(VARIABLES, ADAPTERS, TOKENS)
    # unquantised params: the same as lorajax.adapt
    assert rel(qfwd(VARIABLES, ADAPTERS, TOKENS), ref) < 1e-5
    q = quant.quantize(VARIABLES, "int8")
    out = qfwd(q, ADAPTERS, TOKENS)
    assert rel(out, fwd(quant.dequantize(q), ADAPTERS, TOKENS)) < 1e-5
    assert rel(out, ref) < 3e-2  # 2.1e-2 measured
    # the adapters really act: zero them and the output changes
    zero = jax.tree.map(jnp.zeros_like, ADAPTERS)
    assert rel(qfwd(q, zero, TOKENS), out) > 1e-3
    # vmapped over a population of adapters (ESSA's evaluation)
    pop = jax.tree.map(lambda x: jnp.stack([x, 0.5 * x]), ADAPTERS)
    outs = jax.jit(jax.vmap(lambda a: quant.adapt(MODEL.apply, SPEC)(q, a, TOKENS)))(pop)
    assert rel(outs[0], out) < 1e-5


def test_bad_input():
    with pytest.raises(ValueError, match="dtype must be one of"):
        quant.quantize(VARIABLES, "int4")
    with pytest.raises(ValueError, match="selected no 2-D kernel"):
        quant.quantize(VARIABLES, targets="nothing")
    q = quant.quantize(VARIABLES, "int8")
    with pytest.raises(ValueError):  # lorajax.adapt does not take quantised params: fails loudly
        lorajax.adapt(MODEL.apply, SPEC, mode="factored")(q, ADAPTERS, TOKENS)
    with pytest.raises(ValueError, match="plain LoRA"):
        quant.adapt(MODEL.apply, lorajax.Spec("dora", rank=2, targets=["q_proj"]))

    class Ein(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Einsum((4, 3), "bi,ij->bj", name="e")(x)

    m = Ein()
    v = m.init(jax.random.key(0), jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="handles nn.Dense only"):
        quant.quantized(m.apply)(quant.quantize(v), jnp.ones((2, 4)))
