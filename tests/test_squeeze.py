"""`lorajax.squeeze` (LoRA-Squeeze): the squeezed adapter gives the best rank-b approximation of ``s·A B``.

Flax orientation, ``A: [in, r]``, ``B: [r, out]``, ``ΔW = s·A B = U Σ Vᵀ``::

    s'·A'B' = U_b Σ_b V_bᵀ                      (Eckart–Young: the best rank-b approximation)
    ‖ΔW − s'·A'B'‖_F² = Σ_{i>b} σ_i²
    A' = U_b √(sΣ_b/s'),  B' = √(sΣ_b/s') V_bᵀ   (balanced split: A'ᵀA' = B'B'ᵀ)
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lorajax
from lorajax.rank_tools import squeeze_factors, squeeze_opt_state, squeeze_schedule

ALPHA = 6.0
R = 6


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(9, name="q")(x)
        return nn.Dense(8, use_bias=False, name="v")(jax.nn.relu(h))


MODEL = Net()


def _setup(variant="lora", rank=R, **kw):
    x = jax.random.normal(jax.random.key(0), (5, 10))
    variables = MODEL.init(jax.random.key(1), x)
    spec = lorajax.Spec(variant, rank=rank, alpha=ALPHA, targets=["q", "v"], **kw)
    ad = lorajax.init(spec, variables, jax.random.key(2))
    # random B (B = 0 at init would make every check trivial)
    ad = jax.tree_util.tree_map_with_path(
        lambda p, a: jax.random.normal(jax.random.key(len(jax.tree_util.keystr(p))), a.shape, a.dtype)
        if "lora_B" in jax.tree_util.keystr(p) else a, ad)
    return spec, variables, x, ad


def _np(x):
    return np.asarray(x, np.float64)


def _delta(ad, name, s):
    a = ad["params"][name]["kernel"]
    return s * _np(a["lora_A"]) @ _np(a["lora_B"])


def _trunc(d, b):
    u, sig, vt = np.linalg.svd(d, full_matrices=False)
    return (u[:, :b] * sig[:b]) @ vt[:b], sig


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("b", [1, 3, 5])
def test_qr_squeeze_is_the_truncated_svd(b, use_rslora):
    spec, variables, x, ad = _setup(use_rslora=use_rslora)
    spec_b, ad_b = lorajax.squeeze(spec, ad, b)
    assert spec_b.rank == b and spec_b.alpha == ALPHA and spec_b.options["use_rslora"] == use_rslora
    s = ALPHA / (math.sqrt(R) if use_rslora else R)
    s_new = ALPHA / (math.sqrt(b) if use_rslora else b)
    merged = lorajax.merge(spec_b, variables, ad_b)
    for name in ("q", "v"):
        cut = ad_b["params"][name]["kernel"]
        d = _delta(ad, name, s)
        assert cut["lora_A"].shape == (d.shape[0], b) and cut["lora_B"].shape == (b, d.shape[1])
        best, sig = _trunc(d, b)
        got = s_new * _np(cut["lora_A"]) @ _np(cut["lora_B"])
        np.testing.assert_allclose(got, best, rtol=1e-5, atol=1e-5 * sig[0])
        # Eckart–Young: the error is exactly the tail of the spectrum
        err2 = np.sum((d - got) ** 2)
        np.testing.assert_allclose(err2, np.sum(sig[b:] ** 2), rtol=1e-4)
        # the merged model under the new spec is W + trunc_b(ΔW)
        w = _np(variables["params"][name]["kernel"])
        np.testing.assert_allclose(_np(merged["params"][name]["kernel"]), w + best, rtol=1e-5, atol=1e-5)
        # balanced split: A'ᵀA' = B'B'ᵀ = diag(s σ_b / s')
        gram_a = _np(cut["lora_A"]).T @ _np(cut["lora_A"])
        gram_b = _np(cut["lora_B"]) @ _np(cut["lora_B"]).T
        np.testing.assert_allclose(gram_a, np.diag(sig[:b] / s_new), rtol=1e-4, atol=1e-5 * sig[0])
        np.testing.assert_allclose(gram_b, gram_a, rtol=1e-4, atol=1e-5 * sig[0])
    # the factored forward of the squeezed adapter is the truncated model's output
    y = lorajax.adapt(MODEL.apply, spec_b)(variables, ad_b, x)
    want = MODEL.apply(merged, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_alpha_override_and_patterns():
    spec, variables, x, ad = _setup(rank=4, rank_pattern={"v": 6}, alpha_pattern={"q": 3.0})
    spec_b, ad_b = lorajax.squeeze(spec, ad, 2)  # alpha kept, with its pattern
    assert spec_b.rank == 2 and not spec_b.rank_pattern and dict(spec_b.alpha_pattern) == {"q": 3.0}
    spec_c, ad_c = lorajax.squeeze(spec, ad, 2, alpha=5.0)
    assert spec_c.alpha == 5.0 and not spec_c.alpha_pattern
    for name, r, alpha, alpha_b in (("q", 4, 3.0, 3.0), ("v", 6, ALPHA, ALPHA)):
        best, _ = _trunc(_delta(ad, name, alpha / r), 2)
        for spec2, ad2, a2 in ((spec_b, ad_b, alpha_b), (spec_c, ad_c, 5.0)):
            merged = lorajax.merge(spec2, variables, ad2)
            w = _np(variables["params"][name]["kernel"])
            np.testing.assert_allclose(_np(merged["params"][name]["kernel"]) - w, best, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(_delta(ad2, name, a2 / 2), best, rtol=1e-4, atol=1e-5)


def test_dora_squeezes_the_direction_and_keeps_the_magnitude():
    spec, variables, x, ad = _setup("dora")
    spec_b, ad_b = lorajax.squeeze(spec, ad, 2)
    merged = lorajax.merge(spec_b, variables, ad_b)
    for name in ("q", "v"):
        m = _np(ad["params"][name]["kernel"]["magnitude"])
        np.testing.assert_array_equal(_np(ad_b["params"][name]["kernel"]["magnitude"]), m)
        best, _ = _trunc(_delta(ad, name, ALPHA / R), 2)
        v = _np(variables["params"][name]["kernel"]) + best
        want = v * (m / np.linalg.norm(v, axis=0))[None, :]
        np.testing.assert_allclose(_np(merged["params"][name]["kernel"]), want, rtol=1e-4, atol=1e-5)


def _gap_factors(d_in=12, d_out=20, r=6, sig=(5.0, 4.0, 3.0, 0.05, 0.02, 0.01)):
    ku, kv, kg = jax.random.split(jax.random.key(7), 3)
    u, _ = jnp.linalg.qr(jax.random.normal(ku, (d_in, r)))
    v, _ = jnp.linalg.qr(jax.random.normal(kv, (d_out, r)))
    g = jax.random.normal(kg, (r, r))  # an arbitrary invertible mix: A, B are not orthogonal themselves
    a = (u * jnp.asarray(sig)[None, :]) @ g
    b = jnp.linalg.solve(g, v.T)
    return a, b


def test_rsvd_matches_the_exact_route():
    spec, variables, x, ad = _setup()
    _, ad_qr = lorajax.squeeze(spec, ad, 3)
    _, ad_r = lorajax.squeeze(spec, ad, 3, method="rsvd", key=jax.random.key(3))
    for name in ("q", "v"):
        got = _delta(ad_r, name, ALPHA / 3)
        np.testing.assert_allclose(got, _delta(ad_qr, name, ALPHA / 3), rtol=1e-4, atol=1e-4)
    # a narrow sketch (no oversampling) on a spectrum with a gap: close to the truncated SVD
    a, b = _gap_factors()
    best, sig = _trunc(_np(a) @ _np(b), 3)
    for niter, tol in ((0, 5e-2), (2, 1e-4)):
        a2, b2 = squeeze_factors(a, b, 3, method="rsvd", key=jax.random.key(1), niter=niter, oversample=0)
        got = _np(a2) @ _np(b2)
        assert np.linalg.norm(got - best) <= tol * sig[0], (niter, np.linalg.norm(got - best))
        assert np.linalg.norm(_np(a) @ _np(b) - got) <= np.sqrt(np.sum(sig[3:] ** 2)) + tol * sig[0]


def _shapes_in(jaxpr, found: set) -> set:
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            found.add(tuple(getattr(v.aval, "shape", ())))
        for p in eqn.params.values():
            for sub in p if isinstance(p, (tuple, list)) else (p,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    _shapes_in(sub.jaxpr, found)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    _shapes_in(sub, found)
    return found


@pytest.mark.parametrize("method", ["qr", "rsvd"])
def test_no_full_size_matrix_is_formed(method):
    a, b = _gap_factors()  # in=12, out=20, r=6
    full = {(12, 20), (20, 12)}
    # the walker does see a full-size product when there is one
    assert full & _shapes_in(jax.make_jaxpr(lambda a, b: a @ b)(a, b).jaxpr, set())
    jaxpr = jax.make_jaxpr(lambda a, b: squeeze_factors(a, b, 3, scale=2.0, new_scale=0.5, method=method))(a, b)
    shapes = _shapes_in(jaxpr.jaxpr, set())
    assert not (full & shapes), shapes
    assert (12, 3) in shapes and (3, 20) in shapes


def test_errors():
    spec, variables, x, ad = _setup(rank=4, rank_pattern={"v": 2})
    with pytest.raises(ValueError, match="rank 2 is not below the rank 2 of the adapter at params/v/kernel"):
        lorajax.squeeze(spec, ad, 2)  # below q's rank 4, not below v's rank 2
    with pytest.raises(ValueError, match="rank 4 is not below the rank 4 of the adapter at params/q/kernel"):
        lorajax.squeeze(spec, ad, 4)
    for bad in (0, -1, 2.0, True, None):
        with pytest.raises(ValueError, match="rank must be an int >= 1"):
            lorajax.squeeze(spec, ad, bad)
    with pytest.raises(ValueError, match="method must be one of"):
        lorajax.squeeze(spec, ad, 1, method="svd")
    with pytest.raises(ValueError, match="alpha must be"):
        lorajax.squeeze(spec, ad, 1, alpha=0.0)
    with pytest.raises(ValueError, match="niter"):
        lorajax.squeeze(spec, ad, 1, method="rsvd", niter=-1)
    for variant in ("vera", "dylora"):
        spec_v = lorajax.Spec(variant, rank=4, targets=["q"])
        with pytest.raises(ValueError, match=r"squeeze supports the variants with an s·A·B term \(.*'dora'.*'lora'.*\), got '"):
            lorajax.squeeze(spec_v, lorajax.init(spec_v, variables, jax.random.key(0)), 2)


def test_no_mutation():
    spec, variables, x, ad = _setup()
    before = jax.tree_util.tree_map(np.asarray, ad)
    lorajax.squeeze(spec, ad, 2)
    lorajax.squeeze(spec, ad, 2, method="rsvd")
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.tree_util.tree_map(np.asarray, ad), before)


def test_schedule():
    assert squeeze_schedule(64, 8, 1000, 3) == ((250, 32), (500, 16), (750, 8))
    assert squeeze_schedule(16, 4, 100, 1) == ((50, 4),)
    sched = squeeze_schedule(10, 6, 50, 4)  # needs every rank in between
    assert [r for _, r in sched] == [9, 8, 7, 6]
    steps = [s for s, _ in sched]
    assert steps == sorted(set(steps)) and 0 < steps[0] and steps[-1] < 50
    for args, match in (((8, 8, 100, 1), "below r0"), ((8, 4, 100, 5), "only 4"), ((8, 4, 2, 2), "steps >= 3"),
                        ((8, 0, 100, 1), "r_target must be an int >= 1"), ((8, 4, 100, 0), "n_stages")):
        with pytest.raises(ValueError, match=match):
            squeeze_schedule(*args)


def _linear_loss(spec, params, c):
    """``⟨C, W'⟩`` summed over the targets: the full-weight gradient is ``C``, whatever the adapter."""

    def loss(adapters):
        merged = lorajax.merge(spec, params, adapters)
        return sum(jnp.sum(c[n] * merged["params"][n]["kernel"]) for n in ("q", "v"))

    return loss


@pytest.mark.parametrize("mode", ["reset", "project"])
def test_opt_state_after_squeeze_fits_and_trains(mode):
    spec, variables, x, ad = _setup()
    tx = optax.chain(optax.scale_by_adam(), optax.scale_by_schedule(optax.linear_schedule(-1e-2, 0.0, 100)))
    c = {n: jax.random.normal(jax.random.key(i), variables["params"][n]["kernel"].shape) for i, n in enumerate("qv")}
    state = tx.init(ad)
    for _ in range(2):
        grads = jax.grad(_linear_loss(spec, variables, c))(ad)
        updates, state = tx.update(grads, state, ad)
        ad = optax.apply_updates(ad, updates)
    spec_b, ad_b = lorajax.squeeze(spec, ad, 3)
    state_b = squeeze_opt_state(state, spec, ad, spec_b, ad_b, mode=mode)
    adam, sched = state_b[0], state_b[1]
    for moments in (adam.mu, adam.nu):
        assert jax.tree_util.tree_structure(moments) == jax.tree_util.tree_structure(ad_b)
        jax.tree_util.tree_map(lambda m, p: (m.shape, m.dtype) == (p.shape, p.dtype) or pytest.fail(), moments, ad_b)
    assert int(adam.count) == (0 if mode == "reset" else 2) and int(sched.count) == 2
    if mode == "reset":
        assert all(float(jnp.abs(m).max()) == 0 for m in jax.tree_util.tree_leaves((adam.mu, adam.nu)))
    else:  # project: the first moments are checked exactly in the next test
        assert all(float(m.min()) >= 0 for m in jax.tree_util.tree_leaves(adam.nu))
    # training continues: one optax step on the squeezed adapters
    loss_b = _linear_loss(spec_b, variables, c)
    grads = jax.grad(loss_b)(ad_b)
    updates, state_b = tx.update(grads, state_b, ad_b)
    ad_b2 = optax.apply_updates(ad_b, updates)
    assert float(loss_b(ad_b2)) < float(loss_b(ad_b))


def test_projected_first_moment_is_exact_for_one_step():
    """After one Adam step from zero, μ = (1-β1)·g; with a linear loss the projection gives (1-β1)·g'."""
    spec, variables, x, ad = _setup()
    c = {n: jax.random.normal(jax.random.key(i), variables["params"][n]["kernel"].shape) for i, n in enumerate("qv")}
    tx = optax.adam(1e-2)
    state = tx.init(ad)
    grads = jax.grad(_linear_loss(spec, variables, c))(ad)
    _, state = tx.update(grads, state, ad)  # moments of the gradient at `ad`; `ad` itself not moved
    spec_b, ad_b = lorajax.squeeze(spec, ad, 3)
    state_b = squeeze_opt_state(state, spec, ad, spec_b, ad_b, mode="project")
    want = jax.grad(_linear_loss(spec_b, variables, c))(ad_b)
    jax.tree_util.tree_map(lambda m, g: np.testing.assert_allclose(_np(m), 0.1 * _np(g), rtol=1e-4, atol=1e-5),
                           state_b[0].mu, want)


def test_opt_state_errors():
    spec, variables, x, ad = _setup()
    spec_b, ad_b = lorajax.squeeze(spec, ad, 3)
    state = optax.adam(1e-3).init(ad)
    with pytest.raises(ValueError, match="mode must be"):
        squeeze_opt_state(state, spec, ad, spec_b, ad_b, mode="keep")
    with pytest.raises(ValueError, match="no part of opt_state"):
        squeeze_opt_state(optax.sgd(1e-3).init(ad), spec, ad, spec_b, ad_b)
    with pytest.raises(ValueError, match="cannot project the optimiser field 'trace'"):
        squeeze_opt_state(optax.sgd(1e-3, momentum=0.9).init(ad), spec, ad, spec_b, ad_b, mode="project")
