"""LRAgent decode at model level (`lorajax.lragent_decode`): n agents decode in one batch from one base-prefilled
context; exact (== each agent's merged `llama.generate`, token for token) when only the last layer's K/V are
adapted; the approximation with adapters everywhere is measured, and vanishes with zero adapters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax
from lorajax import lragent, lragent_decode
from lorajax.models import llama

CFG = llama.Config(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
IDS = [2, 0, 1]  # three agents from a pool of three adapters
S, NEW, RANK = 7, 5, 4
EVERY = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def base():
    model = llama.build(CFG)
    params = model.init(jax.random.key(0), *llama.example_inputs(CFG))["params"]
    ctx = jax.random.randint(jax.random.key(1), (S,), 0, CFG.vocab_size, jnp.int32)
    return model, params, ctx


def make_pool(params, targets, *, random_b=True, alpha=4 * RANK):
    spec = lorajax.Spec("lora", rank=RANK, alpha=alpha, targets=targets, init_weights=not random_b)
    return lorajax.stack_adapters(spec, [lorajax.init(spec, {"params": params}, 10 + s) for s in range(3)])


def test_exact_mode_equals_merged_generate_token_for_token(base):
    model, params, ctx = base
    pool = make_pool(params, r".*layers\.1\.self_attn\.(k|v)_proj")  # the last layer's K/V only
    got, logits = lragent_decode.decode(model, params, pool, IDS, ctx, NEW, mode="exact", return_logits=True)
    want, first = lragent_decode.reference(model, params, pool, IDS, ctx, NEW)
    assert got.shape == (3, S + NEW) and logits.shape == (3, NEW, CFG.vocab_size)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(logits[:, 0], first, rtol=1e-5, atol=1e-5)
    # the adapters matter: agents' first-step logits differ from each other
    assert float(jnp.max(jnp.abs(logits[0, 0] - logits[1, 0]))) > 1e-3


def test_approximation_is_reported_and_vanishes_with_zero_adapters(base):
    model, params, ctx = base
    pool = make_pool(params, EVERY)
    rep = lragent_decode.report(model, params, pool, IDS, ctx, NEW)
    assert set(rep) == {"token_agreement", "prefix_agreement", "first_token_agreement", "first_step_max_logit_diff"}
    assert np.isfinite(rep["first_step_max_logit_diff"]) and rep["first_step_max_logit_diff"] > 1e-4
    assert 0.0 <= rep["token_agreement"] <= 1.0
    zero = make_pool(params, EVERY, random_b=False)  # B = 0: every agent is the base model
    rep0 = lragent_decode.report(model, params, zero, IDS, ctx, NEW)
    assert rep0["token_agreement"] == 1.0 and rep0["first_step_max_logit_diff"] <= 1e-5
    with pytest.raises(ValueError, match="mode='exact' needs every adapter in the last decoder layer"):
        lragent_decode.decode(model, params, pool, IDS, ctx, NEW, mode="exact")


@pytest.mark.parametrize("targets, shared_k", [(["k_proj", "v_proj"], False), (["v_proj"], True)])
def test_cache_bytes_equal_the_formula(base, targets, shared_k):
    model, params, ctx = base
    caches = lragent_decode.build_caches(model, params, make_pool(params, targets), IDS, ctx)
    n, width = len(IDS), CFG.num_key_value_heads * CFG.head_dim
    assert caches[0]["k"].shape[0] == (1 if shared_k else n) and caches[0]["lr_v"].shape == (n, S - 1, RANK)
    mem = lragent_decode.memory(model, caches, n)
    assert mem["ratio"] == pytest.approx(lragent.memory_ratio(n, RANK, width, shared_k=shared_k), rel=1e-12)
    assert mem["full_bytes"] == CFG.num_hidden_layers * 2 * n * (S - 1) * width * 4


def test_clear_errors(base):
    model, params, ctx = base
    pool = make_pool(params, ["v_proj"])
    with pytest.raises(ValueError, match=r"agent_ids \[0, 3\] out of range for a pool of 3"):
        lragent_decode.decode(model, params, pool, [0, 3], ctx, NEW)
    with pytest.raises(ValueError, match="lm_head/kernel is not supported"):
        lragent_decode.decode(model, params, make_pool(params, ["v_proj", "lm_head"]), IDS, ctx, NEW)
    with pytest.raises(ValueError, match="mode must be one of"):
        lragent_decode.decode(model, params, pool, IDS, ctx, NEW, mode="shared")
    with pytest.raises(ValueError, match=">= 2 tokens"):
        lragent_decode.decode(model, params, pool, IDS, ctx[:1], NEW)
