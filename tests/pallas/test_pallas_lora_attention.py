"""pallas_kernels.lora_attention (Flash-LoRA-Attention): kernel vs the materialising reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.lora_attention import BlockSizes, lora_attention, lora_attention_reference

SMALL = BlockSizes(16, 16)


def make(b, sq, sk, h, hkv, d, r, dtype, *, base_rows, lr_rows, k_lora=True, seed=0):
    """``base_rows`` / ``lr_rows``: 1 = one cache shared by the batch, ``b`` = one per row."""
    rng = np.random.default_rng(seed)
    f = lambda *shape, s=1.0, dt=jnp.float32: jnp.asarray(rng.standard_normal(shape) * s, dt)  # noqa: E731
    q, kb, vb = f(b, sq, h, d, dt=dtype), f(base_rows, sk, hkv, d, dt=dtype), f(base_rows, sk, hkv, d, dt=dtype)
    lr_k = f(lr_rows, sk, r) if k_lora else None
    b_k = f(b, hkv, r, d, s=0.3) if k_lora else None
    return q, kb, vb, lr_k, f(lr_rows, sk, r), b_k, f(b, hkv, r, d, s=0.3)


# (B, Sq, Sk, H, Hkv, D, r, dtype, shared base, shared LR, K lora, causal, blocks)
CASES = {
    # decode: one query, keys off the block size, MQA (2 query heads on 1 KV head), rank 128
    "decode_mqa_rank128": (1, 1, 37, 2, 1, 16, 128, jnp.float32, 1, 1, True, False, SMALL),
    # prefill, causal, 3 query tiles x 3 key tiles, head dim 24, rank 1, shared base cache (BaseShared)
    "prefill_causal_shared_base": (2, 20, 45, 2, 2, 24, 1, jnp.float32, 1, 2, True, True, SMALL),
    # bf16, GQA, shared base and LR caches (BaseLRShared), V-only adapter as in LRAgent's kernel
    "bf16_gqa_v_only": (2, 9, 30, 4, 2, 16, 3, jnp.bfloat16, 1, 1, False, True, None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_reference(case, interpret, close):
    b, sq, sk, h, hkv, d, r, dt, base_rows, lr_rows, k_lora, causal, bs = CASES[case]
    args = make(b, sq, sk, h, hkv, d, r, dt, base_rows=base_rows, lr_rows=lr_rows, k_lora=k_lora)
    out = lora_attention(*args, scale=2.0, causal=causal, block_sizes=bs, interpret=interpret)
    assert out.dtype == dt and out.shape == (b, sq, h, d)
    ref = jax.jit(lambda *a: lora_attention_reference(*a, scale=2.0, causal=causal))(*args)
    close(out, ref)


def test_adapter_changes_the_output_and_zero_adapter_is_plain_attention(close):
    args = make(1, 4, 10, 1, 1, 16, 2, jnp.float32, base_rows=1, lr_rows=1)
    ref = jax.jit(lambda *a: lora_attention_reference(*a, scale=2.0))
    q, kb, vb, lr_k, lr_v, b_k, b_v = args
    plain = jax.nn.softmax(jnp.einsum("qd,kd->qk", q[0, :, 0], kb[0, :, 0]) / 4.0) @ vb[0, :, 0]
    close(ref(q, kb, vb, lr_k, lr_v, 0 * b_k, 0 * b_v)[0, :, 0], plain)
    assert float(jnp.abs(ref(*args)[0, :, 0] - plain).max()) > 1e-2


def test_forward_only_grad_raises():
    args = make(1, 4, 10, 1, 1, 16, 2, jnp.float32, base_rows=1, lr_rows=1)
    loss = lambda q: lora_attention(q, *args[1:], interpret=True).sum()  # noqa: E731
    with pytest.raises(NotImplementedError, match="forward-only"):
        jax.make_jaxpr(jax.grad(loss))(args[0])


def test_bad_input_raises_before_launch():
    q, kb, vb, lr_k, lr_v, b_k, b_v = make(2, 4, 10, 4, 2, 16, 3, jnp.float32, base_rows=2, lr_rows=2)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        lora_attention(q[:, :, :3], kb, vb, lr_k, lr_v, b_k, b_v)
    with pytest.raises(ValueError, match="lr_k must be"):
        lora_attention(q, kb, vb, lr_k[:, :9], lr_v, b_k, b_v)
    with pytest.raises(ValueError, match="leading axis must be the batch 2 or 1"):
        lora_attention(q, jnp.concatenate([kb, kb[:1]]), vb, lr_k, lr_v, b_k, b_v)
    with pytest.raises(ValueError, match="k_base and v_base"):
        lora_attention(q, kb, vb[:, :, :, :8], lr_k, lr_v, b_k, b_v)
    with pytest.raises(ValueError, match="together"):
        lora_attention(q, kb, vb, lr_k, lr_v, None, b_v)
    with pytest.raises(TypeError, match="dtype mismatch, k_base is bfloat16"):
        lora_attention(q, kb.astype(jnp.bfloat16), vb, lr_k, lr_v, b_k, b_v)
    with pytest.raises(TypeError, match="dtype mismatch"):
        lora_attention(q, kb, vb, lr_k, lr_v.astype(jnp.bfloat16), b_k, b_v)
    with pytest.raises(ValueError, match="causal needs Sq <= Sk"):
        lora_attention(jnp.concatenate([q, q, q], axis=1), kb, vb, lr_k, lr_v, b_k, b_v, causal=True)
