"""RandLoRA: what is unique to the variant (the shared checks live in tests/test_conformance.py).

Reference equations (specs/adapters.md §4, written here independently of the
implementation, in float64). PyTorch layout ``W: [out, in]``; ``d_min``,
``d_max`` of the weight, ``nb = ⌈d_min / r⌉``; shared bases
``A: [r, 1, D_min]``, ``B: [D_max, N, r]``; ``Λ: [r, nb]``, ``Γ: [nb, d_min]``::

    M = Σ_j  B[:d_max, j // r, j % r]  ⊗  Λ[j // nb, j % nb] · A[j // nb, 0, :d_min] ⊙ Γ[j % nb]
    ΔW_torch = s · M (in ≤ out) or s · Mᵀ (in > out);  Flax ΔK = ΔW_torchᵀ
    s = α / r ("peft") or α / r / √nb ("official")
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax
from lorajax.variants import randlora

R = 3


def _params(dtype=jnp.float32):
    # "q": in 7 < out 10 (d_min 7, nb 3); "v": in 11 > out 5 (d_min 5, nb 2).
    # Largest (out, in) = (10, 11): D_max = 11, D_min = 10, N = 4.
    kq, kv = jax.random.split(jax.random.key(0))
    return {
        "q": {"kernel": jax.random.normal(kq, (7, 10), dtype)},
        "v": {"kernel": jax.random.normal(kv, (11, 5), dtype)},
    }


def _spec(**kw):
    kw.setdefault("rank", R)
    kw.setdefault("alpha", 2.0)
    return lorajax.Spec("randlora", targets=["q", "v"], **kw)


def _randomize(adapters, key=1):
    out = jax.tree_util.tree_map(lambda x: x, adapters)
    keys = iter(jax.random.split(jax.random.key(key), 4))
    for name in ("q", "v"):
        leaf = out[name]["kernel"]
        for k in ("randlora_lambda", "randlora_gamma"):
            leaf[k] = jax.random.normal(next(keys), leaf[k].shape)
    return out


def _ref_delta_flax(w_shape, adapter, shared, s):
    """ΔK: [in, out] from the sum over the nb·r paired rank-1 terms (float64)."""
    d_in, d_out = w_shape
    d_min, d_max = min(w_shape), max(w_shape)
    a = np.asarray(shared["randlora_A"], np.float64)
    b = np.asarray(shared["randlora_B"], np.float64)
    lam = np.asarray(adapter["randlora_lambda"], np.float64)
    gam = np.asarray(adapter["randlora_gamma"], np.float64)
    r, nb = lam.shape
    m = np.zeros((d_max, d_min))
    for j in range(r * nb):
        k_a, b_a = divmod(j, nb)  # row j of the scaled A stack: (rank k, base b)
        b_b, k_b = divmod(j, r)  # column j of the B stack: (base b, rank k)
        row = lam[k_a, b_a] * a[k_a, 0, :d_min] * gam[b_a]
        m += np.outer(b[:d_max, b_b, k_b], row)
    delta_torch = s * m if d_in <= d_out else s * m.T  # [out, in]
    return delta_torch.T


def test_shared_bases_shapes_and_unit_std():
    ad = lorajax.init(_spec(), _params(), jax.random.key(0))
    a, b = np.asarray(ad["_shared"]["randlora_A"]), np.asarray(ad["_shared"]["randlora_B"])
    assert a.shape == (R, 1, 10) and b.shape == (11, 4, R)
    for x in (a, b):
        np.testing.assert_allclose(x.std(ddof=1), 1.0, rtol=1e-5)
        # uniform with unit std: |x| <= √3
        assert np.abs(x).max() <= math.sqrt(3) * 1.2


def test_dense_bases_are_uniform():
    params = {"a": {"kernel": jnp.zeros((300, 200))}}
    ad = lorajax.init(lorajax.Spec("randlora", rank=8, targets=["a"]), params, jax.random.key(0))
    b = np.asarray(ad["_shared"]["randlora_B"])
    assert b.shape == (300, 25, 8)
    np.testing.assert_allclose(np.abs(b).max(), math.sqrt(3), rtol=0.01)  # U(-√3, √3) has unit std


@pytest.mark.parametrize("option,s", [("sparse", 3.0), ("very_sparse", None)])
def test_sparse_bases_are_ternary(option, s):
    params = {"a": {"kernel": jnp.zeros((300, 400))}}
    ad = lorajax.init(lorajax.Spec("randlora", rank=4, targets=["a"], **{option: True}), params, jax.random.key(0))
    d_min = 300
    s = s or math.sqrt(d_min)
    for x in (np.asarray(ad["_shared"]["randlora_A"]), np.asarray(ad["_shared"]["randlora_B"])):
        np.testing.assert_allclose(x.std(ddof=1), 1.0, rtol=1e-5)
        values = np.unique(x)
        assert len(values) == 3 and values[1] == 0 and np.isclose(values[0], -values[2])
        if x.size > 10_000:
            frac_pos = float(np.mean(x > 0))
            frac_neg = float(np.mean(x < 0))
            for frac in (frac_pos, frac_neg):
                assert abs(frac - 1 / (2 * s)) < 0.1 / s


def test_lambda_gamma_init_and_identity():
    params = _params()
    spec = _spec()
    ad = lorajax.init(spec, params, jax.random.key(0))
    for name, (nb, d_min) in (("q", (3, 7)), ("v", (2, 5))):
        leaf = ad[name]["kernel"]
        assert set(leaf) == {"randlora_lambda", "randlora_gamma"}
        assert leaf["randlora_lambda"].shape == (R, nb) and leaf["randlora_gamma"].shape == (nb, d_min)
        np.testing.assert_array_equal(np.asarray(leaf["randlora_lambda"]), 0.0)
        np.testing.assert_allclose(np.asarray(leaf["randlora_gamma"]), 1.0 / d_min, rtol=1e-7)
    merged = lorajax.merge(spec, params, ad)
    for name in ("q", "v"):
        np.testing.assert_array_equal(np.asarray(merged[name]["kernel"]), np.asarray(params[name]["kernel"]))


def test_bases_come_from_projection_prng_key():
    p = _params()
    a = lorajax.init(_spec(), p, jax.random.key(0))["_shared"]
    b = lorajax.init(_spec(), p, jax.random.key(123))["_shared"]
    c = lorajax.init(_spec(projection_prng_key=1), p, jax.random.key(0))["_shared"]
    for k in ("randlora_A", "randlora_B"):
        np.testing.assert_array_equal(a[k], b[k])
        assert not np.array_equal(a[k], c[k])


@pytest.mark.parametrize("scaling", ["peft", "official"])
def test_merged_weight_equation(scaling):
    params = _params()
    spec = _spec(scaling=scaling)
    ad = _randomize(lorajax.init(spec, params, jax.random.key(0)))
    merged = lorajax.merge(spec, params, ad)
    for name, nb in (("q", 3), ("v", 2)):
        w = np.asarray(params[name]["kernel"], np.float64)
        s = 2.0 / R / (math.sqrt(nb) if scaling == "official" else 1.0)
        want = w + _ref_delta_flax(w.shape, ad[name]["kernel"], ad["_shared"], s)
        np.testing.assert_allclose(np.asarray(merged[name]["kernel"]), want, rtol=1e-5, atol=1e-5, err_msg=name)


def test_update_is_full_rank():
    params = _params()
    spec = _spec()
    ad = _randomize(lorajax.init(spec, params, jax.random.key(0)))
    merged = lorajax.merge(spec, params, ad)
    for name in ("q", "v"):
        d = np.asarray(merged[name]["kernel"], np.float64) - np.asarray(params[name]["kernel"], np.float64)
        assert np.linalg.matrix_rank(d, tol=1e-4 * np.abs(d).max()) == min(d.shape)


@pytest.mark.parametrize("d_in,d_out", [(11, 5), (5, 11), (6, 6)])
def test_factored_forward_equation(d_in, d_out):
    model = nn.Dense(d_out, name="dense")
    x = jax.random.normal(jax.random.key(3), (4, d_in))
    variables = model.init(jax.random.key(0), x)
    spec = lorajax.Spec("randlora", rank=2, alpha=3.0, targets=".*")
    ad = lorajax.init(spec, variables, jax.random.key(0))
    leaf = ad["params"]["kernel"]
    leaf["randlora_lambda"] = jax.random.normal(jax.random.key(8), leaf["randlora_lambda"].shape)
    leaf["randlora_gamma"] = jax.random.normal(jax.random.key(9), leaf["randlora_gamma"].shape)
    y = lorajax.adapt(model.apply, spec, mode="factored")(variables, ad, x)

    p = variables["params"]
    k = np.asarray(p["kernel"], np.float64) + _ref_delta_flax((d_in, d_out), leaf, ad["_shared"], 1.5)
    want = np.asarray(x, np.float64) @ k + np.asarray(p["bias"])[None, :]
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)


def test_rank_may_exceed_d_min():
    params = _params()
    spec = _spec(rank=8)  # > d_min of both targets: one basis each
    ad = _randomize(lorajax.init(spec, params, jax.random.key(0)))
    assert ad["q"]["kernel"]["randlora_lambda"].shape == (8, 1)
    assert ad["_shared"]["randlora_B"].shape == (11, 2, 8)
    merged = lorajax.merge(spec, params, ad)
    w = np.asarray(params["v"]["kernel"], np.float64)
    want = w + _ref_delta_flax(w.shape, ad["v"]["kernel"], ad["_shared"], 2.0 / 8)
    np.testing.assert_allclose(np.asarray(merged["v"]["kernel"]), want, rtol=1e-5, atol=1e-5)


def test_mixed_ranks_raise():
    with pytest.raises(ValueError, match="one rank"):
        lorajax.init(_spec(rank_pattern={"v": 2}), _params(), jax.random.key(0))


@pytest.mark.parametrize("kw,match", [
    (dict(scaling="paper"), "scaling"),
    (dict(sparse=True, very_sparse=True), "exclusive"),
    (dict(sparse=1), "sparse"),
    (dict(projection_prng_key="0"), "projection_prng_key"),
])
def test_bad_options_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        _spec(**kw)


def test_bases_that_do_not_fit_raise_naming_the_path():
    params = _params()
    spec = _spec()
    ad = lorajax.init(spec, params, jax.random.key(0))
    ad["_shared"] = {"randlora_A": ad["_shared"]["randlora_A"][:, :, :6], "randlora_B": ad["_shared"]["randlora_B"]}
    with pytest.raises(ValueError, match=r"q/kernel.*randlora_A"):
        lorajax.merge(spec, params, ad)


def test_counts_and_frozen_bases_get_no_gradient():
    params = _params()
    spec = _spec()
    ad = _randomize(lorajax.init(spec, params, jax.random.key(0)))
    mask = lorajax.trainable_mask(spec, ad)
    assert mask["_shared"] == {"randlora_A": False, "randlora_B": False}
    counts = lorajax.count_params(spec, params, ad)
    assert counts["trainable"] == 3 * (R + 7) + 2 * (R + 5)  # nb · (r + d_min) per target
    assert counts["frozen_adapter"] == R * 10 + 11 * 4 * R

    trainable, frozen = lorajax.partition(spec, ad)
    x = jax.random.normal(jax.random.key(4), (3, 11))

    def loss(tr):
        merged = lorajax.merge(spec, params, lorajax.combine(tr, frozen))
        return jnp.sum(x @ merged["v"]["kernel"])

    grads = jax.grad(loss)(trainable)
    names = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(grads)[0]}
    assert not any("randlora_A" in n or "randlora_B" in n for n in names)
    assert float(jnp.abs(grads["v"]["kernel"]["randlora_gamma"]).max()) > 0


def test_unmerge_roundtrip():
    params = _params()
    spec = _spec()
    ad = _randomize(lorajax.init(spec, params, jax.random.key(0)))
    back = lorajax.unmerge(spec, lorajax.merge(spec, params, ad), ad)
    for name in ("q", "v"):
        np.testing.assert_allclose(np.asarray(back[name]["kernel"]), np.asarray(params[name]["kernel"]),
                                   rtol=1e-5, atol=1e-5)


def test_bf16_weights_keep_dtype():
    params = _params(jnp.bfloat16)
    spec = _spec()
    ad = _randomize(lorajax.init(spec, params, jax.random.key(0)))
    assert ad["_shared"]["randlora_A"].dtype == jnp.float32
    assert ad["q"]["kernel"]["randlora_lambda"].dtype == jnp.float32
    assert lorajax.merge(spec, params, ad)["q"]["kernel"].dtype == jnp.bfloat16


def test_num_bases():
    assert [randlora.num_bases(d, 4) for d in (1, 4, 5, 8, 9)] == [1, 1, 2, 2, 3]


@pytest.mark.parametrize("rank", [R, 8])
def test_trainable_count_is_nb_r_plus_d_min(rank):
    params, spec = _params(), _spec(rank=rank)
    ad = lorajax.init(spec, params, jax.random.key(0))
    got = lorajax.registry.get("randlora").trainable_count(lorajax.select(spec, params))
    assert got == lorajax.count_params(spec, params, ad)["trainable"]
    if rank == 8:  # nb = 1 for both weights
        assert got == (8 + 7) + (8 + 5)
