"""LRAgent's decomposed KV cache (`lorajax.lragent`): each agent's attention equals attention over its full
``V_i = X W_v + s_i (X A_i) B_i``; the cache's bytes equal the memory formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax
from lorajax import lragent
from lorajax.multi_adapter import stack_adapters

S, IN, HKV, D, H = 12, 24, 2, 8, 4


def setup(n_pool=3, rank=4, seed=0):
    ks = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(ks[0], (S, IN))
    w_v = jax.random.normal(ks[1], (IN, HKV * D)) / np.sqrt(IN)
    # a real stack_adapters pool for a value projection, with different alphas (scales) per adapter
    specs = [lorajax.Spec("lora", rank=rank, alpha=a, targets=["v"], init_weights=False) for a in (4, 8, 2)][:n_pool]
    variables = {"params": {"v": {"kernel": w_v}}}
    stacked = stack_adapters(specs, [lorajax.init(sp, variables, i) for i, sp in enumerate(specs)])
    pool = stacked["params"]["v"]["kernel"]
    ids = jnp.array([2, 0, 1, 2])
    k = jax.random.normal(ks[2], (ids.size, S, HKV, D))
    q = jax.random.normal(ks[3], (ids.size, 3, H, D))
    return x, w_v, pool, ids, k, q


def full_attention(q, k, v, causal):
    """Plain softmax attention with every agent's full K and V ([n, S, Hkv, D]), GQA by repetition."""
    kk, vv = jnp.repeat(k, H // HKV, axis=2), jnp.repeat(v, H // HKV, axis=2)
    logits = jnp.einsum("nqhd,nkhd->nhqk", q, kk) / np.sqrt(D)
    if causal:
        sq = q.shape[1]
        logits = jnp.where(jnp.arange(sq)[:, None] + (S - sq) >= jnp.arange(S)[None, :], logits, -jnp.inf)
    return jnp.einsum("nhqk,nkhd->nqhd", jax.nn.softmax(logits, -1), vv)


@pytest.mark.parametrize("kernel", [None, "pallas"])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_equals_full_per_agent_values(kernel, causal):
    x, w_v, pool, ids, k, q = setup()
    cache = lragent.build_cache(x, w_v, pool, ids, k=k)
    got = lragent.attend(q, cache, pool, ids, causal=causal, kernel=kernel, interpret=True if kernel else None)
    v_full = jnp.stack([x @ w_v + pool["scale"][i] * (x @ pool["lora_A"][i]) @ pool["lora_B"][i] for i in ids])
    want = full_attention(q, k, v_full.reshape(ids.size, S, HKV, D), causal)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_cache_bytes_equal_the_formula():
    x, w_v, pool, ids, k, _ = setup()
    cache = lragent.build_cache(x, w_v, pool, ids, k=k)
    n, r = ids.size, pool["lora_A"].shape[-1]
    assert cache["v"].shape == (1, S, HKV, D) and cache["lr_v"].shape == (n, S, r)
    ratio = lragent.cache_bytes(cache) / lragent.full_cache_bytes(n, S, HKV, D, jnp.float32)
    assert ratio == pytest.approx(lragent.memory_ratio(n, r, HKV * D), rel=1e-12)
    assert lragent.memory_ratio(3, 8, 1024) == pytest.approx(0.671, abs=5e-4)  # the spec's worked example


def test_shared_a_keeps_one_low_rank_cache():
    x, w_v, pool, ids, k, q = setup()
    pool = {**pool, "lora_A": jnp.broadcast_to(pool["lora_A"][:1], pool["lora_A"].shape)}
    cache = lragent.build_cache(x, w_v, pool, ids, k=k, shared_a=True)
    assert cache["lr_v"].shape[0] == 1
    n, r = ids.size, pool["lora_A"].shape[-1]
    ratio = lragent.cache_bytes(cache) / lragent.full_cache_bytes(n, S, HKV, D, jnp.float32)
    assert ratio == pytest.approx(lragent.memory_ratio(n, r, HKV * D, shared_a=True), rel=1e-12)
    per_agent = lragent.build_cache(x, w_v, pool, ids, k=k)
    np.testing.assert_allclose(lragent.attend(q, cache, pool, ids), lragent.attend(q, per_agent, pool, ids),
                               rtol=1e-6, atol=1e-6)


def test_bad_input_raises():
    x, w_v, pool, ids, k, q = setup()
    with pytest.raises(ValueError, match="out of range"):
        lragent.build_cache(x, w_v, pool, jnp.array([0, 5]), k=k[:2])
    with pytest.raises(ValueError, match="key caches"):
        lragent.build_cache(x, w_v, pool, ids, k=k[:2])
    with pytest.raises(ValueError, match="do not line up"):
        lragent.build_cache(x[:, :5], w_v, pool, ids, k=k)
    with pytest.raises(ValueError, match="shared_a"):
        lragent.build_cache(x, w_v, pool, ids, k=k, shared_a=True)
    cache = lragent.build_cache(x, w_v, pool, ids, k=k)
    with pytest.raises(ValueError, match="q"):
        lragent.attend(q[:2], cache, pool, ids)
    with pytest.raises(ValueError, match="kernel"):
        lragent.attend(q, cache, pool, ids, kernel="cuda")
