"""TeRA: what is unique to the variant (the shared checks live in tests/test_conformance.py).

The structure is lorajax's design (specs/adapters.md §7, UNVERIFIED against the
paper). Reference equation, written here with explicit index loops (Flax
orientation, ``K: [in, out]``, ``in = Π i_k``, ``out = Π o_k``, row-major
multi-indices)::

    ΔK[(i_1..i_N), (o_1..o_N)] = Σ_r G[r_1..r_N] Π_k F_k[i_k, o_k, r_k] λ_k[r_k]

Spec test bullets: (i) the contraction equals this definition, (ii) ΔK = 0 at
init, (iii) the rank of ΔK exceeds the trainable count Σ_k R_k, (iv) the
trainable count is N·R.
"""

from __future__ import annotations

import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax
from lorajax.variants import tera


def _loops(core, factors, lambdas):
    """ΔK from the definition, by loops over every index (float64)."""
    g = np.asarray(core, np.float64)
    fs = [np.asarray(f, np.float64) for f in factors]
    ls = [np.asarray(l, np.float64) for l in lambdas]
    f_in, f_out = tuple(f.shape[0] for f in fs), tuple(f.shape[1] for f in fs)
    out = np.zeros((math.prod(f_in), math.prod(f_out)))
    for ii in itertools.product(*map(range, f_in)):
        for oo in itertools.product(*map(range, f_out)):
            total = 0.0
            for rr in itertools.product(*(range(n) for n in g.shape)):
                term = g[rr]
                for k in range(len(fs)):
                    term *= fs[k][ii[k], oo[k], rr[k]] * ls[k][rr[k]]
                total += term
            out[np.ravel_multi_index(ii, f_in), np.ravel_multi_index(oo, f_out)] = total
    return out


def _randomize(spec, adapters, seed=1):
    """Every trainable λ ~ N(0, 1); the frozen bases untouched."""
    trainable, frozen = lorajax.partition(spec, adapters)
    leaves, treedef = jax.tree_util.tree_flatten(trainable)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return lorajax.combine(jax.tree_util.tree_unflatten(treedef, leaves), frozen)


class Net(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.features, name="dense")(x)


@pytest.mark.parametrize("f_in,f_out,rank", [((6,), (5,), 3), ((3, 2), (2, 5), 2), ((3, 2, 2), (5, 1, 2), 2)])
def test_merged_and_factored_equal_the_definition(f_in, f_out, rank):
    """(i): merged ΔK and the factored x ΔK against the loop definition, N = 1, 2, 3."""
    d_in, d_out = math.prod(f_in), math.prod(f_out)
    model = Net(d_out)
    x = jax.random.normal(jax.random.key(3), (4, d_in))
    variables = model.init(jax.random.key(0), x)
    spec = lorajax.Spec("tera", rank=rank, targets=["dense"], factors=(f_in, f_out))
    ad = _randomize(spec, lorajax.init(spec, variables, jax.random.key(0)))
    (key,) = ad["_shared"]["tera_bases"]
    base = ad["_shared"]["tera_bases"][key]
    leaf = ad["params"]["dense"]["kernel"]
    n = len(f_in)
    want = _loops(base["tera_core"], [base[f"tera_factor_{k}"] for k in range(n)],
                  [leaf[f"tera_lambda_{k}"] for k in range(n)])
    kernel = np.asarray(variables["params"]["dense"]["kernel"], np.float64)
    merged = lorajax.merge(spec, variables, ad)["params"]["dense"]["kernel"]
    np.testing.assert_allclose(np.asarray(merged), kernel + want, rtol=1e-5, atol=1e-5)
    bias = np.asarray(variables["params"]["dense"]["bias"], np.float64)
    y_want = np.asarray(x, np.float64) @ (kernel + want) + bias[None, :]
    for mode in ("factored", "merged"):
        y = lorajax.adapt(model.apply, spec, mode=mode)(variables, ad, x)
        np.testing.assert_allclose(np.asarray(y), y_want, rtol=1e-5, atol=1e-5, err_msg=mode)


def test_factored_update_four_modes():
    """The pairwise chain (first mode, core with the last, then the middle ones) for N = 4."""
    f_in, f_out, r = (2, 1, 3, 2), (2, 2, 1, 3), 2
    base = tera.draw_base(0, "t", f_in, f_out, r)
    lams = [jax.random.normal(jax.random.key(k), (r,)) for k in range(4)]
    scaled = [base[f"tera_factor_{k}"] * lams[k][None, None, :] for k in range(4)]
    want = _loops(base["tera_core"], [base[f"tera_factor_{k}"] for k in range(4)], lams)
    np.testing.assert_allclose(np.asarray(tera.contract(base["tera_core"], scaled)).reshape(want.shape), want,
                               rtol=1e-5, atol=1e-6)
    x = jax.random.normal(jax.random.key(9), (5, 12))
    y = tera.factored_update(x, f_in, f_out, base["tera_core"], scaled)
    np.testing.assert_allclose(np.asarray(y), np.asarray(x, np.float64) @ want, rtol=1e-5, atol=1e-6)


def test_identity_and_lambda_init():
    """(ii): λ_N = 0 at init, the others lambda_init; ΔK = 0 exactly."""
    params = {"a": {"kernel": jax.random.normal(jax.random.key(0), (12, 20))}}
    spec = lorajax.Spec("tera", rank=4, targets=["a"], lambda_init=0.5)
    ad = lorajax.init(spec, params, jax.random.key(0))
    leaf = ad["a"]["kernel"]
    assert set(leaf) == {"tera_lambda_0", "tera_lambda_1", "tera_lambda_2"}  # n_modes = 3
    np.testing.assert_array_equal(leaf["tera_lambda_0"], 0.5)
    np.testing.assert_array_equal(leaf["tera_lambda_1"], 0.5)
    np.testing.assert_array_equal(leaf["tera_lambda_2"], 0.0)
    np.testing.assert_array_equal(lorajax.merge(spec, params, ad)["a"]["kernel"], params["a"]["kernel"])


def test_first_gradient_reaches_only_the_last_lambda():
    params = {"a": {"kernel": jax.random.normal(jax.random.key(0), (12, 20))}}
    spec = lorajax.Spec("tera", rank=4, targets=["a"])
    ad = lorajax.init(spec, params, jax.random.key(0))
    trainable, frozen = lorajax.partition(spec, ad)
    x = jax.random.normal(jax.random.key(1), (3, 12))
    g = jax.grad(lambda tr: jnp.sum(jnp.sin(x @ lorajax.merge(spec, params, lorajax.combine(tr, frozen))["a"]["kernel"])))(
        trainable)["a"]["kernel"]
    assert float(jnp.abs(g["tera_lambda_2"]).max()) > 0
    np.testing.assert_array_equal(g["tera_lambda_0"], 0.0)
    np.testing.assert_array_equal(g["tera_lambda_1"], 0.0)


def test_rank_exceeds_trainable_count():
    """(iii): with N = 2 modes and R = 2 (4 trainable numbers) a 16 x 16 ΔK has full rank."""
    params = {"a": {"kernel": jnp.zeros((16, 16))}}
    spec = lorajax.Spec("tera", rank=2, targets=["a"], n_modes=2)
    ad = _randomize(spec, lorajax.init(spec, params, jax.random.key(0)))
    assert lorajax.count_params(spec, params, ad)["trainable"] == 4
    dk = np.asarray(lorajax.merge(spec, params, ad)["a"]["kernel"], np.float64)
    assert np.linalg.matrix_rank(dk) > 4
    assert np.linalg.matrix_rank(dk) == 16


def test_counts_and_sharing():
    """(iv): N·R trainable per target; one frozen base per (tensorisation, R), R^N + R Σ i_k o_k numbers."""
    params = {"q": {"kernel": jnp.zeros((12, 20))}, "v": {"kernel": jnp.zeros((12, 20))},
              "o": {"kernel": jnp.zeros((20, 12))}, "u": {"kernel": jnp.zeros((12, 20))}}
    spec = lorajax.Spec("tera", rank=4, targets=["q", "v", "o", "u"], rank_pattern={"u": 3})
    ad = lorajax.init(spec, params, jax.random.key(0))
    bases = ad["_shared"]["tera_bases"]
    assert sorted(bases) == ["i3x2x2_o5x2x2_r3", "i3x2x2_o5x2x2_r4", "i5x2x2_o3x2x2_r4"]
    n = lorajax.count_params(spec, params, ad)
    assert n["trainable"] == 3 * 4 * 3 + 3 * 3  # q, v, o: N·R = 12; u: N·R = 9
    assert lorajax.registry.get("tera").trainable_count(lorajax.select(spec, params)) == n["trainable"]
    spec2 = spec.replace(n_modes=2)
    ad2 = lorajax.init(spec2, params, jax.random.key(0))
    assert lorajax.registry.get("tera").trainable_count(lorajax.select(spec2, params)) \
        == lorajax.count_params(spec2, params, ad2)["trainable"] == 2 * 4 * 3 + 2 * 3
    frozen = sum(r ** 3 + r * (3 * 5 + 2 * 2 + 2 * 2) for r in (4, 3, 4))
    assert n["frozen_adapter"] == frozen
    b = bases["i3x2x2_o5x2x2_r4"]
    assert b["tera_core"].shape == (4, 4, 4)
    assert [b[f"tera_factor_{k}"].shape for k in range(3)] == [(3, 5, 4), (2, 2, 4), (2, 2, 4)]
    # q and v read the same base: equal λ's give equal updates
    same = _randomize(spec, ad)
    same["v"]["kernel"] = same["q"]["kernel"]
    merged = lorajax.merge(spec, params, same)
    np.testing.assert_array_equal(merged["q"]["kernel"], merged["v"]["kernel"])


def test_bases_come_from_projection_prng_key():
    params = {"a": {"kernel": jnp.zeros((12, 20))}}
    spec = lorajax.Spec("tera", rank=3, targets=["a"])
    a = lorajax.init(spec, params, jax.random.key(0))["_shared"]["tera_bases"]
    b = lorajax.init(spec, params, jax.random.key(7))["_shared"]["tera_bases"]
    c = lorajax.init(spec.replace(projection_prng_key=1), params, jax.random.key(0))["_shared"]["tera_bases"]
    for k in a["i3x2x2_o5x2x2_r3"]:
        np.testing.assert_array_equal(a["i3x2x2_o5x2x2_r3"][k], b["i3x2x2_o5x2x2_r3"][k])
        assert not np.array_equal(a["i3x2x2_o5x2x2_r3"][k], c["i3x2x2_o5x2x2_r3"][k])
    # the shared core and factors are frozen buffers
    assert not any(jax.tree_util.tree_leaves(lorajax.trainable_mask(spec, {"_shared": {"tera_bases": a}})))


def test_random_scale_gives_lecun_variance():
    """With every λ_k = 1, ΔK entries have variance ≈ 1/in (G ~ N(0, 1/in), F_k ~ N(0, 1/R))."""
    f_in, f_out, r = (8, 8), (8, 12), 16
    base = tera.draw_base(0, "s", f_in, f_out, r)
    dk = tera.contract(base["tera_core"], [base[f"tera_factor_{k}"] for k in range(2)])
    var = float(jnp.var(dk)) * 64
    assert 0.5 < var < 2.0, var


def test_split():
    assert tera.split(4096, 3) == (16, 16, 16)
    assert tera.split(12, 3) == (3, 2, 2)
    assert tera.split(6, 3) == (3, 2, 1)
    assert tera.split(7, 3) == (7, 1, 1)
    assert tera.split(1, 2) == (1, 1)
    for n in (11008, 768, 3072, 100, 97, 1):
        for m in (1, 2, 3, 4):
            parts = tera.split(n, m)
            assert len(parts) == m and math.prod(parts) == n and list(parts) == sorted(parts, reverse=True)


def test_factors_per_module_regex():
    params = {"q": {"kernel": jnp.zeros((12, 20))}, "o": {"kernel": jnp.zeros((20, 12))}}
    spec = lorajax.Spec("tera", rank=2, targets=["q", "o"], factors={"q": ((4, 3), (5, 4))})
    ad = lorajax.init(spec, params, jax.random.key(0))
    assert sorted(ad["_shared"]["tera_bases"]) == ["i4x3_o5x4_r2", "i5x2x2_o3x2x2_r2"]  # o: automatic
    assert len(ad["q"]["kernel"]) == 2 and len(ad["o"]["kernel"]) == 3


def test_factors_that_do_not_multiply_raise_naming_the_module():
    params = {"blk": {"q": {"kernel": jnp.zeros((12, 20))}}, "o": {"kernel": jnp.zeros((12, 21))}}
    spec = lorajax.Spec("tera", rank=2, targets=["q", "o"], factors=((4, 3), (5, 4)))
    with pytest.raises(ValueError, match=r"'o'.*out factors \(5, 4\) multiply to 20.*out = 21"):
        lorajax.init(spec, params, jax.random.key(0))
    spec = lorajax.Spec("tera", rank=2, targets=["q"], factors={"q": ((4, 4), (5, 4))})
    with pytest.raises(ValueError, match=r"'blk\.q'.*in factors \(4, 4\) multiply to 16.*in = 12"):
        lorajax.init(spec, params, jax.random.key(0))
    spec = lorajax.Spec("tera", rank=2, targets=["q"], factors={"q": ((4, 3), (5, 4)), "blk.q": ((3, 4), (4, 5))})
    with pytest.raises(ValueError, match=r"'blk\.q'.*several factors keys match"):
        lorajax.init(spec, params, jax.random.key(0))


@pytest.mark.parametrize("kwargs,match", [
    (dict(n_modes=0), "n_modes must be an int"),
    (dict(n_modes=9), "n_modes must be an int"),
    (dict(n_modes=True), "n_modes must be an int"),
    (dict(factors=(4, 3)), "factors must be None, a pair"),
    (dict(factors=((4, 3), (5,))), "same length"),
    (dict(factors=((4, 0), (5, 4))), "positive"),
    (dict(factors={"q": (4, 5)}), r"factors\['q'\]: expected a pair"),
    (dict(factors={"(": ((4,), (5,))}), "not a valid regex"),
    (dict(lambda_init=0.0), "lambda_init must be a finite non-zero"),
    (dict(projection_prng_key=1.5), "projection_prng_key must be an int"),
])
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lorajax.Spec("tera", rank=2, targets=["q"], **kwargs)


def test_adapters_for_another_shape_raise():
    spec = lorajax.Spec("tera", rank=2, targets=["a"])
    ad = lorajax.init(spec, {"a": {"kernel": jnp.zeros((12, 20))}}, jax.random.key(0))
    with pytest.raises(ValueError, match="tera_bases"):
        lorajax.merge(spec, {"a": {"kernel": jnp.zeros((20, 12))}}, ad)
