"""The protein-LM paper's trainable counts: LoRA r=128 on every linear layer of Llama-3-8B and Phi-3-mini.

Shah & Jayaratnam (arXiv:2411.05966) report ~4% trainable parameters and 60% fewer for Phi-3-mini than
for Llama-3-8B; "all linear layers at rank 128" gives both (the spec's arithmetic). The trees are
abstract (`jax.eval_shape`): nothing is allocated. `targets="all-linear"` takes every 2-D kernel but the
head, so a fused ``qkv_proj`` / ``gate_up_proj`` gets one A/B pair on the fused matrix, as PEFT does.
"""

import jax
import jax.numpy as jnp
import pytest

import lorajax
from lorajax.models import llama

SPEC = lorajax.Spec("lora", rank=128, alpha=256, targets="all-linear")


def _abstract_adapters(params):
    return jax.eval_shape(lambda p: lorajax.init(SPEC, p, jax.random.key(0)), params)


@pytest.fixture(scope="module")
def llama3_8b():
    cfg = llama.Config(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
    )
    model = llama.build(cfg)
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]


def _phi3_mini():
    """Phi-3-mini's kernel shapes ([in, out]): fused qkv, o, fused gate_up, down; 32 layers (no model code)."""
    s = jax.ShapeDtypeStruct
    layer = {
        "self_attn": {
            "qkv_proj": {"kernel": s((3072, 9216), jnp.float32)},
            "o_proj": {"kernel": s((3072, 3072), jnp.float32)},
        },
        "mlp": {
            "gate_up_proj": {"kernel": s((3072, 16384), jnp.float32)},
            "down_proj": {"kernel": s((8192, 3072), jnp.float32)},
        },
    }
    head = {"kernel": s((3072, 32064), jnp.float32)}
    return {"model": {"layers": {str(i): layer for i in range(32)}}, "lm_head": head}


def test_llama3_8b_all_linear_rank128(llama3_8b):
    counts = lorajax.count_params(SPEC, llama3_8b, _abstract_adapters(llama3_8b))
    # per layer and unit rank: q 4096+4096, k 4096+1024, v 4096+1024, o 4096+4096, gate/up/down 3 x (4096+14336)
    assert counts["trainable"] == 32 * 128 * (8192 + 5120 + 5120 + 8192 + 3 * 18432) == 335_544_320
    assert counts["base"] == 8_030_261_248  # Llama-3-8B's parameter count
    assert 100 * counts["trainable"] / counts["base"] == pytest.approx(4.18, abs=0.005)


def test_phi3_mini_all_linear_rank128_is_six_tenths_of_llama(llama3_8b):
    phi = _phi3_mini()
    adapters = _abstract_adapters(phi)
    assert "lm_head" not in adapters  # the head is not a target of all-linear
    qkv = adapters["model"]["layers"]["0"]["self_attn"]["qkv_proj"]["kernel"]
    assert (qkv["lora_A"].shape, qkv["lora_B"].shape) == ((3072, 128), (128, 9216))  # one pair on the fused matrix
    n_phi = lorajax.count_params(SPEC, phi, adapters)["trainable"]
    assert n_phi == 32 * 128 * ((3072 + 9216) + 2 * 3072 + (3072 + 16384) + (8192 + 3072)) == 201_326_592
    n_llama = lorajax.count_params(SPEC, llama3_8b, _abstract_adapters(llama3_8b))["trainable"]
    assert n_phi / n_llama == pytest.approx(0.6, abs=1e-12)
