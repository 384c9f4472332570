"""One conformance suite over the variant registry (DESIGN.md, habit 9).

Every test is parametrized over ``lorajax.list_variants()``, so a newly
registered variant is picked up without editing this file. Per-variant
settings live in the small tables below; a variant not listed gets the
defaults.

The model mixes every layer kind the factored mode intercepts:

* ``dense_bias``   nn.Dense with a bias,      kernel [12, 20]
* ``dense_nobias`` nn.Dense without a bias,   kernel [20, 12]
* ``heads``        nn.DenseGeneral, axis=-1,  kernel [12, 2, 3]  (in_axes=1)
* ``merge_heads``  nn.DenseGeneral, axis=(-2, -1), kernel [2, 3, 12]  (in_axes=2)
* ``einsum``       nn.Einsum "...d,dhk->...hk", kernel [12, 2, 3]

Inputs are ``[2, 5, 12]``, i.e. T = 10 tokens; the rank is 4. Neither 10 nor
4 equals any kernel dimension, so a matmul whose output has a kernel's shape
is a full-size weight product, and it is a weight gradient when it contracts
over the 10 tokens rather than the rank (see the gradient-graph tests).
"""

from __future__ import annotations

import functools
import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lorajax
from lorajax import hlo, registry
from lorajax.adapters import call_variant

VARIANTS = lorajax.list_variants()

# ----------------------------------------------------------------------------
# Per-variant settings (defaults apply to variants not listed).
# ----------------------------------------------------------------------------

DEFAULT_SPEC_KWARGS = dict(rank=4, alpha=8.0)
SPEC_KWARGS = {
    "vera": dict(rank=4, d_initial=0.1),  # VeRA has no alpha scaling; alpha is ignored
    # LoRA-XS inits R ~ N(0, 1e-5²) (official code): near, not exact, identity; R = 0 checks the exact one
    "lora_xs": dict(rank=4, alpha=8.0, r_init_std=0.0),
    # Hydra: VTAB scale 0.1 (alpha unused); at scale 1 the random perturbation makes I + s·A_s B_s
    # ill-conditioned (cond ~6e3 on dense_nobias), so no f32 unmerge can meet rtol 1e-5
    "hydra": dict(rank=4, scale=0.1),
    # RandLoRA: perturb() moves Γ from 1/d_min ≈ 0.08 to ~N(0, 0.3²) on unit-std bases; at α/r = 2 the
    # outputs grow to ~1e3 and one f32 gradient entry cancels to 1e-3 of its leaf's scale (rel 3e-4)
    "randlora": dict(rank=4, alpha=2.0),
    # SHiRA needs r·(in+out) <= in·out: rank 4 does not fit the NNX test's 6x10 layer (64 > 60)
    "shira": dict(rank=2),
}

#: Variants whose factored forward legitimately forms the full-size product
#: ``A @ B: [in, out]`` -- DoRA needs it for the weight norm, which is
#: computed under ``stop_gradient`` (a forward-only matmul contracting over
#: the rank, never a weight gradient).
FORWARD_FULL_PRODUCT = {"dora"}

#: Variants whose paper does not give an identity at init (none today).
NOT_IDENTITY_AT_INIT: set[str] = set()
NOT_IDENTITY_AT_INIT.add("unilora")  # both factors are gathered from the random θ_d (PEFT and official alike)

#: Variants that are an identity at init only up to a few ulps under jit.
#: DoRA scales by ``m / n`` with ``m == n`` at init; eagerly that is exactly 1,
#: but XLA rewrites ``m / sqrt(x)`` as ``m * rsqrt(x)``, which is not exactly 1.
JIT_IDENTITY_ULPS = {"dora"}

#: Input-dependent variants (routing, e.g. FlyLoRA, SMoRA; ``adapted=None``): they run in
#: the factored mode only, and merging them must raise.
NOT_MERGEABLE = {v for v in VARIANTS if not registry.get(v).mergeable}


def modes(variant):
    return ("factored",) if variant in NOT_MERGEABLE else ("factored", "merged")


TARGETS = ["dense_bias", "dense_nobias", "heads", "merge_heads", "einsum"]
IN_AXES = {"merge_heads": 2}
RANK = 4
X_SHAPE = (2, 5, 12)  # T = 10 tokens


def spec_for(variant: str, **changes) -> lorajax.Spec:
    kwargs = {**DEFAULT_SPEC_KWARGS, **SPEC_KWARGS.get(variant, {}), **changes}
    kwargs.setdefault("targets", TARGETS)
    kwargs.setdefault("in_axes", IN_AXES)
    return lorajax.Spec(variant, **kwargs)


# ----------------------------------------------------------------------------
# Reference formulas for the adapted matrix W' (plain jnp, written here from
# the papers / specs/adapters.md §1, Flax orientation W: [in, out]).
# ----------------------------------------------------------------------------


def _ref_lora(w, a, shared, spec):
    s = spec.alpha / (math.sqrt(spec.rank) if spec.options.get("use_rslora") else spec.rank)
    return w + s * (a["lora_A"] @ a["lora_B"])


def _ref_dora(w, a, shared, spec):
    v = _ref_lora(w, a, shared, spec)
    n = jnp.sqrt(jnp.sum(v * v, axis=0))
    return v * (a["magnitude"] / n)[None, :]


def _ref_vera(w, a, shared, spec):
    d_in, d_out = w.shape
    a_sl = shared["vera_A"][:d_in]
    b_sl = shared["vera_B"][:, :d_out]
    return w + ((a_sl * a["vera_lambda_d"][None, :]) @ b_sl) * a["vera_lambda_b"][None, :]


REFERENCE = {"lora": _ref_lora, "dora": _ref_dora, "vera": _ref_vera,
             "dylora": _ref_lora}  # DyLoRA evaluated at its full rank r is LoRA with s = α/r


def reference_adapted(variant, w, adapter, shared, spec, t):
    """W' for one matrix; a variant without a hand formula here falls back to its own ``adapted``."""
    if variant in REFERENCE:
        return REFERENCE[variant](w, adapter, shared, spec)
    v = registry.get(variant)
    # evaluation context for variants that take one (lorajax.merge's default)
    return call_variant(v, v.adapted, w, {**adapter, **shared}, t)


# ----------------------------------------------------------------------------
# Model and fixtures
# ----------------------------------------------------------------------------


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(20, name="dense_bias")(x)
        h = nn.Dense(12, use_bias=False, name="dense_nobias")(h)
        q = nn.DenseGeneral((2, 3), axis=-1, name="heads")(h)
        o = nn.DenseGeneral(12, axis=(-2, -1), name="merge_heads")(q)
        return nn.Einsum((12, 2, 3), "...d,dhk->...hk", name="einsum")(o)


MODEL = Net()


@functools.lru_cache(maxsize=None)
def base():
    x = jax.random.normal(jax.random.key(0), X_SHAPE)
    variables = MODEL.init(jax.random.key(1), x)
    return variables, x


def kernels(variables) -> dict[str, jax.Array]:
    return {name: variables["params"][name]["kernel"] for name in TARGETS}


def frozen_shapes(variables) -> set[tuple[int, ...]]:
    """Shapes a full-size weight gradient would have: each kernel's own shape and 2-D view, and transposes."""
    out = set()
    for name, k in kernels(variables).items():
        n_in = IN_AXES.get(name, 1)
        mat = (math.prod(k.shape[:n_in]), math.prod(k.shape[n_in:]))
        out |= {tuple(k.shape), tuple(reversed(k.shape)), mat, mat[::-1]}
    return out


def perturb(spec, adapters, seed=0, scale=0.3):
    """Add noise to every trainable leaf (frozen buffers untouched)."""
    trainable, frozen = lorajax.partition(spec, adapters)
    leaves, treedef = jax.tree_util.tree_flatten(trainable)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return lorajax.combine(jax.tree_util.tree_unflatten(treedef, leaves), frozen)


@functools.lru_cache(maxsize=None)
def setup(variant):
    """(spec, variables, x, adapters at init, perturbed adapters)."""
    variables, x = base()
    spec = spec_for(variant)
    adapters = lorajax.init(spec, variables, jax.random.key(2))
    return spec, variables, x, adapters, perturb(spec, adapters)


@functools.lru_cache(maxsize=None)
def forwards(variant):
    spec = setup(variant)[0]
    return {
        mode: jax.jit(lorajax.adapt(MODEL.apply, spec, mode=mode)) for mode in modes(variant)
    }


@functools.lru_cache(maxsize=None)
def cotangent():
    variables, x = base()
    y = MODEL.apply(variables, x)
    return jax.random.normal(jax.random.key(3), y.shape, y.dtype)


def make_loss(spec, mode, frozen, variables, x):
    fwd = lorajax.adapt(MODEL.apply, spec, mode=mode)
    g = cotangent()

    def loss(trainable):
        y = fwd(variables, lorajax.combine(trainable, frozen), x)
        return jnp.sum(y * g)

    return loss


def assert_trees_close(a, b, rtol, atol):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(
            np.asarray(x), np.asarray(y), rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path)
        )


parametrize = pytest.mark.parametrize("variant", VARIANTS)


# ----------------------------------------------------------------------------
# (a) identity at init
# ----------------------------------------------------------------------------


@parametrize
def test_identity_at_init(variant):
    if variant in NOT_IDENTITY_AT_INIT:
        pytest.skip(f"{variant}: the paper does not give an identity at init")
    spec, variables, x, adapters, _ = setup(variant)
    y_base = np.asarray(MODEL.apply(variables, x))
    for mode in modes(variant):
        # eagerly, op by op: bit-exact
        y = np.asarray(lorajax.adapt(MODEL.apply, spec, mode=mode)(variables, adapters, x))
        np.testing.assert_array_equal(y, y_base, err_msg=f"{variant}/{mode}: output changed at init")
        # under jit
        y = np.asarray(forwards(variant)[mode](variables, adapters, x))
        if variant in JIT_IDENTITY_ULPS:
            np.testing.assert_allclose(y, y_base, rtol=1e-6, atol=1e-6, err_msg=f"{variant}/{mode} (jit)")
        else:
            np.testing.assert_array_equal(y, y_base, err_msg=f"{variant}/{mode} (jit): output changed at init")
    if variant in NOT_MERGEABLE:
        with pytest.raises(ValueError, match="cannot be merged"):
            lorajax.merge(spec, variables, adapters)
        return
    merged = lorajax.merge(spec, variables, adapters)
    for name, k in kernels(merged).items():
        np.testing.assert_array_equal(np.asarray(k), np.asarray(kernels(variables)[name]), err_msg=name)


# ----------------------------------------------------------------------------
# (b) factored == merged, and merged == reference formula
# ----------------------------------------------------------------------------


@parametrize
def test_factored_equals_merged(variant):
    spec, variables, x, _, adapters = setup(variant)
    fwds = forwards(variant)
    y_f = np.asarray(fwds["factored"](variables, adapters, x))
    y_base = np.asarray(MODEL.apply(variables, x))
    assert not np.allclose(y_f, y_base, atol=1e-3), "perturbed adapters should change the output"
    if variant in NOT_MERGEABLE:
        with pytest.raises(ValueError, match="cannot be merged"):
            lorajax.adapt(MODEL.apply, spec, mode="merged")
        return
    y_m = np.asarray(fwds["merged"](variables, adapters, x))
    # f32 round-off grows with the outputs' scale (|y| ~ 30 here): an absolute tolerance of a few ulps of it
    np.testing.assert_allclose(y_f, y_m, rtol=1e-5, atol=2e-6 * float(np.abs(y_m).max()))


@parametrize
def test_merged_kernels_match_reference(variant):
    """Each merged N-D kernel is the reference W' of its [in, out] matrix view, reshaped back."""
    if variant in NOT_MERGEABLE:
        pytest.skip(f"{variant} is input-dependent: no merged kernel")
    spec, variables, x, _, adapters = setup(variant)
    merged = lorajax.merge(spec, variables, adapters)
    shared = adapters.get("_shared", {})
    by_name = {t.name: t for t in lorajax.select(spec, variables)}
    for name, k in kernels(variables).items():
        t = by_name[name]
        n_in = IN_AXES.get(name, 1)
        w = k.reshape(math.prod(k.shape[:n_in]), -1)
        want = reference_adapted(variant, w, adapters["params"][name]["kernel"], shared, spec, t)
        got = kernels(merged)[name]
        assert got.shape == k.shape and got.dtype == k.dtype
        np.testing.assert_allclose(np.asarray(got).reshape(w.shape), np.asarray(want), rtol=1e-5, atol=1e-6,
                                   err_msg=name)
    assert np.array_equal(merged["params"]["dense_bias"]["bias"], variables["params"]["dense_bias"]["bias"])


# ----------------------------------------------------------------------------
# (c) adapter gradients equal in both modes
# ----------------------------------------------------------------------------


@parametrize
def test_gradients_equal_in_both_modes(variant):
    spec, variables, x, _, adapters = setup(variant)
    trainable, frozen = lorajax.partition(spec, adapters)
    grads = {
        mode: jax.jit(jax.grad(make_loss(spec, mode, frozen, variables, x)))(trainable)
        for mode in modes(variant)
    }
    # only trainable leaves are differentiated: the gradient tree mirrors `trainable`
    assert jax.tree_util.tree_structure(grads["factored"]) == jax.tree_util.tree_structure(trainable)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree_util.tree_leaves(grads["factored"]))
    if variant in NOT_MERGEABLE:
        return
    assert_trees_close(grads["factored"], grads["merged"], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------
# (d) the base weights get no gradient in factored mode
# ----------------------------------------------------------------------------


def _iter_eqns(jaxpr):
    """All equations of a jaxpr, recursing into sub-jaxprs held in eqn.params (pjit, custom_jvp, scan...)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for p in eqn.params.values():
            for sub in p if isinstance(p, (list, tuple)) else (p,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from _iter_eqns(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from _iter_eqns(sub)


def _full_size_dots(jaxpr, shapes, allow_rank_contraction):
    bad = []
    for eqn in _iter_eqns(jaxpr):
        if eqn.primitive.name != "dot_general":
            continue
        out_shape = tuple(eqn.outvars[0].aval.shape)
        if out_shape not in shapes:
            continue
        (lhs_contract, _), _ = eqn.params["dimension_numbers"]
        lhs_shape = eqn.invars[0].aval.shape
        contracted = tuple(lhs_shape[i] for i in lhs_contract)
        if allow_rank_contraction and contracted == (RANK,):
            continue  # forward A @ B (contracts the rank), not a weight gradient (contracts tokens)
        bad.append((out_shape, contracted))
    return bad


@functools.lru_cache(maxsize=None)
def factored_grad_fn(variant):
    spec, variables, x, _, adapters = setup(variant)
    trainable, frozen = lorajax.partition(spec, adapters)
    return jax.grad(make_loss(spec, "factored", frozen, variables, x)), trainable


@parametrize
def test_no_base_gradient_in_jaxpr(variant):
    variables, _ = base()
    grad_fn, trainable = factored_grad_fn(variant)
    jaxpr = jax.make_jaxpr(grad_fn)(trainable).jaxpr
    shapes = frozen_shapes(variables)
    n_dots = sum(e.primitive.name == "dot_general" for e in _iter_eqns(jaxpr))
    assert n_dots > 0, "the walk found no dot_general at all"
    bad = _full_size_dots(jaxpr, shapes, allow_rank_contraction=variant in FORWARD_FULL_PRODUCT)
    assert not bad, f"{variant}: full-size weight products in the gradient graph: {bad}"


def test_jaxpr_check_detects_a_weight_gradient():
    """The checker is not vacuous: differentiating the kernels themselves is caught."""
    variables, x = base()
    g = cotangent()
    jaxpr = jax.make_jaxpr(jax.grad(lambda v: jnp.sum(MODEL.apply(v, x) * g)))(variables).jaxpr
    bad = _full_size_dots(jaxpr, frozen_shapes(variables), allow_rank_contraction=True)
    assert {(12, 20), (20, 12)} <= {shape for shape, _ in bad}


#: tokens of the test input: a weight gradient x^T dy contracts over all of them
TOKENS = math.prod(X_SHAPE[:-1])


def _hlo_weight_gradients(text, variables):
    """Lines of the compiled HLO's products that are weight gradients (`lorajax.hlo`): a frozen kernel's shape
    (any order of its axes or of its 2-D view's) and a contraction over at least the input's tokens. A
    weight-shaped product contracting over the rank (DoRA's detached A @ B) is not one."""
    assert hlo.dot_products(text), "no matrix product found in the compiled HLO: the parser no longer fits XLA's text"
    shapes = {p for s in frozen_shapes(variables) for p in itertools.permutations(s)}
    return [p.line for p in hlo.weight_gradients(text, shapes, TOKENS)]


def test_hlo_check_detects_a_weight_gradient():
    """The HLO check is not vacuous: differentiating the kernels, or the base next to the adapters in the
    factored mode, forms [in, out] products contracting over the tokens, and they are flagged."""
    variables, x = base()
    g = cotangent()
    text = jax.jit(jax.grad(lambda v: jnp.sum(MODEL.apply(v, x) * g))).lower(variables).compile().as_text()
    flagged = _hlo_weight_gradients(text, variables)
    assert len(flagged) == len(TARGETS), flagged  # one per kernel
    # the factored LoRA step, differentiated with respect to the base kernels as well
    spec, _, _, _, adapters = setup("lora")
    trainable, frozen = lorajax.partition(spec, adapters)
    fwd = lorajax.adapt(MODEL.apply, spec, mode="factored")
    both = jax.grad(lambda v, tr: jnp.sum(fwd(v, lorajax.combine(tr, frozen), x) * g), argnums=(0, 1))
    bad = _hlo_weight_gradients(jax.jit(both).lower(variables, trainable).compile().as_text(), variables)
    assert len(bad) == len(TARGETS), bad


@parametrize
def test_no_base_gradient_in_hlo(variant):
    variables, _ = base()
    grad_fn, trainable = factored_grad_fn(variant)
    bad = _hlo_weight_gradients(jax.jit(grad_fn).lower(trainable).compile().as_text(), variables)
    assert not bad, f"{variant}: weight gradients in compiled HLO:\n" + "\n".join(bad)


# ----------------------------------------------------------------------------
# (e) jit does not recompile for new adapter values
# ----------------------------------------------------------------------------


@parametrize
@pytest.mark.parametrize("mode", ["factored", "merged"])
def test_jit_does_not_recompile(variant, mode):
    if mode not in modes(variant):
        pytest.skip(f"{variant} is input-dependent: factored mode only")
    spec, variables, x, adapters0, adapters1 = setup(variant)
    fwd = lorajax.adapt(MODEL.apply, spec, mode=mode)
    traces = [0]

    @jax.jit
    def step(adapters):
        traces[0] += 1
        return fwd(variables, adapters, x)

    y0 = step(adapters0)
    y1 = step(adapters1)
    y2 = step(perturb(spec, adapters0, seed=7))
    assert traces[0] == 1, f"{variant}/{mode}: traced {traces[0]} times"
    assert not np.allclose(np.asarray(y0), np.asarray(y1))
    assert not np.allclose(np.asarray(y1), np.asarray(y2))


# ----------------------------------------------------------------------------
# (f) dtype kept
# ----------------------------------------------------------------------------


@parametrize
def test_bf16_params_give_bf16_outputs(variant):
    variables, x = base()
    spec = spec_for(variant)
    params16 = jax.tree_util.tree_map(lambda p: p.astype(jnp.bfloat16), variables)
    x16 = x.astype(jnp.bfloat16)
    adapters = perturb(spec, lorajax.init(spec, params16, jax.random.key(2)))
    if variant not in NOT_MERGEABLE:
        merged = lorajax.merge(spec, params16, adapters)
        assert all(p.dtype == jnp.bfloat16 for p in jax.tree_util.tree_leaves(merged))
    outs = {}
    for mode in modes(variant):
        y = lorajax.adapt(MODEL.apply, spec, mode=mode)(params16, adapters, x16)
        assert y.dtype == jnp.bfloat16, f"{variant}/{mode}: {y.dtype}"
        assert bool(jnp.all(jnp.isfinite(y)))
        outs[mode] = np.asarray(y.astype(jnp.float32))
    if variant in NOT_MERGEABLE:
        return
    scale = np.abs(outs["merged"]).max()
    np.testing.assert_allclose(outs["factored"], outs["merged"], atol=0.05 * scale)


# ----------------------------------------------------------------------------
# (g) bad rank
# ----------------------------------------------------------------------------


@parametrize
def test_bad_rank_raises_naming_the_module(variant):
    variables, _ = base()
    if not registry.get(variant).rank_limited:
        # rank may exceed min(in, out) (e.g. VeRA's shared projections): it must work
        spec = spec_for(variant, rank=13)
        adapters = perturb(spec, lorajax.init(spec, variables, jax.random.key(0)))
        merged = lorajax.merge(spec, variables, adapters)
        assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree_util.tree_leaves(merged))
        return
    # rank 13 > min(12, 20): the first target in pytree order is dense_bias
    with pytest.raises(ValueError, match="dense_bias"):
        lorajax.init(spec_for(variant, rank=13), variables, jax.random.key(0))
    # only merge_heads (viewed as [6, 12]) is too small for rank 7
    with pytest.raises(ValueError, match="merge_heads"):
        lorajax.init(spec_for(variant, rank=4, rank_pattern={"merge_heads": 7}), variables, jax.random.key(0))
    with pytest.raises(ValueError, match="rank"):
        spec_for(variant, rank=0)


# ----------------------------------------------------------------------------
# (h) merge then unmerge
# ----------------------------------------------------------------------------


@parametrize
def test_merge_unmerge_roundtrip(variant):
    spec, variables, x, _, adapters = setup(variant)
    if variant in NOT_MERGEABLE:
        with pytest.raises(ValueError, match="cannot be merged"):
            lorajax.merge(spec, variables, adapters)
        return
    merged = lorajax.merge(spec, variables, adapters)
    if registry.get(variant).unadapted is None:
        with pytest.raises(NotImplementedError):
            lorajax.unmerge(spec, merged, adapters)
        return
    restored = lorajax.unmerge(spec, merged, adapters)
    assert_trees_close(restored, variables, rtol=1e-5, atol=1e-5)


def test_dora_has_no_unmerge():
    """Pinned: DoRA's merge is not inverted (the norm would have to be cached)."""
    assert registry.get("dora").unadapted is None
    assert registry.get("lora").unadapted is not None and registry.get("vera").unadapted is not None


# ----------------------------------------------------------------------------
# (i) NNX through nnx.split / nnx.merge
# ----------------------------------------------------------------------------


class NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.inp = nnx.Linear(6, 10, rngs=rngs)
        self.layers = nnx.List([nnx.Linear(10, 8, use_bias=False, rngs=rngs)])

    def __call__(self, x):
        return self.layers[0](jax.nn.relu(self.inp(x)))


@parametrize
def test_nnx_merged_mode(variant):
    if variant in NOT_MERGEABLE:
        pytest.skip(f"{variant} is input-dependent: factored mode only (linen)")
    graphdef, state = nnx.split(NnxNet(nnx.Rngs(0)))
    spec = lorajax.Spec(variant, **{**DEFAULT_SPEC_KWARGS, **SPEC_KWARGS.get(variant, {})},
                        targets=["inp", "layers.0"])
    adapters = perturb(spec, lorajax.init(spec, state, jax.random.key(1)))
    before = jax.tree_util.tree_map(np.asarray, state)
    x = jax.random.normal(jax.random.key(2), (3, 6))

    fwd = jax.jit(lorajax.adapt(lambda st, xx: nnx.merge(graphdef, st)(xx), spec, mode="merged"))
    y = fwd(state, adapters, x)

    shared = adapters.get("_shared", {})
    by_name = {t.name: t for t in lorajax.select(spec, state)}
    w1 = state["inp"]["kernel"][...]
    b1 = state["inp"]["bias"][...]
    w2 = state["layers"][0]["kernel"][...]
    w1p = reference_adapted(variant, w1, adapters["inp"]["kernel"], shared, spec, by_name["inp"])
    w2p = reference_adapted(variant, w2, adapters["layers"]["0"]["kernel"], shared, spec, by_name["layers.0"])
    h = jax.nn.relu(x @ w1p + b1[None, :])
    want = h @ w2p
    np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-5, atol=1e-5)
    y_base = nnx.merge(graphdef, state)(x)
    assert not np.allclose(np.asarray(y), np.asarray(y_base), atol=1e-3)
    # the State was not mutated
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), state, before)


# ----------------------------------------------------------------------------
# (k) the declared trainable count equals what init makes
# ----------------------------------------------------------------------------


@parametrize
def test_trainable_count_formula(variant):
    spec, variables, _, adapters, _ = setup(variant)
    v = registry.get(variant)
    assert v.trainable_count is not None, f"{variant} declares no trainable_count"
    selected = lorajax.targets.select(spec, variables)
    assert v.trainable_count(selected) == lorajax.count_params(spec, variables, adapters)["trainable"]


# ----------------------------------------------------------------------------
# (l) NNX factored mode (lorajax.nnx_adapt): the same checks on an NNX model
# ----------------------------------------------------------------------------


class NnxMixedNet(nnx.Module):
    """`Net` in NNX: nnx.Linear (with and without bias), nnx.LinearGeneral (1 and 2 input axes), nnx.Einsum."""

    def __init__(self, rngs):
        self.dense_bias = nnx.Linear(12, 20, rngs=rngs)
        self.dense_nobias = nnx.Linear(20, 12, use_bias=False, rngs=rngs)
        self.heads = nnx.LinearGeneral(12, (2, 3), axis=-1, rngs=rngs)
        self.merge_heads = nnx.LinearGeneral((2, 3), 12, axis=(-2, -1), rngs=rngs)
        self.einsum = nnx.Einsum("...d,dhk->...hk", (12, 2, 3), (2, 3), rngs=rngs)

    def __call__(self, x):
        return self.einsum(self.merge_heads(self.heads(self.dense_nobias(self.dense_bias(x)))))


@functools.lru_cache(maxsize=None)
def nnx_base():
    """(graphdef, state holding `base()`'s linen weights, apply_fn): NNX and linen runs are comparable."""
    variables, _ = base()
    graphdef, state = nnx.split(NnxMixedNet(nnx.Rngs(0)))
    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map(jnp.asarray, dict(variables["params"])))
    return graphdef, state, lambda st, xx: nnx.merge(graphdef, st)(xx)


def nnx_setup(variant):
    """(spec, state, x, adapters at init, perturbed adapters): `setup`'s adapters, which fit the State as they are
    (per-target keys leave the "params" collection out, so `lorajax.init` on the State makes the same ones)."""
    spec, _, x, adapters, perturbed = setup(variant)
    return spec, nnx_base()[1], x, adapters, perturbed


#: DyLoRA samples its rank in training: run both modes in training with one step key
NNX_TRAIN = dict(adapter_rng=jax.random.key(5), adapter_train=True)


@functools.lru_cache(maxsize=None)
def nnx_compiled(variant, mode):
    """(jaxpr, compiled) of ``trainable -> (output, adapter gradients)``: one compile per variant and mode."""
    spec, state, x, _, adapters = nnx_setup(variant)
    trainable, frozen = lorajax.partition(spec, adapters)
    fwd = lorajax.adapt(nnx_base()[2], spec, mode=mode)
    g = cotangent()

    def out_and_grads(tr):
        def loss(tr):
            y = fwd(state, lorajax.combine(tr, frozen), x, **NNX_TRAIN)
            return jnp.sum(y * g), y

        grads, y = jax.grad(loss, has_aux=True)(tr)
        return y, grads

    traced = jax.jit(out_and_grads).trace(trainable)
    return traced.jaxpr.jaxpr, traced.lower().compile()


@parametrize
def test_nnx_factored_identity_at_init(variant):
    """As (a), through the compiled step of the tests below called with the adapters at init.

    That program also holds the backward pass, so XLA may order the base matmul's sums differently from the
    eager layer: equal up to a few f32 ulps (a non-identity would show at ~1e-3).
    """
    if variant in NOT_IDENTITY_AT_INIT:
        pytest.skip(f"{variant}: the paper does not give an identity at init")
    spec, state, x, adapters, _ = nnx_setup(variant)
    y, _ = nnx_compiled(variant, "factored")[1](lorajax.partition(spec, adapters)[0])
    y_base = np.asarray(MODEL.apply(base()[0], x))  # the same weights in linen, eagerly
    np.testing.assert_array_equal(np.asarray(nnx_base()[2](state, x)), y_base)
    np.testing.assert_allclose(np.asarray(y), y_base, rtol=1e-6, atol=1e-6, err_msg=f"{variant}: changed at init")
    assert not any(hasattr(cls.__call__, "__lorajax_original__") for cls in (nnx.Linear, nnx.LinearGeneral, nnx.Einsum))


@parametrize
def test_nnx_factored_equals_merged_and_gradients(variant):
    spec, state, x, _, adapters = nnx_setup(variant)
    trainable, _ = lorajax.partition(spec, adapters)
    y_f, g_f = nnx_compiled(variant, "factored")[1](trainable)
    assert not np.allclose(np.asarray(y_f), np.asarray(nnx_base()[2](state, x)), atol=1e-3)
    assert jax.tree_util.tree_structure(g_f) == jax.tree_util.tree_structure(trainable)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree_util.tree_leaves(g_f))
    if variant in NOT_MERGEABLE:
        # no merged mode: the NNX layers must match linen's factored mode on the same weights, statistics included
        variables = base()[0]
        y_l, aux_l = lorajax.adapt(MODEL.apply, spec)(variables, adapters, x, adapter_aux=True, **NNX_TRAIN)
        y_n, aux_n = lorajax.adapt(nnx_base()[2], spec)(state, adapters, x, adapter_aux=True, **NNX_TRAIN)
        np.testing.assert_allclose(np.asarray(y_n), np.asarray(y_l), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(y_f), np.asarray(y_l), rtol=1e-5, atol=2e-6 * float(np.abs(y_l).max()))
        aux_l = aux_l.get("params", aux_l)
        assert set(aux_n) == set(aux_l) == (set(TARGETS) if registry.get(variant).update else set())
        assert_trees_close(aux_n, aux_l, rtol=0, atol=0)
        return
    y_m, g_m = nnx_compiled(variant, "merged")[1](trainable)
    np.testing.assert_allclose(np.asarray(y_f), np.asarray(y_m), rtol=1e-5, atol=2e-6 * float(np.abs(y_m).max()))
    # as (c), with atol growing with each leaf's scale: in training DyLoRA's sampled rank b < r scales by α/b
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g_f)[0], jax.tree_util.tree_leaves(g_m)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                                   atol=1e-5 * max(1.0, float(jnp.abs(b).max())), err_msg=jax.tree_util.keystr(path))


@parametrize
def test_nnx_no_base_gradient(variant):
    """As (d) for linen: no full-size weight product in the jaxpr or the compiled HLO of the NNX factored step."""
    variables, _ = base()
    jaxpr, compiled = nnx_compiled(variant, "factored")
    bad = _full_size_dots(jaxpr, frozen_shapes(variables), allow_rank_contraction=variant in FORWARD_FULL_PRODUCT)
    assert not bad, f"{variant}: full-size weight products in the gradient graph: {bad}"
    bad = _hlo_weight_gradients(compiled.as_text(), variables)
    assert not bad, f"{variant}: weight gradients in compiled HLO:\n" + "\n".join(bad)


def test_nnx_factored_list_paths_bf16_and_errors():
    """Integer path keys (nnx.List), no retrace for new adapters, bf16 kept, clear errors, classes restored."""
    graphdef, state = nnx.split(NnxNet(nnx.Rngs(0)))
    apply_fn = lambda st, xx: nnx.merge(graphdef, st)(xx)  # noqa: E731
    spec = lorajax.Spec("lora", rank=4, alpha=8.0, targets=["inp", "layers.0"], init_weights=False)
    adapters = lorajax.init(spec, state, jax.random.key(1))
    x = jax.random.normal(jax.random.key(2), (3, 6))
    fwd_f, fwd_m = (lorajax.adapt(apply_fn, spec, mode=mode) for mode in ("factored", "merged"))

    traces = [0]

    @jax.jit
    def run(st, a, xx):
        traces[0] += 1
        st16 = jax.tree_util.tree_map(lambda p: p.astype(jnp.bfloat16), st)
        return fwd_f(st, a, xx), fwd_m(st, a, xx), fwd_f(st16, a, xx.astype(jnp.bfloat16))

    y_f, y_m, y16 = run(state, adapters, x)
    y_f2 = run(state, jax.tree_util.tree_map(lambda p: p + 0.1, adapters), x)[0]
    assert traces[0] == 1 and not np.allclose(np.asarray(y_f), np.asarray(y_f2)), "new adapter values retraced"
    assert not np.allclose(np.asarray(y_m), np.asarray(apply_fn(state, x)), atol=1e-3)
    np.testing.assert_allclose(np.asarray(y_f), np.asarray(y_m), rtol=1e-5, atol=1e-5)
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y16, np.float32), np.asarray(y_m), atol=0.05 * float(np.abs(y_m).max()))

    def tied(st, xx):  # reads an adapted kernel outside the layer's call
        model = nnx.merge(graphdef, st)
        return model.inp(xx) @ model.layers[0].kernel[...].T

    with pytest.raises(TypeError, match="layers.0: the adapted kernel was read as an array"):
        lorajax.adapt(tied, spec, mode="factored")(state, adapters, x)
    assert not hasattr(nnx.Linear.__call__, "__lorajax_original__")
    with pytest.raises(ValueError, match="reached none.*nnx.Linear"):
        lorajax.adapt(lambda st, xx: xx, spec, mode="factored")(state, adapters, x)
