"""SHiRA: what is unique to the variant (the shared checks live in tests/test_conformance.py).

Reference equations (specs/adapters.md §3, Flax orientation ``W: [in, out]``)::

    idx: [2, K] (row 0 = input index i, row 1 = output index o), v: [K],  K = r·(in + out)
    W' = W + c·S,   S[i_k, o_k] = v_k,   y = x W + c·(x S)
    entries sorted by (o, i) (row-major over PEFT's [out, in]); v = 0 at init
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lorajax
from lorajax.variants import shira


def _params(d_in=10, d_out=7, seed=0, dtype=jnp.float32):
    return {"dense": {"kernel": jax.random.normal(jax.random.key(seed), (d_in, d_out), dtype)}}


def _spec(rank=2, **kw):
    return lorajax.Spec("shira", rank=rank, targets=["dense"], **kw)


def _randomize(adapters, seed=1):
    leaf = dict(adapters["dense"]["kernel"])
    leaf["shira_weight"] = jax.random.normal(jax.random.key(seed), leaf["shira_weight"].shape)
    return {"dense": {"kernel": leaf}}


def _dense_s(leaf, shape):
    s = np.zeros(shape)
    idx = np.asarray(leaf["shira_indices"])
    for k, (i, o) in enumerate(idx.T):
        s[i, o] += float(leaf["shira_weight"][k])
    return s


def test_init_count_indices_and_zero_values():
    params = _params(10, 7)
    spec = _spec(2)
    ad = lorajax.init(spec, params, jax.random.key(0))
    leaf = ad["dense"]["kernel"]
    k = 2 * (10 + 7)
    assert leaf["shira_weight"].shape == (k,) and leaf["shira_weight"].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(leaf["shira_weight"]), 0.0)
    idx = np.asarray(leaf["shira_indices"])
    assert idx.shape == (2, k) and idx.dtype == np.int32
    assert idx[0].min() >= 0 and idx[0].max() < 10 and idx[1].min() >= 0 and idx[1].max() < 7
    flat = idx[1] * 10 + idx[0]  # row-major over [out, in]
    assert np.all(np.diff(flat) > 0), "indices must be unique and sorted by (out, in)"
    counts = lorajax.count_params(spec, params, ad)
    assert counts["trainable"] == k and counts["frozen_adapter"] == 2 * k
    assert lorajax.registry.get("shira").trainable_count(lorajax.select(spec, params)) == k
    spec3 = _spec(3, mask_type="wm")
    ad3 = lorajax.init(spec3, params, jax.random.key(0))
    assert lorajax.registry.get("shira").trainable_count(lorajax.select(spec3, params)) \
        == lorajax.count_params(spec3, params, ad3)["trainable"] == 3 * (10 + 7)


def test_indices_are_frozen_and_optimisers_never_see_them():
    params = _params()
    spec = _spec()
    ad = _randomize(lorajax.init(spec, params, jax.random.key(0)))
    assert lorajax.trainable_mask(spec, ad)["dense"]["kernel"] == {"shira_weight": True, "shira_indices": False}
    trainable, frozen = lorajax.partition(spec, ad)
    assert trainable["dense"]["kernel"]["shira_indices"] is None
    assert frozen["dense"]["kernel"]["shira_weight"] is None
    x = jax.random.normal(jax.random.key(4), (3, 10))
    fwd = lorajax.adapt(lambda p, xx: xx @ p["dense"]["kernel"], spec, mode="merged")

    def loss(tr):
        return jnp.sum(fwd(params, lorajax.combine(tr, frozen), x) ** 2)

    opt = optax.adam(1e-2)
    state = opt.init(trainable)
    # the moments mirror `trainable` only: no leaf for the integer indices
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    assert any("shira_weight" in p for p in paths) and not any("shira_indices" in p for p in paths)
    grads = jax.grad(loss)(trainable)
    updates, state = opt.update(grads, state, trainable)
    new = lorajax.combine(optax.apply_updates(trainable, updates), frozen)
    np.testing.assert_array_equal(new["dense"]["kernel"]["shira_indices"], ad["dense"]["kernel"]["shira_indices"])
    assert new["dense"]["kernel"]["shira_indices"].dtype == jnp.int32
    assert not np.allclose(new["dense"]["kernel"]["shira_weight"], ad["dense"]["kernel"]["shira_weight"])


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_merged_weight_equation(scale):
    params = _params()
    spec = _spec(scale=scale)
    ad = _randomize(lorajax.init(spec, params, jax.random.key(0)))
    merged = lorajax.merge(spec, params, ad)["dense"]["kernel"]
    want = np.asarray(params["dense"]["kernel"], np.float64) + scale * _dense_s(ad["dense"]["kernel"], (10, 7))
    np.testing.assert_allclose(np.asarray(merged), want, rtol=1e-6, atol=1e-6)
    back = lorajax.unmerge(spec, lorajax.merge(spec, params, ad), ad)
    np.testing.assert_allclose(np.asarray(back["dense"]["kernel"]), np.asarray(params["dense"]["kernel"]),
                               rtol=1e-6, atol=1e-6)


def test_factored_forward_equation():
    model = nn.Dense(7, name="dense")
    x = jax.random.normal(jax.random.key(3), (2, 5, 10))
    variables = model.init(jax.random.key(0), x)
    spec = lorajax.Spec("shira", rank=2, targets=".*", scale=0.7)
    ad = lorajax.init(spec, variables, jax.random.key(0))
    leaf = dict(ad["params"]["kernel"])
    leaf["shira_weight"] = jax.random.normal(jax.random.key(8), leaf["shira_weight"].shape)
    ad = {"params": {"kernel": leaf}}
    y = lorajax.adapt(model.apply, spec, mode="factored")(variables, ad, x)
    p = variables["params"]
    w = np.asarray(p["kernel"], np.float64) + 0.7 * _dense_s(leaf, (10, 7))
    want = np.asarray(x, np.float64) @ w + np.asarray(p["bias"])
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backward,chunk_elements", [("sampled", shira.CHUNK_ELEMENTS),
                                                     ("sampled", 70),  # 70 // K(=34) = 2 tokens per chunk, 1 padded
                                                     ("dense", shira.CHUNK_ELEMENTS)])
def test_sparse_matmul_matches_reference_forward_and_backward(monkeypatch, backward, chunk_elements):
    monkeypatch.setattr(shira, "CHUNK_ELEMENTS", chunk_elements)
    idx = shira.random_indices(jax.random.key(0), 10, 7, 34)
    v = jax.random.normal(jax.random.key(1), (34,))
    x = jax.random.normal(jax.random.key(2), (5, 10))
    g = jax.random.normal(jax.random.key(3), (5, 7))

    def loss(fn):
        return lambda xx, vv: jnp.sum(fn(xx, vv, idx, 7) * g)

    ours = lambda xx, vv, ii, d: shira.sparse_matmul(xx, vv, ii, d, backward)  # noqa: E731
    np.testing.assert_allclose(ours(x, v, idx, 7), shira.sparse_matmul_reference(x, v, idx, 7),
                               rtol=1e-5, atol=1e-5)
    got = jax.grad(loss(ours), argnums=(0, 1))(x, v)
    want = jax.grad(loss(shira.sparse_matmul_reference), argnums=(0, 1))(x, v)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    # the v-gradient is the sampled product Σ_t x[t, i_k] g[t, o_k]
    want_v = np.einsum("tk,tk->k", np.asarray(x)[:, np.asarray(idx[0])], np.asarray(g)[:, np.asarray(idx[1])])
    np.testing.assert_allclose(np.asarray(got[1]), want_v, rtol=1e-5, atol=1e-5)


def test_weight_magnitude_mask_picks_the_largest_entries():
    # SHiRA-WM, arXiv:2406.13175v2 §3.1 item 3 / App. B.3: top-K |W| of each adapted layer
    w = jnp.asarray(np.random.default_rng(0).permutation(70).reshape(10, 7).astype(np.float32) - 35.0)
    w = w.at[0, 0].set(100.0).at[9, 6].set(-100.0)
    params = {"dense": {"kernel": w}}
    ad = lorajax.init(_spec(1, mask_type="wm"), params, jax.random.key(0))
    idx = np.asarray(ad["dense"]["kernel"]["shira_indices"])
    k = 17
    chosen = set(map(tuple, idx.T))
    want = set(map(tuple, np.argwhere(np.abs(np.asarray(w)) >= np.sort(np.abs(np.asarray(w)).ravel())[-k])))
    assert len(chosen) == k and chosen == want
    # ties: the lower flat index over [out, in] wins
    t = shira.topk_indices(jnp.ones((3, 2)), 2)
    np.testing.assert_array_equal(np.asarray(t), [[0, 1], [0, 0]])


def test_random_seed_shares_the_mask_across_same_shaped_targets():
    params = {"a": {"kernel": jnp.zeros((10, 7))}, "b": {"kernel": jnp.zeros((10, 7))}}
    per_target = lorajax.init(lorajax.Spec("shira", rank=1, targets=["a", "b"]), params, 0)
    assert not np.array_equal(per_target["a"]["kernel"]["shira_indices"], per_target["b"]["kernel"]["shira_indices"])
    seeded = lorajax.init(lorajax.Spec("shira", rank=1, targets=["a", "b"], random_seed=3), params, 0)
    np.testing.assert_array_equal(seeded["a"]["kernel"]["shira_indices"], seeded["b"]["kernel"]["shira_indices"])
    again = lorajax.init(lorajax.Spec("shira", rank=1, targets=["a", "b"], random_seed=3), params, 5)
    np.testing.assert_array_equal(seeded["a"]["kernel"]["shira_indices"], again["a"]["kernel"]["shira_indices"])


def test_init_weights_false_is_random():
    ad = lorajax.init(_spec(init_weights=False), _params(), jax.random.key(0))
    assert float(jnp.std(ad["dense"]["kernel"]["shira_weight"])) > 0.3


def test_bf16_weight_keeps_dtype():
    params = _params(dtype=jnp.bfloat16)
    spec = _spec()
    ad = _randomize(lorajax.init(spec, params, jax.random.key(0)))
    assert ad["dense"]["kernel"]["shira_weight"].dtype == jnp.float32
    assert lorajax.merge(spec, params, ad)["dense"]["kernel"].dtype == jnp.bfloat16


def test_errors_name_the_target_and_the_rule():
    params = {"blk": {"dense": {"kernel": jnp.zeros((6, 10))}}}
    with pytest.raises(ValueError, match=r"blk\.dense.*r·\(in\+out\) = 64 entries, more than the 60"):
        lorajax.init(lorajax.Spec("shira", rank=4, targets=["dense"]), params, 0)
    with pytest.raises(ValueError, match="mask_type"):
        _spec(mask_type="snip")
    with pytest.raises(ValueError, match="random_seed"):
        _spec(random_seed="1")
    with pytest.raises(ValueError, match="backward"):
        _spec(backward="fast")
    with pytest.raises(ValueError, match="scale"):
        _spec(scale="big")
    bad = {"dense": {"kernel": {"shira_weight": jnp.zeros(5), "shira_indices": jnp.zeros((2, 4), jnp.int32)}}}
    with pytest.raises(ValueError, match="dense.*do not pair up"):
        lorajax.merge(_spec(), _params(), bad)


def test_dense_backward_gives_the_same_gradients():
    model = nn.Dense(7, name="dense")
    x = jax.random.normal(jax.random.key(3), (2, 5, 10))
    variables = model.init(jax.random.key(0), x)
    grads = {}
    for backward in shira.BACKWARDS:
        spec = lorajax.Spec("shira", rank=2, targets=".*", backward=backward)
        ad = lorajax.init(spec, variables, jax.random.key(0))
        tr, fr = lorajax.partition(spec, ad)
        fwd = lorajax.adapt(model.apply, spec, mode="factored")
        grads[backward] = jax.grad(lambda t: jnp.sum(jnp.sin(fwd(variables, lorajax.combine(t, fr), x))))(tr)
    np.testing.assert_allclose(grads["dense"]["params"]["kernel"]["shira_weight"],
                               grads["sampled"]["params"]["kernel"]["shira_weight"], rtol=1e-5, atol=1e-6)
