"""GaLore (specs/optim.md §3): target selection, state size = formula, projection semantics, errors.

Parity with the official galore-torch is in tests/parity/test_galore_torch.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax.contrib import GaLoreDimensionNumbers

import lorajax
from lorajax.optim import galore, state_bytes
from lorajax.optim.galore import galore_dimension_numbers, galore_mask, galore_state_formula, galore_targets


def _params(dtype=jnp.float32):
    k = iter(jax.random.split(jax.random.key(0), 16))
    n = lambda *s: jax.random.normal(next(k), s, dtype)  # noqa: E731
    return {
        "embed": {"embedding": n(20, 8)},
        "layers_0": {"q": {"kernel": n(8, 6)}, "k": {"kernel": n(8, 6)}, "o": {"kernel": n(6, 8), "bias": n(8)},
                     "attn": {"kernel": n(8, 2, 3)}},
        "layers_1": {"q": {"kernel": n(8, 6)}, "k": {"kernel": n(8, 6)}, "o": {"kernel": n(6, 8), "bias": n(8)},
                     "attn": {"kernel": n(8, 2, 3)}},
        "lm_head": {"kernel": n(8, 20)},
        "norm": {"scale": n(8)},
    }


def _grads(params, seed=1):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def _flat(tree):
    leaf = lambda x: x is None or isinstance(x, GaLoreDimensionNumbers)  # noqa: E731
    return {"/".join(lorajax.targets.key_names(p)): x
            for p, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=leaf)[0]}


# --- target selection ---------------------------------------------------------------------------------------------

def test_selection_grammar():
    params = _params()
    names = lambda **kw: sorted(t.name for t in galore_targets(params, rank=2, **kw))  # noqa: E731
    # all-linear: every 2-D kernel but the head; the 3-D attn kernel, embeddings, norms, biases are not kernels/2-D
    assert names() == ["layers_0.k", "layers_0.o", "layers_0.q", "layers_1.k", "layers_1.o", "layers_1.q"]
    assert names(targets=["q"]) == ["layers_0.q", "layers_1.q"]
    assert names(targets=r"layers_\d\.(q|k)") == ["layers_0.k", "layers_0.q", "layers_1.k", "layers_1.q"]
    assert names(targets=["q", "k"], exclude=["k"]) == ["layers_0.q", "layers_1.q"]
    assert names(targets=["q", "o"], layers_to_transform=[1]) == ["layers_1.o", "layers_1.q"]
    # a Spec's selection (not its rank) and a Target list from lorajax.select
    spec = lorajax.Spec("lora", rank=6, targets=["q", "lm_head"])
    assert names(targets=spec) == ["layers_0.q", "layers_1.q", "lm_head"]
    assert names(targets=lorajax.select(spec, params)) == ["layers_0.q", "layers_1.q", "lm_head"]


def test_mask_and_which_leaves_get_plain_adam():
    """Targeted kernels get GaLore; every other leaf gets exactly optax's Adam (bitwise)."""
    params = _params()
    mask = _flat(galore_mask(params, ["q", "o"], rank=2))
    assert {k for k, v in mask.items() if v} == {"layers_0/q/kernel", "layers_0/o/kernel",
                                                 "layers_1/q/kernel", "layers_1/o/kernel"}
    tx = galore(1e-2, targets=["q", "o"], rank=2, update_proj_gap=2)
    adam = optax.adam(1e-2)
    s, sa, p = tx.init(params), adam.init(params), params
    for step in range(3):
        g = _grads(params, seed=step)
        u, s = tx.update(g, s, p)
        ua, sa = adam.update(g, sa, p)
        fu, fa = _flat(u), _flat(ua)
        for k, on in mask.items():
            if on:
                assert not np.allclose(fu[k], fa[k], rtol=1e-3), k
            else:
                np.testing.assert_array_equal(fu[k], fa[k], err_msg=k)


def test_dimension_numbers_and_in_axes():
    params = _params()
    dims = _flat(galore_dimension_numbers(params, ["q", "attn"], rank=2))
    assert dims["layers_0/q/kernel"] == GaLoreDimensionNumbers((0,), (1,))
    assert dims["layers_0/attn/kernel"] == GaLoreDimensionNumbers((0,), (1, 2))
    assert dims["embed/embedding"] is None and dims["layers_0/k/kernel"] is None
    dims = _flat(galore_dimension_numbers(params, ["attn"], rank=2, in_axes={"attn": 2}))
    assert dims["layers_1/attn/kernel"] == GaLoreDimensionNumbers((0, 1), (2,))


@pytest.mark.parametrize("in_axes", [1, 2])
def test_nd_kernel_is_galore_on_its_matrix_view(in_axes):
    """An [8, 2, 3] kernel with in_axes=k is GaLore on its (prod(in) x prod(out)) reshape, step for step."""
    w = jax.random.normal(jax.random.key(0), (8, 2, 3))
    a = int(np.prod(w.shape[:in_axes]))
    nd = galore(1e-2, targets=["attn"], rank=2, update_proj_gap=2, in_axes=in_axes)
    flat = galore(1e-2, targets=["attn"], rank=2, update_proj_gap=2)
    p_nd, p_2d = {"attn": {"kernel": w}}, {"attn": {"kernel": w.reshape(a, -1)}}
    s_nd, s_2d = nd.init(p_nd), flat.init(p_2d)
    assert s_nd[0].projector["attn"]["kernel"].shape == (max(a, 48 // a), 2)
    for step in range(4):
        g = jax.random.normal(jax.random.key(10 + step), w.shape)
        u_nd, s_nd = nd.update({"attn": {"kernel": g}}, s_nd, p_nd)
        u_2d, s_2d = flat.update({"attn": {"kernel": g.reshape(a, -1)}}, s_2d, p_2d)
        np.testing.assert_allclose(u_nd["attn"]["kernel"].reshape(a, -1), u_2d["attn"]["kernel"], rtol=1e-5, atol=1e-8)


# --- state: shapes and size ---------------------------------------------------------------------------------------

def test_state_shapes_follow_optax_side():
    params = _params()
    state = galore(1e-2, targets=["q", "o", "attn"], rank=3, in_axes=1).init(params)[0]
    proj, mu = state.projector, state.base_optimizer_state.mu
    assert proj["layers_0"]["q"]["kernel"].shape == (8, 3) and mu["layers_0"]["q"]["kernel"].shape == (3, 6)  # 8x6
    assert proj["layers_0"]["o"]["kernel"].shape == (8, 3) and mu["layers_0"]["o"]["kernel"].shape == (6, 3)  # 6x8
    assert proj["layers_0"]["attn"]["kernel"].shape == (8, 3) and mu["layers_0"]["attn"]["kernel"].shape == (3, 6)
    assert proj["embed"]["embedding"].shape == (0, 0) and mu["embed"]["embedding"].shape == (20, 8)


@pytest.mark.parametrize("case", ["default", "schedule", "bf16_mu", "bf16_params", "variables", "nd_in_axes"])
def test_state_bytes_equals_formula(case):
    params, lr, kw, tkw = _params(), 1e-2, {}, dict(targets=["q", "o", "lm_head"], rank=4)
    if case == "schedule":
        lr = optax.linear_schedule(1e-2, 0.0, 10)
    if case == "bf16_mu":
        kw["mu_dtype"] = jnp.bfloat16
    if case == "bf16_params":
        params = _params(jnp.bfloat16)
    if case == "variables":
        params = {"params": params}
    if case == "nd_in_axes":
        tkw = dict(targets=["attn", "q"], rank=2, in_axes={"attn": 2})
    tx = galore(lr, **tkw, **kw)
    exact = state_bytes(tx, params)
    formula = galore_state_formula(params, **tkw, mu_dtype=kw.get("mu_dtype"), schedule=callable(lr))
    assert exact == formula.total
    # eval_shape: ShapeDtypeStructs work and nothing is allocated
    assert state_bytes(tx, jax.eval_shape(lambda: params)) == exact


def test_state_bytes_of_plain_adam_and_formula_parts():
    params = _params()
    n = sum(x.size for x in jax.tree.leaves(params))
    assert state_bytes(optax.adam(1e-3), params) == 2 * 4 * n + 4
    f = galore_state_formula(params, ["q"], rank=4)
    assert f.projector == 2 * 8 * 4 * 4 and f.low_rank_moments == 2 * 2 * 6 * 4 * 4
    assert f.full_moments == 2 * 4 * (n - 2 * 48) and f.scalars == 8
    std = galore_state_formula(params, ["q"], rank=4, side="official-std")
    assert std.projector == 2 * 6 * 4 * 4 and std.low_rank_moments == 2 * 2 * 8 * 4 * 4


# --- projection semantics -------------------------------------------------------------------------------------------

def _trunc(g, r):
    u, s, vh = np.linalg.svd(np.asarray(g, np.float64), full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


@pytest.mark.parametrize("shape", [(12, 7), (7, 12)])
def test_gap_one_sgd_is_truncated_gradient(shape):
    """T = 1, identity base: update = −lr·scale·trunc_r(G) at every step (specs §3.5 test 1)."""
    p = {"w": {"kernel": jnp.zeros(shape)}}
    tx = galore(0.1, targets=["w"], rank=3, update_proj_gap=1, scale=0.5, base_optimizer=optax.identity())
    s = tx.init(p)
    for step in range(3):
        g = jax.random.normal(jax.random.key(step), shape)
        u, s = tx.update({"w": {"kernel": g}}, s, p)
        np.testing.assert_allclose(u["w"]["kernel"], -0.05 * _trunc(g, 3), rtol=1e-4, atol=1e-6)


def test_projector_refreshes_every_gap():
    """Refresh at counts 0, T, 2T; unchanged in between (specs §3.5 test 4)."""
    p = {"w": {"kernel": jnp.zeros((10, 6))}}
    tx = galore(0.1, targets=["w"], rank=2, update_proj_gap=3)
    s, projs = tx.init(p), []
    for step in range(7):
        _, s = tx.update({"w": {"kernel": jax.random.normal(jax.random.key(step), (10, 6))}}, s, p)
        projs.append(np.asarray(s[0].projector["w"]["kernel"]))
    changed = [i for i in range(1, 7) if not np.array_equal(projs[i], projs[i - 1])]
    assert changed == [3, 6]


def test_full_rank_sgd_is_sgd():
    """rank = min(a, b): SGD exactly for a square kernel at any T, and for any shape at T = 1 (U Uᵀ G = G)."""
    cases = [((6, 6), 4), ((9, 5), 1), ((5, 9), 1)]
    for shape, gap in cases:
        p = {"w": {"kernel": jnp.zeros(shape)}}
        tx = galore(0.1, targets=["w"], rank=min(shape), update_proj_gap=gap, base_optimizer=optax.identity())
        s = tx.init(p)
        for step in range(5):
            g = jax.random.normal(jax.random.key(step), shape)
            u, s = tx.update({"w": {"kernel": g}}, s, p)
            np.testing.assert_allclose(u["w"]["kernel"], -0.1 * g, rtol=1e-4, atol=1e-6, err_msg=str(shape))


def test_full_rank_adam_is_adam_in_a_rotated_basis_not_adam():
    """rank = n on an n x n kernel: U·Adam(Uᵀ G_t) with U from G_0's SVD.

    Adam is not rotation-invariant, so this is not Adam.
    """
    n, gap = 6, 100
    p = {"w": {"kernel": jnp.zeros((n, n))}}
    tx = galore(0.1, targets=["w"], rank=n, update_proj_gap=gap)
    ref, adam = optax.scale_by_adam(), optax.adam(0.1)
    s, sr, sa = tx.init(p), None, adam.init(p)
    for step in range(4):
        g = jax.random.normal(jax.random.key(step), (n, n))
        u, s = tx.update({"w": {"kernel": g}}, s, p)
        if step == 0:
            basis = jnp.linalg.svd(g)[0]
            sr = ref.init(g)
        ur, sr = ref.update(basis.T @ g, sr)
        np.testing.assert_allclose(u["w"]["kernel"], -0.1 * (basis @ ur), rtol=1e-4, atol=1e-6)
        ua, sa = adam.update({"w": {"kernel": g}}, sa, p)
        assert not np.allclose(u["w"]["kernel"], ua["w"]["kernel"], rtol=1e-2)


def test_jit_and_scale_only_on_galore_leaves():
    params = _params()
    g = _grads(params)
    a, b = galore(1e-2, targets=["q"], rank=2, scale=1.0), galore(1e-2, targets=["q"], rank=2, scale=0.25)
    ua, _ = jax.jit(a.update)(g, a.init(params), params)
    ub, _ = jax.jit(b.update)(g, b.init(params), params)
    np.testing.assert_allclose(ub["layers_0"]["q"]["kernel"], 0.25 * ua["layers_0"]["q"]["kernel"], rtol=1e-6)
    np.testing.assert_array_equal(ub["layers_0"]["k"]["kernel"], ua["layers_0"]["k"]["kernel"])


# --- bad input -----------------------------------------------------------------------------------------------------

def test_rank_too_large_names_the_path():
    params = _params()
    with pytest.raises(ValueError, match=r"rank 7 .* min\(in, out\) = 6 .*layers_0\.q.*layers_0/q/kernel"):
        galore(1e-2, targets=["q"], rank=7, params=params)
    tx = galore(1e-2, targets=["q"], rank=7)  # without params: raised by init
    with pytest.raises(ValueError, match="layers_0/q/kernel"):
        tx.init(params)
    galore(1e-2, targets=["attn"], rank=4, params=params)  # [8, 2, 3] as 8x6 fits rank 4; as 16x3 (in_axes=2) it does not
    with pytest.raises(ValueError, match=r"min\(in, out\) = 3 .*layers_0\.attn.*viewed as 16x3 with in_axes=2"):
        galore(1e-2, targets=["attn"], rank=4, in_axes=2, params=params)


def test_target_matching_nothing():
    params = _params()
    with pytest.raises(ValueError, match="'v_proj' matches no weight"):
        galore(1e-2, targets=["q", "v_proj"], params=params, rank=2)
    with pytest.raises(ValueError, match="selects no weight"):
        galore(1e-2, targets=r"nothing\..*", params=params, rank=2)
    with pytest.raises(ValueError, match="selects no weight"):
        galore(1e-2, targets=["q"], exclude=["q"], params=params, rank=2)
    stale = lorajax.select(lorajax.Spec("lora", rank=2, targets=["q"]), {"q": {"kernel": jnp.ones((4, 4))}})
    with pytest.raises(ValueError, match="not a leaf of params"):
        galore(1e-2, targets=stale, params=params, rank=2)


def test_bad_hyper_parameters():
    for kw, msg in [(dict(rank=0), "rank"), (dict(rank=2.0), "rank"), (dict(rank=True), "rank"),
                    (dict(rank=2, update_proj_gap=0), "update_proj_gap"), (dict(rank=2, scale=float("nan")), "scale")]:
        with pytest.raises(ValueError, match=msg):
            galore(1e-2, targets=["q"], **kw)
    with pytest.raises(ValueError, match="side"):
        galore_state_formula(_params(), ["q"], rank=2, side="torch")
    with pytest.raises(ValueError, match="already fixes the selection"):
        galore_targets(_params(), lorajax.Spec("lora", targets=["q"]), rank=2, exclude=["k"])
