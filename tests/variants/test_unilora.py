"""Uni-LoRA: what is unique to the variant (the shared checks live in tests/test_conformance.py).

Reference equations (specs/adapters.md §9; Flax orientation ``W: [in, out]``)::

    D = Σ_targets r·(in + out);  idx: [D] in [0, d), each value q or q+1 times (q = D // d)
    P: [D, d],  P[p, idx[p]] = 1/√count[idx[p]]   (one non-zero per row; Pᵀ P = I_d when D ≥ d)
    θ_D = P θ_d, laid out per target (in layout order) as A_torch [r, in] then B_torch [out, r], row-major
    W' = W + A B,  y = x W + (x A) B,  A = A_torchᵀ, B = B_torchᵀ      (no α/r scaling)
    ∂L/∂θ_d = Pᵀ ∂L/∂θ_D
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax
from lorajax.variants import unilora

R = 2
D_THETA = 20


def _params(dtype=jnp.float32):
    kq, kv = jax.random.split(jax.random.key(0))
    return {
        "q": {"kernel": jax.random.normal(kq, (6, 5), dtype)},
        "v": {"kernel": jax.random.normal(kv, (7, 3), dtype)},
    }


def _spec(**kw):
    kw.setdefault("rank", R)
    kw.setdefault("theta_d_length", D_THETA)
    return lorajax.Spec("unilora", targets=["q", "v"], **kw)


def _projection(shared, order):
    """θ_D's positions -> (P: [D, d]) and per-target (A, B) slices of θ_D, rebuilt from the stored blocks."""
    idx = []
    for name in order:
        blk = shared["unilora_indices"][name]
        idx.append(np.asarray(blk["unilora_indices_A"]).T.reshape(-1))  # torch [r, in], row-major
        idx.append(np.asarray(blk["unilora_indices_B"]).T.reshape(-1))  # torch [out, r], row-major
    idx = np.concatenate(idx)
    d = shared["unilora_theta_d"].shape[0]
    counts = np.bincount(idx, minlength=d)
    p = np.zeros((idx.size, d))
    p[np.arange(idx.size), idx] = 1.0 / np.sqrt(counts[idx])
    return idx, p


def test_generate_index_is_balanced_and_seeded():
    for big_d, d in ((47, 10), (40, 10), (7, 10)):
        idx = unilora.generate_index(big_d, d, 42)
        assert idx.shape == (big_d,) and idx.min() >= 0 and idx.max() < d
        counts = np.bincount(idx, minlength=d)
        q = big_d // d
        assert set(np.unique(counts)) <= {q, q + 1} and counts.sum() == big_d
        assert int(np.sum(counts == q + 1)) == big_d % d
        np.testing.assert_array_equal(idx, unilora.generate_index(big_d, d, 42))
    assert not np.array_equal(unilora.generate_index(470, 10, 42), unilora.generate_index(470, 10, 43))


def test_layout_is_the_index_vector_and_projection_is_isometric():
    params = _params()
    spec = _spec()
    ad = lorajax.init(spec, params, jax.random.key(0))
    shared = ad["_shared"]
    assert shared["unilora_indices"]["q"]["unilora_indices_A"].shape == (6, R)
    assert shared["unilora_indices"]["q"]["unilora_indices_B"].shape == (R, 5)
    assert shared["unilora_indices"]["v"]["unilora_indices_A"].dtype == jnp.int32
    idx, p = _projection(shared, ["q", "v"])
    big_d = R * (6 + 5) + R * (7 + 3)
    np.testing.assert_array_equal(idx, unilora.generate_index(big_d, D_THETA, 42))
    np.testing.assert_allclose(p.T @ p, np.eye(D_THETA), atol=1e-12)
    counts = np.bincount(idx, minlength=D_THETA)
    np.testing.assert_allclose(np.asarray(shared["unilora_norm"]), 1 / np.sqrt(counts), rtol=1e-7)
    # the per-target markers carry each target's share of D
    assert int(ad["q"]["kernel"]["unilora_size"]) == R * 11 and int(ad["v"]["kernel"]["unilora_size"]) == R * 10


def test_theta_init_and_counts():
    params = _params()
    spec = _spec(init_theta_d_bound=0.05)
    ad = lorajax.init(spec, params, jax.random.key(0))
    theta = np.asarray(ad["_shared"]["unilora_theta_d"])
    assert theta.shape == (D_THETA,) and theta.dtype == np.float32
    assert 0.02 < np.abs(theta).max() <= 0.05
    counts = lorajax.count_params(spec, params, ad)
    assert counts["trainable"] == D_THETA
    mask = lorajax.trainable_mask(spec, ad)
    assert mask["_shared"]["unilora_theta_d"] is True
    assert not any(jax.tree_util.tree_leaves({k: v for k, v in mask["_shared"].items() if k != "unilora_theta_d"}))
    assert mask["q"]["kernel"] == {"unilora_size": False}
    # a different init key changes θ_d but not the projection
    other = lorajax.init(spec, params, jax.random.key(1))["_shared"]
    assert not np.array_equal(other["unilora_theta_d"], theta)
    jax.tree_util.tree_map(np.testing.assert_array_equal, other["unilora_indices"], ad["_shared"]["unilora_indices"])


def test_not_identity_at_init():
    params = _params()
    spec = _spec()
    ad = lorajax.init(spec, params, jax.random.key(0))
    merged = lorajax.merge(spec, params, ad)
    assert not np.allclose(np.asarray(merged["q"]["kernel"]), np.asarray(params["q"]["kernel"]), atol=1e-6)


def _theta_random(ad, key=5):
    shared = dict(ad["_shared"])
    shared["unilora_theta_d"] = jax.random.normal(jax.random.key(key), shared["unilora_theta_d"].shape)
    return {**ad, "_shared": shared}


def test_merged_weight_equation():
    params = _params()
    spec = _spec()
    ad = _theta_random(lorajax.init(spec, params, jax.random.key(0)))
    idx, p = _projection(ad["_shared"], ["q", "v"])
    theta_big = p @ np.asarray(ad["_shared"]["unilora_theta_d"], np.float64)  # θ_D = P θ_d
    merged = lorajax.merge(spec, params, ad)
    pos = 0
    for name in ("q", "v"):
        w = np.asarray(params[name]["kernel"], np.float64)
        d_in, d_out = w.shape
        a_t = theta_big[pos: pos + R * d_in].reshape(R, d_in)
        pos += R * d_in
        b_t = theta_big[pos: pos + d_out * R].reshape(d_out, R)
        pos += d_out * R
        want = w + (b_t @ a_t).T  # PyTorch ΔW = B A, transposed into the Flax kernel
        np.testing.assert_allclose(np.asarray(merged[name]["kernel"]), want, rtol=1e-5, atol=1e-6, err_msg=name)


def test_factored_forward_equation():
    model = nn.Dense(4, name="dense")
    x = jax.random.normal(jax.random.key(3), (5, 9))
    variables = model.init(jax.random.key(0), x)
    spec = lorajax.Spec("unilora", rank=3, targets=".*", theta_d_length=16)
    ad = _theta_random(lorajax.init(spec, variables, jax.random.key(0)))
    y = lorajax.adapt(model.apply, spec, mode="factored")(variables, ad, x)
    sh = ad["_shared"]
    g = np.asarray(sh["unilora_theta_d"], np.float64) * np.asarray(sh["unilora_norm"], np.float64)
    blk = sh["unilora_indices"][""]  # the kernel sits at the root: module name ""
    a, b = g[np.asarray(blk["unilora_indices_A"])], g[np.asarray(blk["unilora_indices_B"])]
    p = variables["params"]
    xn = np.asarray(x, np.float64)
    want = xn @ np.asarray(p["kernel"]) + p["bias"][None, :] + (xn @ a) @ b
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)


def test_gradient_is_projection_transpose_of_factor_gradients():
    params = _params()
    spec = _spec()
    ad = _theta_random(lorajax.init(spec, params, jax.random.key(0)))
    x = jax.random.normal(jax.random.key(4), (3, 6))
    xv = jax.random.normal(jax.random.key(6), (3, 7))

    def out(kq, kv):
        return jnp.sum(jnp.tanh(x @ kq)) + jnp.sum(jnp.sin(xv @ kv))

    trainable, frozen = lorajax.partition(spec, ad)

    def loss(tr):
        m = lorajax.merge(spec, params, lorajax.combine(tr, frozen))
        return out(m["q"]["kernel"], m["v"]["kernel"])

    g_theta = np.asarray(jax.grad(loss)(trainable)["_shared"]["unilora_theta_d"], np.float64)

    # ∂L/∂A, ∂L/∂B of plain LoRA factors at the same values, flattened in θ_D's layout
    sh = ad["_shared"]
    g = sh["unilora_theta_d"] * sh["unilora_norm"]
    fac = {n: (g[sh["unilora_indices"][n]["unilora_indices_A"]], g[sh["unilora_indices"][n]["unilora_indices_B"]])
           for n in ("q", "v")}

    def lora_loss(f):
        return out(params["q"]["kernel"] + f["q"][0] @ f["q"][1], params["v"]["kernel"] + f["v"][0] @ f["v"][1])

    gf = jax.grad(lora_loss)(fac)
    flat = np.concatenate([np.asarray(gf[n][i]).T.reshape(-1) for n in ("q", "v") for i in (0, 1)])
    _, p = _projection(sh, ["q", "v"])
    np.testing.assert_allclose(g_theta, p.T @ flat, rtol=1e-5, atol=1e-6)


def test_target_order_sets_the_layout():
    params = _params()
    spec = _spec(target_order=["v", "q"])
    ad = lorajax.init(spec, params, jax.random.key(0))
    idx, _ = _projection(ad["_shared"], ["v", "q"])
    np.testing.assert_array_equal(idx, unilora.generate_index(R * 10 + R * 11, D_THETA, 42))
    default = lorajax.init(_spec(), params, jax.random.key(0))["_shared"]["unilora_indices"]
    reordered = ad["_shared"]["unilora_indices"]["q"]["unilora_indices_A"]
    assert not np.array_equal(default["q"]["unilora_indices_A"], reordered)


def test_target_order_sorts_layers_numerically_then_by_suffix():
    def t(name):
        return lorajax.variants.base.Target(keys=tuple(name.split(".")) + ("kernel",), name=name, shape=(2, 2),
                                            in_axes=1, rank=1, alpha=1.0, options={})

    names = ["layers_10.attn.k", "layers_10.attn.q", "layers_2.mlp.up", "layers_2.attn.k", "layers_2.attn.q"]
    got = [x.name for x in unilora.layout_order([t(n) for n in names], ("q", "k", "up"))]
    assert got == ["layers_2.attn.q", "layers_2.attn.k", "layers_2.mlp.up", "layers_10.attn.q", "layers_10.attn.k"]
    assert [x.name for x in unilora.layout_order([t(n) for n in names], None)] == names
    with pytest.raises(ValueError, match=r"layers_2.mlp.up"):
        unilora.layout_order([t(n) for n in names], ("q", "k"))


def test_unmatched_target_order_raises_at_init():
    with pytest.raises(ValueError, match="target_order"):
        lorajax.init(_spec(target_order=["q"]), _params(), jax.random.key(0))


def test_ranks_may_differ():
    params = _params()
    spec = _spec(rank_pattern={"v": 3})
    ad = lorajax.init(spec, params, jax.random.key(0))
    assert ad["_shared"]["unilora_indices"]["v"]["unilora_indices_A"].shape == (7, 3)
    idx, _ = _projection(ad["_shared"], ["q", "v"])
    np.testing.assert_array_equal(idx, unilora.generate_index(R * 11 + 3 * 10, D_THETA, 42))


def test_adapters_for_other_targets_raise_naming_the_target():
    params = _params()
    ad = lorajax.init(_spec(), params, jax.random.key(0))
    sh = dict(ad["_shared"])
    sh["unilora_indices"] = {"q": sh["unilora_indices"]["q"]}
    with pytest.raises(ValueError, match=r"v/kernel.*'v'"):
        lorajax.merge(_spec(), params, {**ad, "_shared": sh})


@pytest.mark.parametrize("kw,match", [
    (dict(theta_d_length=0), "theta_d_length"),
    (dict(proj_seed=-1), "proj_seed"),
    (dict(init_theta_d_bound=0.0), "init_theta_d_bound"),
    (dict(target_order="q_proj"), "target_order"),
    (dict(target_order=["q", 3]), "target_order"),
])
def test_bad_options_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        _spec(**kw)


def test_unmerge_roundtrip_and_bf16():
    params = _params()
    spec = _spec()
    ad = _theta_random(lorajax.init(spec, params, jax.random.key(0)))
    back = lorajax.unmerge(spec, lorajax.merge(spec, params, ad), ad)
    for name in ("q", "v"):
        np.testing.assert_allclose(np.asarray(back[name]["kernel"]), np.asarray(params[name]["kernel"]),
                                   rtol=1e-5, atol=1e-5)
    p16 = _params(jnp.bfloat16)
    ad16 = lorajax.init(spec, p16, jax.random.key(0))
    assert ad16["_shared"]["unilora_theta_d"].dtype == jnp.float32
    assert lorajax.merge(spec, p16, ad16)["q"]["kernel"].dtype == jnp.bfloat16


@pytest.mark.parametrize("kw", [dict(), dict(theta_d_length=7, rank_pattern={"v": 3})])
def test_trainable_count_is_d_once(kw):
    params, spec = _params(), _spec(**kw)
    ad = lorajax.init(spec, params, jax.random.key(0))
    got = lorajax.registry.get("unilora").trainable_count(lorajax.select(spec, params))
    assert got == lorajax.count_params(spec, params, ad)["trainable"] == spec.options.theta_d_length
