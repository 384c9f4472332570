"""Adapters as data: the codec and library, SG-LoRA generation, AutoLoRA retrieval and gated fusion, Trans-LoRA."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lorajax
from lorajax import adapter_library, autolora, combination, sg_lora, trans_lora
from lorajax.models import llama

N_EXPERTS, EMB = 4, 8


@pytest.fixture(scope="module")
def tiny():
    cfg = llama.Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    model = llama.LlamaForCausalLM(cfg)
    ids = jax.random.randint(jax.random.key(0), (2, 6), 0, 32)
    variables = {"params": model.init(jax.random.key(1), ids)["params"]}
    spec = lorajax.Spec("lora", rank=2, alpha=4, targets=["q_proj", "v_proj"], init_weights=False)
    experts = [lorajax.init(spec, variables, jax.random.key(10 + i)) for i in range(N_EXPERTS)]
    emb = np.asarray(jax.random.normal(jax.random.key(2), (N_EXPERTS, EMB)))
    return model, variables, spec, experts, emb, ids


def _close(a, b, tol):
    return all(np.allclose(x, y, atol=tol, rtol=tol) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_codec_round_trip_and_size(tiny):
    _, _, _, experts, _, _ = tiny
    codec = adapter_library.Codec.of(experts[0])
    v = codec.flatten(experts[1])
    assert v.shape == (codec.size,) and codec.size == sum(x.size for x in jax.tree.leaves(experts[1]))
    back = codec.unflatten(v)
    assert jax.tree.structure(back) == jax.tree.structure(experts[1])
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(experts[1])))


def test_bad_inputs(tiny):
    _, variables, spec, experts, emb, _ = tiny
    with pytest.raises(ValueError, match="empty"):
        adapter_library.build([], np.zeros((0, EMB)))
    with pytest.raises(ValueError, match="empty"):
        adapter_library.similarity_weights(np.zeros((0, EMB)), np.ones(EMB))
    other_rank = lorajax.init(lorajax.Spec("lora", rank=3, targets=["q_proj", "v_proj"]), variables, 0)
    with pytest.raises(ValueError, match="shape"):
        adapter_library.build([experts[0], other_rank], emb[:2])
    other_targets = lorajax.init(lorajax.Spec("lora", rank=2, targets=["q_proj"]), variables, 0)
    with pytest.raises(ValueError, match="does not match"):
        adapter_library.Codec.of(experts[0]).flatten(other_targets)
    with pytest.raises(ValueError, match="embeddings"):
        adapter_library.build(experts, emb[:2])
    with pytest.raises(ValueError, match="temperature"):
        adapter_library.similarity_weights(emb, emb[0], temperature=0.0)
    with pytest.raises(ValueError, match="empty"):
        autolora.stack(spec, [])
    with pytest.raises(ValueError, match="kept none"):
        disc = {"w": jnp.ones(3), "b": jnp.array(-100.0), "mu": jnp.zeros(3), "sd": jnp.ones(3)}
        trans_lora.keep(disc, np.zeros((2, 5)), np.zeros((2, 3)))


def test_similarity_weights_is_top_k_softmax_of_cosines(tiny):
    emb = tiny[4]
    q = np.asarray(jax.random.normal(jax.random.key(5), (EMB,)))
    w = np.asarray(adapter_library.similarity_weights(emb, q, temperature=0.3, top_k=2))
    c = emb @ q / (np.linalg.norm(emb, axis=1) * np.linalg.norm(q))
    top = np.argsort(-c)[:2]
    want = np.zeros(N_EXPERTS)
    want[top] = np.exp(c[top] / 0.3) / np.exp(c[top] / 0.3).sum()
    np.testing.assert_allclose(w, want, atol=1e-6)


def test_sg_lora_reconstructs_an_expert_from_its_own_description(tiny):
    _, _, _, experts, emb, _ = tiny
    lib = adapter_library.build(experts, emb)
    m, U, h = sg_lora.basis(lib)
    np.testing.assert_allclose(m[None, :] + h @ U.T, lib.vectors, atol=1e-5)  # v_i = m + U h_i
    gen = sg_lora.fit(lib, jax.random.key(3), temperature=0.01, steps=150)
    for i in range(N_EXPERTS):
        v = sg_lora.generate_vector(gen, lib, emb[i], temperature=0.01)
        assert float(jnp.linalg.norm(v - lib.vectors[i]) / jnp.linalg.norm(lib.vectors[i])) < 1e-2
    assert _close(sg_lora.generate(gen, lib, emb[2], temperature=0.01), experts[2], 5e-2)
    # a sampled z moves the adapter around the prior, within the library's span
    s = sg_lora.generate_vector(gen, lib, emb[0], temperature=0.01, key=jax.random.key(4))
    resid = (s - m) - U @ (U.T @ (s - m))
    assert float(jnp.linalg.norm(resid)) < 1e-3 * float(jnp.linalg.norm(s))


def test_autolora_features_are_gauge_invariant_and_retrieval_finds_own_adapter(tiny):
    _, variables, spec, experts, emb, _ = tiny
    f = jnp.stack([autolora.features(spec, variables, a) for a in experts])
    R = jnp.array([[2.0, 1.0], [0.5, 1.5]])
    Rinv = jnp.linalg.inv(R)
    regauged = jax.tree.map(lambda x: x, experts[0])
    for blk in jax.tree_util.tree_leaves(regauged, is_leaf=lambda d: isinstance(d, dict) and "lora_A" in d):
        blk["lora_A"], blk["lora_B"] = blk["lora_A"] @ R, Rinv @ blk["lora_B"]
    np.testing.assert_allclose(autolora.features(spec, variables, regauged), f[0], atol=1e-5)
    enc = autolora.fit_encoders(f, emb, jax.random.key(6), dim=8, steps=100)
    index = autolora.build_index(autolora.encode_adapters(enc, f), [f"e{i}" for i in range(N_EXPERTS)])
    q = autolora.encode_texts(enc, emb)
    for i in range(N_EXPERTS):
        ids, scores = autolora.retrieve(index, q[i], k=2)
        assert int(ids[0]) == i and float(scores[0]) >= float(scores[1])


def test_gated_fusion_equals_merged_weighted_deltas(tiny):
    model, variables, spec, experts, _, ids = tiny
    pool = autolora.stack(spec, experts)
    fwd = jax.jit(autolora.adapt_gated(model.apply, spec))
    merged = lorajax.adapt(model.apply, spec, mode="merged")
    one_hot = jnp.eye(N_EXPERTS)[2]
    np.testing.assert_allclose(fwd(variables, pool, one_hot, ids), merged(variables, experts[2], ids), atol=1e-5)
    g = jnp.array([0.1, 0.5, -0.3, 0.7])
    want_params = combination.apply_delta(
        variables, combination.add([combination.delta(spec, variables, a) for a in experts], list(map(float, g)))
    )
    np.testing.assert_allclose(fwd(variables, pool, g, ids), model.apply(want_params, ids), atol=1e-5)
    # per-module gates: a row per module; a gate function: per token
    L = len(autolora.module_names(spec, variables, pool))
    np.testing.assert_allclose(fwd(variables, pool, jnp.tile(g, (L, 1)), ids), fwd(variables, pool, g, ids), atol=1e-6)
    by_fn = autolora.adapt_gated(model.apply, spec)(variables, pool, lambda name, x: jnp.tile(g, (x.shape[0], 1)), ids)
    np.testing.assert_allclose(by_fn, fwd(variables, pool, g, ids), atol=1e-5)
    with pytest.raises(ValueError, match="gates have shape"):
        fwd(variables, pool, jnp.ones(3), ids)


def test_trans_lora_same_base_distils_the_teacher(tiny):
    model, variables, spec, experts, _, _ = tiny
    fwd = lorajax.adapt(model.apply, spec, mode="factored")
    teacher = experts[0]  # B random (init_weights=False): a non-zero ΔW
    t_logits = lambda ids: fwd(variables, teacher, ids)  # noqa: E731
    prompts = jax.random.randint(jax.random.key(7), (48, 2), 0, 32)
    samples = jax.jit(lambda p, k: trans_lora.sample(t_logits, p, 10, k))(prompts, jax.random.key(8))
    assert samples.shape == (48, 12) and bool(jnp.all(samples[:, :2] == prompts))
    # filter: synthetic features shifted from the real ones are told apart
    real = jax.random.normal(jax.random.key(9), (32, 4))
    synth = jax.random.normal(jax.random.key(10), (32, 4)) + jnp.array([[3.0, 0, 0, 0]])
    disc = trans_lora.fit_discriminator(real, synth, steps=200)
    acc = 0.5 * (np.mean(trans_lora.p_real(disc, real) >= 0.5) + np.mean(trans_lora.p_real(disc, synth) < 0.5))
    w = np.abs(np.asarray(disc["w"]))
    assert acc > 0.85 and w[0] > 3 * w[1:].max()  # the Bayes rule (x0 < 1.5) is 93% accurate; w along the shift
    kept = trans_lora.keep(disc, np.arange(64).reshape(64, 1), jnp.concatenate([real, synth]))
    assert set(kept.ravel()) <= set(range(64)) and np.mean(kept.ravel() < 32) > 0.8
    # distil: teacher base == student base, fresh student LoRA (B = 0)
    student0 = lorajax.init(lorajax.Spec("lora", rank=2, alpha=4, targets=["q_proj", "v_proj"]), variables, 11)
    student, losses = trans_lora.distil(
        fwd, variables, spec, student0, t_logits, np.asarray(samples), optax.adam(3e-2), steps=80, batch_size=16
    )
    held = jax.random.randint(jax.random.key(12), (16, 12), 0, 32)
    kl = jax.jit(lambda a: trans_lora.kl_loss(t_logits(held), fwd(variables, a, held)))
    kl0, kl1 = float(kl(student0)), float(kl(student))
    # the student can represent the teacher exactly (same base, variant, rank): KL -> 0. 80 Adam steps reach
    # ~2% of the fresh student's held-out KL (measured, seed-fixed); 5% leaves margin without admitting failure
    assert losses[-1] < losses[0] and kl1 < 0.05 * kl0, (kl0, kl1)
