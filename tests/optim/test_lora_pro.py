"""LoRA-Pro (specs/optim.md §1.7): projection identity, least-squares optimality, Sylvester X,
full-mode AdamW vs a numpy re-implementation of the official equations (PyTorch layout), quirks,
bad input, non-finite steps, jit and partitioned / composite trees."""

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
import scipy.linalg

import lorajax
from lorajax.optim import lora_pro, scale_by_lora_pro
from lorajax.optim.lora_pro import (adjust_lora_gradients, adjusted_gradients, equivalent_gradient, lora_gradients,
                                    lora_pro_projection, optimal_x, solve_sylvester)

RNG = np.random.default_rng(0)


def rand(*shape, rng=RNG):
    return rng.standard_normal(shape)


def instance(n_in=7, r=3, n_out=5, s=2.0, seed=0):
    """Random A [in, r], B [r, out], G [in, out] and LoRA's gradients by autodiff of <G, W0 + s A B>."""
    rng = np.random.default_rng(seed)
    A, B, G = (jnp.asarray(rng.standard_normal(sh)) for sh in ((n_in, r), (r, n_out), (n_in, n_out)))
    g_A, g_B = jax.grad(lambda a, b: jnp.sum(G * (s * a @ b)), argnums=(0, 1))(A, B)
    return A, B, G, g_A, g_B


# --------------------------------------------------------------------------- pure maths (float64)

def test_lora_gradients_match_autodiff():
    with jax.enable_x64(True):
        A, B, G, g_A, g_B = instance()
        ga, gb = lora_gradients(A, B, G, 2.0)
        np.testing.assert_allclose(ga, g_A, rtol=1e-12)
        np.testing.assert_allclose(gb, g_B, rtol=1e-12)


@pytest.mark.parametrize("x", ["zero", "sylvester", "symmetry", "random"])
def test_equivalent_gradient_is_projection_for_any_x(x):
    with jax.enable_x64(True):
        s = 2.0
        A, B, G, g_A, g_B = instance(s=s)
        x = jnp.asarray(rand(3, 3)) if x == "random" else x
        ga, gb = adjusted_gradients(A, B, (g_A, g_B), s, x=x, delta=0.0)
        eq = equivalent_gradient(A, B, ga, gb, s)
        # G P_B + P_A G (I − P_B) with explicit projectors (Flax orientation)
        PB = B.T @ np.linalg.inv(B @ B.T) @ B
        PA = A @ np.linalg.inv(A.T @ A) @ A.T
        want = G @ PB + PA @ G @ (np.eye(5) - PB)
        np.testing.assert_allclose(eq, want, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(lora_pro_projection(A, B, G), want, rtol=1e-10, atol=1e-10)
        # a full gradient in place of (g_A, g_B) gives the same
        ga2, gb2 = adjusted_gradients(A, B, G, s, x=x, delta=0.0)
        np.testing.assert_allclose(ga2, ga, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(gb2, gb, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dims", [(6, 2, 5), (4, 3, 8), (9, 1, 3)])
def test_least_squares_optimal(dims):
    """‖s(g̃_A B + A g̃_B) − G‖ equals the optimum of the vectorised least-squares problem."""
    n_in, r, n_out = dims
    with jax.enable_x64(True):
        s = 1.5
        A, B, G, g_A, g_B = instance(n_in, r, n_out, s=s, seed=sum(dims))
        ga, gb = adjusted_gradients(A, B, (g_A, g_B), s, delta=0.0)
        res_pro = np.linalg.norm(np.asarray(equivalent_gradient(A, B, ga, gb, s) - G))
        # columns: the linear map (a, b) -> s(a B + A b), a: [in, r], b: [r, out], vec row-major
        cols = []
        for i in range(n_in * r):
            a = np.zeros(n_in * r)
            a[i] = 1
            cols.append((s * a.reshape(n_in, r) @ np.asarray(B)).ravel())
        for i in range(r * n_out):
            b = np.zeros(r * n_out)
            b[i] = 1
            cols.append((s * np.asarray(A) @ b.reshape(r, n_out)).ravel())
        M = jnp.asarray(np.stack(cols, axis=1))
        z = jnp.linalg.lstsq(M, G.ravel())[0]
        res_ls = float(jnp.linalg.norm(M @ z - G.ravel()))
        np.testing.assert_allclose(res_pro, res_ls, rtol=1e-9)
        # and plain LoRA's gradients do worse
        res_lora = np.linalg.norm(np.asarray(equivalent_gradient(A, B, g_A, g_B, s) / s**2 - G))
        assert res_pro <= res_lora


def test_sylvester_x_solves_its_equation_and_is_optimal():
    with jax.enable_x64(True):
        s = 2.0
        A, B, G, g_A, g_B = instance(s=s, seed=3)
        X = optimal_x(A, B, g_A, s, delta=0.0)
        lhs = (A.T @ A) @ X + X @ (B @ B.T)
        rhs = -(1 / s**2) * A.T @ g_A @ np.linalg.inv(B @ B.T)
        assert float(jnp.linalg.norm(lhs - rhs)) < 1e-9

        def obj(x):
            ga, gb = adjusted_gradients(A, B, (g_A, g_B), s, x=x, delta=0.0)
            return float(jnp.sum((ga - g_A) ** 2) + jnp.sum((gb - g_B) ** 2))

        best = obj(X)
        assert best == pytest.approx(obj("sylvester"), rel=1e-12)
        rng = np.random.default_rng(1)
        for _ in range(200):
            assert obj(X + 1e-3 * rng.standard_normal((3, 3))) > best
        assert obj(jnp.zeros((3, 3))) > best


def test_sylvester_solver_matches_scipy_and_jax_schur():
    with jax.enable_x64(True):
        rng = np.random.default_rng(5)
        a, b = rng.standard_normal((4, 4)), rng.standard_normal((3, 3))
        M, N, C = a @ a.T + 0.1 * np.eye(4), b @ b.T + 0.1 * np.eye(3), rng.standard_normal((4, 3))
        X = np.asarray(solve_sylvester(jnp.asarray(M), jnp.asarray(N), jnp.asarray(C)))
        np.testing.assert_allclose(X, scipy.linalg.solve_sylvester(M, N, C), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(X, jax.scipy.linalg.solve_sylvester(M, N, C, method="schur"), rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(M @ X + X @ N, C, atol=1e-10)
    # both singular (B = 0 and a rank-deficient A): finite, the vanishing components set to 0
    X0 = solve_sylvester(jnp.diag(jnp.array([1.0, 0.0])), jnp.zeros((2, 2)), jnp.ones((2, 2)))
    np.testing.assert_allclose(X0, [[1.0, 1.0], [0.0, 0.0]], atol=1e-6)


def test_square_b_gives_the_full_gradient():
    """r = out (B square, invertible): P_B = I, the equivalent gradient is G itself."""
    with jax.enable_x64(True):
        A, B, G, g_A, g_B = instance(7, 4, 4, seed=7)
        ga, gb = adjusted_gradients(A, B, (g_A, g_B), 2.0, delta=0.0)
        np.testing.assert_allclose(equivalent_gradient(A, B, ga, gb, 2.0), G, rtol=1e-9, atol=1e-10)


def test_symmetry_x_as_written():
    """Official X_mode='symmetry': X_pt = −(1/(2s²)) (B_ptᵀB_pt)⁻¹ B_ptᵀ g_B_pt (A_pt A_ptᵀ); ours is its transpose."""
    with jax.enable_x64(True):
        s = 2.0
        A, B, G, g_A, g_B = instance(s=s, seed=11)
        Ap, Bp, gBp = np.asarray(A).T, np.asarray(B).T, np.asarray(g_B).T
        Xp = -0.5 / s**2 * np.linalg.inv(Bp.T @ Bp) @ Bp.T @ gBp @ (Ap @ Ap.T)
        ga, gb = adjusted_gradients(A, B, (g_A, g_B), s, x="symmetry", delta=0.0)
        ga0, gb0 = adjusted_gradients(A, B, (g_A, g_B), s, x="zero", delta=0.0)
        np.testing.assert_allclose(ga - ga0, A @ Xp.T, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(gb - gb0, -Xp.T @ B, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------- numpy reference of the official optimiser

def official_full_step(A_f, B_f, gA_f, gB_f, m, v, t, *, s, lr, b1=0.9, b2=0.999, eps=1e-8, delta=1e-8,
                       x_mode="sylvester", wd=0.0, quirks=False):
    """One step of the official full-mode LoRA-Pro AdamW in PyTorch layout (A: [r, in], B: [out, r]).

    Written from specs/optim.md §1.1–1.2 (stage_1_and_2.py / peta/optim.py equations), float64 numpy.
    ``t``: steps taken before this one. Returns (A_new, B_new) in Flax layout and (m, v) in [out, in].
    """
    A, B, gA, gB = (np.asarray(x, np.float64).T for x in (A_f, B_f, gA_f, gB_f))
    r, m_out = A.shape[0], B.shape[0]
    AAt, BtB = A @ A.T, B.T @ B
    AAinv, BBinv = np.linalg.pinv(AAt + delta * np.eye(r)), np.linalg.pinv(BtB + delta * np.eye(r))
    c = 1 / s**2
    proj = np.eye(m_out) - B @ BBinv @ B.T  # the official code materialises it
    eq = s * B @ (c * BBinv @ gA) + s * (c * proj @ gB @ AAinv) @ A
    sq = eq
    if quirks and t > 0:
        sq = eq.astype(ml_dtypes.bfloat16).astype(np.float64)
    m = b1 * m + (1 - b1) * eq
    v = b2 * v + (1 - b2) * sq * sq
    k = t + (2 if quirks else 1)
    Ghat = (m / (1 - b1**k)) / (np.sqrt(v) / math.sqrt(1 - b2**k) + eps)
    gA2, gB2 = s * B.T @ Ghat, s * Ghat @ A.T
    if x_mode == "sylvester":
        X = scipy.linalg.solve_sylvester(BtB, AAt, -c * BBinv @ gA2 @ A.T)
    elif x_mode == "symmetry":
        X = -0.5 * c * BBinv @ B.T @ gB2 @ AAt
    else:
        X = np.zeros((r, r))
    dA = c * BBinv @ gA2 + X @ A
    dB = c * proj @ gB2 @ AAinv - B @ X
    decay = math.sqrt(1 - wd * lr)
    return (decay * A - lr * dA).T, (decay * B - lr * dB).T, m, v


def small_model(seed=0):
    params = {"q": {"kernel": jnp.asarray(rand(6, 5))}, "v": {"kernel": jnp.asarray(rand(6, 4))}}
    spec = lorajax.Spec("lora", rank=2, alpha=4, targets=["q", "v"], init_weights=False)
    adapters = lorajax.init(spec, params, seed)
    x = jnp.asarray(rand(8, 6))

    def loss(ad, p=params):
        merged = lorajax.merge(spec, p, ad)
        return jnp.sum(jnp.tanh(x @ merged["q"]["kernel"]) ** 2) + jnp.sum(jnp.sin(x @ merged["v"]["kernel"]))

    return params, spec, adapters, loss


@pytest.mark.parametrize("quirks,x_mode,wd", [(False, "sylvester", 0.0), (True, "sylvester", 0.0),
                                              (False, "symmetry", 0.1), (False, "zero", 0.0)])
def test_full_mode_matches_numpy_reference(quirks, x_mode, wd):
    with jax.enable_x64(True):
        params, spec, adapters, loss = small_model()
        adapters = jax.tree.map(lambda a: a.astype(jnp.float64), adapters)
        lr = 0.05
        tx = lora_pro(lr, spec=spec, weight_decay=wd, x_mode=x_mode, official_quirks=quirks)
        state = tx.init(adapters)
        ref = {k: (np.asarray(adapters[k]["kernel"]["lora_A"]), np.asarray(adapters[k]["kernel"]["lora_B"]),
                   0.0, 0.0) for k in ("q", "v")}
        step = jax.jit(tx.update)
        for t in range(3):
            grads = jax.grad(loss)(adapters)
            updates, state = step(grads, state, adapters)
            adapters = optax.apply_updates(adapters, updates)
            for k in ("q", "v"):
                A, B, m, v = ref[k]
                gA, gB = (np.asarray(grads[k]["kernel"][n]) for n in ("lora_A", "lora_B"))
                ref[k] = official_full_step(A, B, gA, gB, m, v, t, s=2.0, lr=lr, x_mode=x_mode, wd=wd, quirks=quirks)
                np.testing.assert_allclose(adapters[k]["kernel"]["lora_A"], ref[k][0], rtol=1e-7, atol=1e-9)
                np.testing.assert_allclose(adapters[k]["kernel"]["lora_B"], ref[k][1], rtol=1e-7, atol=1e-9)
            # the state really is full-space: [in, out] moments = the reference's [out, in] transposed
            inner = state.inner_state.inner_states["lora_pro"].inner_state[0]
            np.testing.assert_allclose(inner.mu["q/kernel"], ref["q"][2].T, rtol=1e-7, atol=1e-12)
            assert inner.mu["q/kernel"].shape == (6, 5) and inner.nu["v/kernel"].shape == (6, 4)
            assert int(inner.count) == t + 1


def test_first_step_size_quirk():
    """β-corrected first step: Ĝ = sign(g̃) normally, (1−β1)/(1−β1²)/((√(1−β2)/√(1−β2²))) ≈ 0.74·sign with quirks."""
    A, B, G, g_A, g_B = (x.astype(jnp.float32) for x in instance())
    tree = {"w": {"lora_A": A, "lora_B": B}}
    grads = {"w": {"lora_A": g_A, "lora_B": g_B}}
    ratio = (0.1 / (1 - 0.9**2)) / (math.sqrt(0.001) / math.sqrt(1 - 0.999**2))
    assert ratio == pytest.approx(0.74, abs=0.01)
    u = {}
    for quirks in (False, True):
        tx = scale_by_lora_pro(2.0, official_quirks=quirks, x_mode="zero", delta=0.0)
        u[quirks], _ = tx.update(grads, tx.init(tree), tree)
    for n in ("lora_A", "lora_B"):
        np.testing.assert_allclose(u[True]["w"][n], ratio * u[False]["w"][n], rtol=2e-4, atol=1e-6)


def test_first_order_step_is_projected_sign():
    """β1 = β2 = 0, ε → 0: Ĝ = sign(g̃); s(Δ_A B + A Δ_B) = Proj(sign(g̃)), i.e. ΔW/lr → −Proj(sign g̃)."""
    with jax.enable_x64(True):
        s, lr = 2.0, 1e-6
        A, B, G, g_A, g_B = instance(s=s, seed=2)
        tree = {"w": {"kernel": {"lora_A": A, "lora_B": B}}}
        grads = {"w": {"kernel": {"lora_A": g_A, "lora_B": g_B}}}
        tx = lora_pro(lr, spec=s, b1=0.0, b2=0.0, eps=0.0, delta=0.0)
        u, _ = tx.update(grads, tx.init(tree), tree)
        uA, uB = u["w"]["kernel"]["lora_A"], u["w"]["kernel"]["lora_B"]
        eq = lora_pro_projection(A, B, G)
        want = -lr * lora_pro_projection(A, B, jnp.sign(eq))
        np.testing.assert_allclose(equivalent_gradient(A, B, uA, uB, s), want, rtol=1e-9, atol=1e-18)
        dW = s * ((A + uA) @ (B + uB) - A @ B)
        np.testing.assert_allclose(dW / lr, want / lr, rtol=1e-4, atol=1e-5)


def test_efficient_mode_is_adamw_on_adjusted_gradients():
    params, spec, adapters, loss = small_model(1)
    grads = jax.grad(loss)(adapters)
    tx = lora_pro(1e-2, spec=spec, mode="efficient", weight_decay=0.01)
    adj = {k: dict(zip(("lora_A", "lora_B"),
                       adjusted_gradients(adapters[k]["kernel"]["lora_A"], adapters[k]["kernel"]["lora_B"],
                                          (grads[k]["kernel"]["lora_A"], grads[k]["kernel"]["lora_B"]), 2.0)))
           for k in ("q", "v")}
    adj = {k: {"kernel": v} for k, v in adj.items()}
    ref = optax.adamw(1e-2, weight_decay=0.01)
    u, _ = tx.update(grads, tx.init(adapters), adapters)
    u_ref, _ = ref.update(adj, ref.init(adapters), adapters)
    for x, y in zip(jax.tree.leaves(u), jax.tree.leaves(u_ref)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-8)
    # state is LoRA-sized in efficient mode
    sizes = {tuple(x.shape) for x in jax.tree.leaves(tx.init(adapters)) if getattr(x, "ndim", 0) == 2}
    assert (6, 5) not in sizes and (6, 2) in sizes
    # sgd mode: -lr * adjusted
    sgd = lora_pro(0.1, spec=spec, mode="sgd")
    u, _ = sgd.update(grads, sgd.init(adapters), adapters)
    for x, y in zip(jax.tree.leaves(u), jax.tree.leaves(adj)):
        np.testing.assert_allclose(x, -0.1 * y, rtol=1e-6)


def test_official_clip_scales_by_raw_norm():
    params, spec, adapters, loss = small_model(2)
    grads = jax.tree.map(lambda g: 10.0 * g, jax.grad(loss)(adapters))
    norm = float(optax.global_norm(grads))
    assert norm > 1.0
    base, clipped = lora_pro(1e-2, spec=spec), lora_pro(1e-2, spec=spec, official_clip_norm=1.0)
    u0, _ = base.update(grads, base.init(adapters), adapters)
    u1, _ = clipped.update(grads, clipped.init(adapters), adapters)
    for x, y in zip(jax.tree.leaves(u1), jax.tree.leaves(u0)):
        np.testing.assert_allclose(x, y / (norm + 1e-6), rtol=1e-5)


def test_weight_decay_decays_the_product():
    params, spec, adapters, _ = small_model(3)
    zeros = jax.tree.map(jnp.zeros_like, adapters)
    tx = lora_pro(0.1, spec=spec, weight_decay=0.5)
    u, _ = tx.update(zeros, tx.init(adapters), adapters)
    new = optax.apply_updates(adapters, u)
    a, b = adapters["q"]["kernel"]["lora_A"], adapters["q"]["kernel"]["lora_B"]
    na, nb = new["q"]["kernel"]["lora_A"], new["q"]["kernel"]["lora_B"]
    np.testing.assert_allclose(na @ nb, (1 - 0.05) * (a @ b), rtol=1e-5)


# --------------------------------------------------------------------------- scales from a Spec

def test_scale_from_spec_patterns_and_rslora():
    params = {"q": {"kernel": jnp.ones((6, 5))}, "v": {"kernel": jnp.ones((6, 4))}}
    grads_of = lambda ad: jax.tree.map(lambda x: jnp.asarray(rand(*x.shape), x.dtype), ad)
    for kwargs, scales in (
        (dict(alpha=4, alpha_pattern={"v": 8.0}), {"q": 2.0, "v": 4.0}),
        (dict(alpha=4, use_rslora=True), {"q": 4 / math.sqrt(2), "v": 4 / math.sqrt(2)}),
        (dict(alpha=4, rank_pattern={"v": 1}), {"q": 2.0, "v": 4.0}),
    ):
        spec = lorajax.Spec("lora", rank=2, targets=["q", "v"], init_weights=False, **kwargs)
        adapters = lorajax.init(spec, params, 0)
        grads = grads_of(adapters)
        u_spec, _ = lora_pro(1e-3, spec=spec).update(grads, lora_pro(1e-3, spec=spec).init(adapters), adapters)
        u_map, _ = lora_pro(1e-3, spec=scales).update(grads, lora_pro(1e-3, spec=scales).init(adapters), adapters)
        for k in ("q", "v"):
            tx = lora_pro(1e-3, spec=scales[k])
            sub = {"x": adapters[k]}
            u_k, _ = tx.update({"x": grads[k]}, tx.init(sub), sub)
            for n in ("lora_A", "lora_B"):
                np.testing.assert_allclose(u_spec[k]["kernel"][n], u_k["x"]["kernel"][n], rtol=1e-6)
                np.testing.assert_allclose(u_map[k]["kernel"][n], u_k["x"]["kernel"][n], rtol=1e-6)
    # a callable gets the "/"-joined path of the pair
    seen = []
    tx = lora_pro(1e-3, spec=lambda path: seen.append(path) or 2.0)
    tx.update(grads, tx.init(adapters), adapters)
    assert sorted(set(seen)) == ["q/kernel", "v/kernel"]


# --------------------------------------------------------------------------- trees: jit, partition, composite

def test_jit_equals_eager_and_composite_tree_head_gets_adamw():
    params, spec, adapters, loss = small_model(4)
    tree = {"adapters": adapters, "head": {"kernel": jnp.asarray(rand(5, 3), jnp.float32), "bias": jnp.zeros(3)}}
    grads = {"adapters": jax.grad(loss)(adapters),
             "head": {"kernel": jnp.asarray(rand(5, 3), jnp.float32), "bias": jnp.ones(3)}}
    tx = lora_pro(1e-2, spec=spec, weight_decay=0.1)
    state = tx.init(tree)
    u_e, s_e = tx.update(grads, state, tree)
    u_j, s_j = jax.jit(tx.update)(grads, state, tree)
    for x, y in zip(jax.tree.leaves((u_e, s_e)), jax.tree.leaves((u_j, s_j))):
        np.testing.assert_allclose(x, y, rtol=2e-5, atol=1e-7)
    ref = optax.adamw(1e-2, weight_decay=0.1)
    u_h, _ = ref.update(grads["head"], ref.init(tree["head"]), tree["head"])
    for x, y in zip(jax.tree.leaves(u_e["head"]), jax.tree.leaves(u_h)):
        np.testing.assert_allclose(x, y, rtol=1e-6)
    # pairs under "adapters" equal LoRA-Pro on the adapters alone
    alone = lora_pro(1e-2, spec=spec, weight_decay=0.1)
    u_a, _ = alone.update(grads["adapters"], alone.init(adapters), adapters)
    for x, y in zip(jax.tree.leaves(u_e["adapters"]), jax.tree.leaves(u_a)):
        np.testing.assert_allclose(x, y, rtol=1e-6)


def test_partition_tree_with_none_leaves():
    params, spec, adapters, loss = small_model(5)
    trainable, frozen = lorajax.partition(spec, adapters)
    tree = {"adapters": trainable, "buffers": {"table": None}, "head_bias": None}
    grads = {"adapters": jax.grad(loss)(adapters), "buffers": {"table": None}, "head_bias": None}
    tx = lora_pro(1e-2, spec=spec)
    u, _ = jax.jit(tx.update)(grads, tx.init(tree), tree)
    assert u["buffers"]["table"] is None and u["head_bias"] is None
    alone = lora_pro(1e-2, spec=spec)
    u_a, _ = alone.update(grads["adapters"], alone.init(adapters), adapters)
    for x, y in zip(jax.tree.leaves(u["adapters"]), jax.tree.leaves(u_a)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-8)  # jit vs eager float32


def test_variables_dict_adapters():
    params = {"params": {"dense": {"kernel": jnp.ones((6, 4))}}}
    spec = lorajax.Spec("lora", rank=2, alpha=4, targets=["dense"], init_weights=False, alpha_pattern={"dense": 2.0})
    adapters = lorajax.init(spec, params, 0)
    grads = jax.tree.map(jnp.ones_like, adapters)
    u, _ = lora_pro(1e-3, spec=spec).update(grads, lora_pro(1e-3, spec=spec).init(adapters), adapters)
    u1, _ = lora_pro(1e-3, spec=1.0).update(grads, lora_pro(1e-3, spec=1.0).init(adapters), adapters)  # α = 2, r = 2
    for x, y in zip(jax.tree.leaves(u), jax.tree.leaves(u1)):
        np.testing.assert_allclose(x, y, rtol=1e-6)


# --------------------------------------------------------------------------- non-finite and bad input

def test_nonfinite_step_is_skipped():
    params, spec, adapters, loss = small_model(6)
    tree = {"adapters": adapters, "head": jnp.ones(3)}
    g1 = {"adapters": jax.grad(loss)(adapters), "head": jnp.ones(3)}
    bad = jax.tree.map(lambda x: x, g1)
    bad["adapters"]["q"]["kernel"]["lora_B"] = bad["adapters"]["q"]["kernel"]["lora_B"].at[0, 0].set(jnp.nan)
    tx = lora_pro(1e-2, spec=spec)
    s0 = tx.init(tree)
    step = jax.jit(tx.update)
    u_bad, s_bad = step(bad, s0, tree)
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(u_bad))
    assert int(s_bad.skipped) == 1
    for x, y in zip(jax.tree.leaves(s_bad.inner_state), jax.tree.leaves(s0.inner_state)):
        np.testing.assert_array_equal(x, y)
    # the next finite step is the one a fresh optimiser takes
    u_next, s_next = step(g1, s_bad, tree)
    u_fresh, _ = step(g1, s0, tree)
    for x, y in zip(jax.tree.leaves(u_next), jax.tree.leaves(u_fresh)):
        np.testing.assert_array_equal(x, y)
    assert int(s_next.skipped) == 1
    # without the guard NaN propagates (documented)
    raw = lora_pro(1e-2, spec=spec, skip_nonfinite_steps=False)
    u_raw, _ = raw.update(bad, raw.init(tree), tree)
    assert not bool(jnp.all(jnp.isfinite(u_raw["adapters"]["q"]["kernel"]["lora_A"])))


def test_lora_init_b_zero_is_finite():
    """At LoRA's init (B = 0) the damped inverses keep the step finite: A does not move, B does."""
    params = {"q": {"kernel": jnp.asarray(rand(6, 5), jnp.float32)}}
    spec = lorajax.Spec("lora", rank=2, alpha=4, targets=["q"])
    adapters = lorajax.init(spec, params, 0)
    x = jnp.asarray(rand(8, 6), jnp.float32)
    grads = jax.grad(lambda ad: jnp.sum(jnp.tanh(x @ lorajax.merge(spec, params, ad)["q"]["kernel"])))(adapters)
    tx = lora_pro(1e-2, spec=spec)
    u, state = tx.update(grads, tx.init(adapters), adapters)
    assert int(state.skipped) == 0
    assert float(jnp.abs(u["q"]["kernel"]["lora_A"]).max()) == 0.0
    assert float(jnp.abs(u["q"]["kernel"]["lora_B"]).max()) > 0.0


def test_no_pairs_error():
    with pytest.raises(ValueError, match="no lora_A/lora_B pair.*head/kernel"):
        lora_pro(1e-3, spec=2.0).init({"head": {"kernel": jnp.ones((3, 2))}})
    # LoRA-XS trains only R: its partitioned tree has no pair
    params = {"q": {"kernel": jnp.ones((6, 5))}}
    spec = lorajax.Spec("lora_xs", rank=2, targets=["q"])
    trainable, _ = lorajax.partition(spec, lorajax.init(spec, params, 0))
    with pytest.raises(ValueError, match="no lora_A/lora_B pair"):
        lora_pro(1e-3, spec=1.0).init(trainable)


def test_lone_factor_error_names_path():
    params = {"layers_0": {"q": {"kernel": jnp.ones((6, 5))}}}
    spec = lorajax.Spec("flylora", rank=2, targets=["q"])
    trainable, _ = lorajax.partition(spec, lorajax.init(spec, params, 0))  # lora_A is frozen -> None
    with pytest.raises(ValueError, match="layers_0/q/kernel has lora_B but no lora_A"):
        lora_pro(1e-3, spec=1.0).init(trainable)


def test_bad_arguments():
    spec = lorajax.Spec("dora", rank=2, targets=["q"])
    with pytest.raises(ValueError, match="lora_pro.*plain LoRA adapters.*got variant"):
        lora_pro(1e-3, spec=spec)
    with pytest.raises(ValueError, match="mode"):
        lora_pro(1e-3, spec=2.0, mode="fast")
    with pytest.raises(ValueError, match="x_mode"):
        lora_pro(1e-3, spec=2.0, x_mode="random")
    with pytest.raises(ValueError, match="b2"):
        lora_pro(1e-3, spec=2.0, b2=1.0)
    with pytest.raises(ValueError, match="scale must be"):
        lora_pro(1e-3, spec=-1.0)
    with pytest.raises(TypeError, match="spec must be"):
        lora_pro(1e-3, spec="lora")
    with pytest.raises(ValueError, match="official_quirks"):
        lora_pro(1e-3, spec=2.0, mode="efficient", official_quirks=True)
    tree = {"w": {"lora_A": jnp.ones((4, 2)), "lora_B": jnp.ones((3, 5))}}
    with pytest.raises(ValueError, match=r"w has lora_A \(4, 2\) and lora_B \(3, 5\)"):
        lora_pro(1e-3, spec=2.0).init(tree)
    with pytest.raises(ValueError, match="no scale for the pair at w"):
        lora_pro(1e-3, spec={"q": 2.0}).init({"w": {"lora_A": jnp.ones((4, 2)), "lora_B": jnp.ones((2, 5))}})
    tx = scale_by_lora_pro(2.0)
    t = {"w": {"lora_A": jnp.ones((4, 2)), "lora_B": jnp.ones((2, 5))}, "bias": jnp.ones(5)}
    with pytest.raises(ValueError, match="leaf bias is not a lora_A/lora_B factor"):
        tx.init(t)
    t = {"w": {"lora_A": jnp.ones((4, 2)), "lora_B": jnp.ones((2, 5))}}
    with pytest.raises(ValueError, match="needs params"):
        tx.update(t, tx.init(t))
    with pytest.raises(ValueError, match="needs params"):
        adjust_lora_gradients(2.0).update(t, optax.EmptyState())
    with pytest.raises(ValueError, match=r"x must have shape \(2, 2\)"):
        adjusted_gradients(t["w"]["lora_A"], t["w"]["lora_B"], jnp.ones((4, 5)), 2.0, x=jnp.zeros((3, 3)))
    with pytest.raises(ValueError, match="full gradient must have shape"):
        adjusted_gradients(t["w"]["lora_A"], t["w"]["lora_B"], jnp.ones((5, 4)), 2.0)
