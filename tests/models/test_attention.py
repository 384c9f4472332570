"""Blockwise attention (causal or not), RoPE constants, compute dtype and remat policies of the Llama model.

The dense path is the one checked against transformers (test_llama.py); here the library defaults are
checked against it on random inputs, values and gradients, at tiny shapes with small blocks.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lorajax
from lorajax.models import attention, llama

CFG = llama.Config(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2,
)


def _qkv(S=19, K=2, G=2, d=4, B=2):
    ks = jax.random.split(jax.random.key(0), 3)
    return (jax.random.normal(ks[0], (B, S, K, G, d)), jax.random.normal(ks[1], (B, S, K, d)),
            jax.random.normal(ks[2], (B, S, K, d)))


def _mask(S, valid, window=None):
    s = np.arange(S)
    m = s[None, :] <= s[:, None]
    if window is not None:
        m &= s[None, :] > s[:, None] - window
    return jnp.asarray(m[None] & valid[:, None, :])


@pytest.mark.parametrize("window", [None, 5])
def test_blockwise_equals_dense_values_and_grads(window):
    q, k, v = _qkv()
    valid = np.ones((2, 19), bool)
    valid[1, :3] = False  # left padding: rows 0..2 of sequence 1 see no key and are not compared
    mask = _mask(19, valid, window)
    rows = jnp.asarray(valid)[:, :, None, None, None]

    def loss(fn, q, k, v):
        return jnp.sum(jnp.where(rows, fn(q, k, v, mask), 0.0) ** 2)

    dense = jax.jit(jax.value_and_grad(lambda *a: loss(attention.dense_attention, *a), argnums=(0, 1, 2)))(q, k, v)
    for block in (4, 7):
        fn = lambda q, k, v, m: attention.blockwise_attention(q, k, v, m, window=window, block=block)  # noqa: E731
        got = jax.jit(jax.value_and_grad(lambda *a: loss(fn, *a), argnums=(0, 1, 2)))(q, k, v)
        np.testing.assert_allclose(got[0], dense[0], rtol=1e-5)
        for g, want in zip(got[1], dense[1]):
            np.testing.assert_allclose(g, want, atol=1e-5)


def test_blockwise_bidirectional_equals_dense_values_and_grads():
    """causal=False: every query block reads all S keys; random padding of the keys, each row sees one at least."""
    S = 19
    q, k, v = _qkv(S=S)
    valid = np.random.default_rng(0).random((2, S)) < 0.6
    valid[:, 5] = True
    mask = jnp.asarray(np.broadcast_to(valid[:, None, :], (2, S, S)))

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v, mask) ** 2)

    dense = jax.jit(jax.value_and_grad(lambda *a: loss(attention.dense_attention, *a), argnums=(0, 1, 2)))(q, k, v)
    for block in (4, 7, S):
        fn = lambda q, k, v, m: attention.blockwise_attention(q, k, v, m, block=block, causal=False)  # noqa: E731
        got = jax.jit(jax.value_and_grad(lambda *a: loss(fn, *a), argnums=(0, 1, 2)))(q, k, v)
        np.testing.assert_allclose(got[0], dense[0], rtol=1e-5)
        for g, want in zip(got[1], dense[1]):
            np.testing.assert_allclose(g, want, atol=1e-5)
    # blocks are separate ops: no matmul forms a whole [S, S] score matrix
    jaxpr = jax.make_jaxpr(lambda *a: attention.blockwise_attention(*a, block=4, causal=False))(q, k, v, mask)
    dots = [e.outvars[0].aval.shape for e in jaxpr.eqns if e.primitive.name == "dot_general"]
    assert len(dots) == 2 * 5 and all(shape[-2:] != (S, S) for shape in dots), dots
    with pytest.raises(ValueError, match="window=5 needs causal=True"):
        attention.blockwise_attention(q, k, v, mask, window=5, causal=False)


def test_blockwise_refuses_cross_attention_and_bad_block():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="without a cache"):
        attention.blockwise_attention(q, k[:, :5], v[:, :5], jnp.ones((2, 19, 5), bool))
    with pytest.raises(ValueError, match="block must be"):
        attention.blockwise_attention(q, k, v, _mask(19, np.ones((2, 19), bool)), block=0)


@pytest.fixture(scope="module")
def params():
    return llama.build(CFG).init(jax.random.key(0), *llama.example_inputs(CFG))["params"]


@pytest.mark.parametrize("cfg", [CFG, dataclasses.replace(CFG, model_type="mistral", sliding_window=6)])
def test_model_defaults_equal_reference_paths(params, cfg):
    """Blockwise attention + constant RoPE tables == dense attention + RoPE from position ids (valid rows)."""
    ids = jax.random.randint(jax.random.key(1), (2, 21), 0, 64)
    mask = np.ones((2, 21), np.int32)
    mask[1, :4] = 0
    pos = jnp.broadcast_to(jnp.arange(21)[None], (2, 21))
    model = llama.LlamaForCausalLM(cfg, attention_block=4)
    got = jax.jit(model.apply)({"params": params}, ids, attention_mask=mask)
    want = jax.jit(model.clone(attention="dense").apply)({"params": params}, ids, attention_mask=mask, position_ids=pos)
    np.testing.assert_allclose(got * mask[..., None], want * mask[..., None], atol=2e-5)


@pytest.mark.parametrize("rope", [{}, {"rope_type": "dynamic", "rope_factor": 2.0, "max_position_embeddings": 8},
                                  {"rope_type": "llama3", "rope_factor": 8.0,
                                   "rope_original_max_position_embeddings": 8}])
def test_rope_constants_equal_runtime_tables(rope):
    cfg = dataclasses.replace(CFG, **rope)
    pos = jnp.broadcast_to(jnp.arange(13)[None], (2, 13))
    for a, b in zip(llama._rope_constants(cfg, 13, jnp.float32), llama._rope_tables(cfg, pos, jnp.float32)):
        np.testing.assert_allclose(a[0], b[1], atol=2e-7)


def test_bf16_compute_keeps_f32_master_adapters(params):
    ids = jax.random.randint(jax.random.key(1), (2, 9), 0, 64)
    spec = lorajax.Spec("lora", rank=2, alpha=4, targets=["q_proj", "gate_proj"])
    v = {"params": params}
    ad = jax.tree.map(lambda x: x + 0.01, lorajax.init(spec, v, 0))
    out = {}
    for name, model in (("f32", llama.build(CFG)), ("bf16", llama.LlamaForCausalLM(CFG, dtype=jnp.bfloat16))):
        fwd = lorajax.adapt(model.apply, spec, mode="factored")

        def loss(ad, fwd=fwd):
            logits = fwd(v, ad, ids).astype(jnp.float32)
            return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

        out[name] = jax.jit(jax.value_and_grad(loss))(ad)
    assert llama.LlamaForCausalLM(CFG, dtype=jnp.bfloat16).apply(v, ids).dtype == jnp.bfloat16
    assert abs(float(out["bf16"][0]) - float(out["f32"][0])) < 0.02
    for g, want in zip(jax.tree.leaves(out["bf16"][1]), jax.tree.leaves(out["f32"][1])):
        assert g.dtype == jnp.float32
        np.testing.assert_allclose(g, want, atol=0.05 * float(jnp.abs(want).max()) + 1e-6)


def test_remat_policies_same_values_and_unknown_names_refused(params):
    ids = jax.random.randint(jax.random.key(1), (1, 7), 0, 64)
    want = llama.build(CFG).apply({"params": params}, ids)
    for policy in (True, "dots_saveable", "none"):
        got = llama.LlamaForCausalLM(CFG, remat=policy).apply({"params": params}, ids)
        np.testing.assert_allclose(got, want, atol=1e-6)
    with pytest.raises(ValueError, match="remat="):
        llama.LlamaForCausalLM(CFG, remat="everything")
    with pytest.raises(ValueError, match="attention="):
        llama.LlamaForCausalLM(CFG, attention="flash")


def test_auto_block_bounds_the_block_count():
    assert [attention.auto_block(s) for s in (10, 128, 256, 1000, 2048, 8192)] == [64, 64, 64, 128, 256, 1024]
    assert all(-(-s // attention.auto_block(s)) <= 8 for s in range(1, 5000, 37))


def test_chunked_cross_entropy_equals_the_full_loss(params):
    """return_hidden + output_kernel + chunked CE == CE of the logits, values and adapter gradients."""
    from lorajax.train import losses

    model = llama.build(CFG)
    ids = jax.random.randint(jax.random.key(2), (2, 11), 0, 64)
    spec = lorajax.Spec("lora", rank=2, alpha=4, targets=["q_proj", "down_proj"])
    v = {"params": params}
    ad = jax.tree.map(lambda x: x + 0.01, lorajax.init(spec, v, 0))
    fwd = lorajax.adapt(model.apply, spec, mode="factored")

    def full(ad):
        z = fwd(v, ad, ids[:, :-1])
        return losses.cross_entropy(z.reshape(-1, 64), ids[:, 1:].reshape(-1)).mean()

    def chunked(ad):
        h = fwd(v, ad, ids[:, :-1], return_hidden=True)
        w = llama.output_kernel(CFG, params)
        return losses.chunked_cross_entropy(h.reshape(-1, 32), w, ids[:, 1:].reshape(-1), chunk=7)

    want, got = jax.jit(jax.value_and_grad(full))(ad), jax.jit(jax.value_and_grad(chunked))(ad)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
        np.testing.assert_allclose(g, w, atol=1e-6)
    with pytest.raises(ValueError, match="labels"):
        losses.chunked_cross_entropy(jnp.ones((4, 32)), jnp.ones((32, 64)), jnp.ones((3,), jnp.int32))
