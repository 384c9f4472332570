"""PaCA: what is unique to the variant (the shared checks live in tests/test_conformance.py).

Reference equations (official WooSunghyeon/paca ``peft/src/peft/tuners/paca/layer.py``, PyTorch layout
``W_pt: [out, in]``, ``paca_w_pt: [out, r]``)::

    idx = randperm(in)[:r];  paca_w_pt = W_pt[:, idx] / s,  s = α/r
    W'_pt = W_pt with columns idx replaced by s · paca_w_pt
    ∂L/∂paca_w_pt = s · Gᵀ x[..., idx]          (only x[..., idx] is saved for backward)

Flax orientation here: ``paca_w = paca_w_ptᵀ: [r, out]``, rows ``idx`` of ``W: [in, out]``.
"""

from __future__ import annotations

import contextlib
import io
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

import lorajax
from lorajax import registry

T, D_IN, D_OUT, R, ALPHA = 11, 13, 7, 3, 6.0  # all distinct, so a residual's shape says what it is
V = registry.get("paca")


def _params(key=0):
    k1, k2 = jax.random.split(jax.random.key(key))
    return {"dense": {"kernel": jax.random.normal(k1, (D_IN, D_OUT)), "bias": jax.random.normal(k2, (D_OUT,))}}


def _spec(**kw):
    kw.setdefault("rank", R)
    kw.setdefault("alpha", ALPHA)
    return lorajax.Spec("paca", targets=["dense"], **kw)


def _trained(spec, params, key=1):
    ad = lorajax.init(spec, params, jax.random.key(0))
    leaf = ad["dense"]["kernel"]
    leaf["paca_w"] = jax.random.normal(jax.random.key(key), leaf["paca_w"].shape)
    return ad


def test_init_selects_distinct_rows_from_the_init_key():
    params = _params()
    spec = _spec()
    leaf = lorajax.init(spec, params, jax.random.key(0))["dense"]["kernel"]
    idx = np.asarray(leaf["paca_indices"])
    assert leaf["paca_indices"].dtype == jnp.int32 and idx.shape == (R,)
    assert len(set(idx.tolist())) == R and idx.min() >= 0 and idx.max() < D_IN
    assert np.all(np.diff(idx) > 0)  # stored sorted
    # w = W[idx] / s
    s = ALPHA / R
    np.testing.assert_allclose(np.asarray(leaf["paca_w"]), np.asarray(params["dense"]["kernel"])[idx] / s,
                               rtol=1e-6)
    same = lorajax.init(spec, params, jax.random.key(0))["dense"]["kernel"]["paca_indices"]
    np.testing.assert_array_equal(np.asarray(same), idx)
    others = {tuple(np.asarray(lorajax.init(spec, params, jax.random.key(k))["dense"]["kernel"]["paca_indices"]))
              for k in range(1, 8)}
    assert len(others | {tuple(idx)}) > 1


@pytest.mark.parametrize("selection", ["norm_top", "norm_bottom"])
def test_norm_selection(selection):
    params = _params()
    leaf = lorajax.init(_spec(selection=selection), params, jax.random.key(0))["dense"]["kernel"]
    norms = np.linalg.norm(np.asarray(params["dense"]["kernel"]), axis=1)  # = W_pt.norm(dim=0)
    order = np.argsort(-norms if selection == "norm_top" else norms)
    np.testing.assert_array_equal(np.asarray(leaf["paca_indices"]), np.sort(order[:R]))


@pytest.mark.parametrize("alpha", [ALPHA, 5.0])  # s = 2 (exact) and s = 5/3
def test_identity_at_init(alpha):
    params = _params()
    spec = _spec(alpha=alpha)
    ad = lorajax.init(spec, params, jax.random.key(0))
    merged = lorajax.merge(spec, params, ad)
    np.testing.assert_allclose(np.asarray(merged["dense"]["kernel"]), np.asarray(params["dense"]["kernel"]),
                               rtol=1e-6, atol=1e-7)


def test_merged_weight_equation_in_pytorch_layout():
    params = _params()
    spec = _spec()
    ad = _trained(spec, params)
    leaf = ad["dense"]["kernel"]
    merged = np.asarray(lorajax.merge(spec, params, ad)["dense"]["kernel"])
    w_pt = np.asarray(params["dense"]["kernel"], np.float64).T.copy()   # [out, in]
    paca_w_pt = np.asarray(leaf["paca_w"], np.float64).T                # [out, r]
    idx = np.asarray(leaf["paca_indices"])
    w_pt[:, idx] = (ALPHA / R) * paca_w_pt
    np.testing.assert_allclose(merged.T, w_pt, rtol=1e-6, atol=1e-6)
    rest = np.setdiff1d(np.arange(D_IN), idx)
    np.testing.assert_array_equal(merged[rest], np.asarray(params["dense"]["kernel"])[rest])


def test_factored_forward_equation():
    model = nn.Dense(D_OUT, name="dense")
    x = jax.random.normal(jax.random.key(3), (2, T, D_IN))
    variables = model.init(jax.random.key(0), x)
    spec = lorajax.Spec("paca", rank=R, alpha=ALPHA, targets=".*")
    ad = _trained(spec, {"dense": variables["params"]})["dense"]
    ad = {"params": ad}
    y = lorajax.adapt(model.apply, spec, mode="factored")(variables, ad, x)
    leaf, p = ad["params"]["kernel"], variables["params"]
    w_new = p["kernel"].at[leaf["paca_indices"]].set((ALPHA / R) * leaf["paca_w"])
    want = np.asarray(x, np.float64) @ np.asarray(w_new, np.float64) + np.asarray(p["bias"])[None, None, :]
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)


def test_gradient_is_s_times_the_weight_gradient_rows():
    params = _params()
    spec = _spec()
    (t,) = lorajax.select(spec, params)
    leaf = _trained(spec, params)["dense"]["kernel"]
    w = params["dense"]["kernel"]
    x = jax.random.normal(jax.random.key(4), (T, D_IN))
    g_out = jax.random.normal(jax.random.key(5), (T, D_OUT))
    idx = leaf["paca_indices"]
    s = ALPHA / R
    want = s * x[:, idx].T @ g_out                                   # [r, out] = (s · Gᵀ x_idx)ᵀ
    full = jax.grad(lambda k: jnp.sum((x @ k) * g_out))(V.adapted(w, leaf, t))   # ∂L/∂W'
    np.testing.assert_allclose(np.asarray(want), s * np.asarray(full)[np.asarray(idx)], rtol=1e-5, atol=1e-5)
    for fn in (lambda pw: jnp.sum(V.apply(x, w, {**leaf, "paca_w": pw}, t) * g_out),
               lambda pw: jnp.sum((x @ V.adapted(w, {**leaf, "paca_w": pw}, t)) * g_out)):
        np.testing.assert_allclose(np.asarray(jax.grad(fn)(leaf["paca_w"])), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_one_sgd_step_moves_the_selected_rows():
    params = _params()
    spec = _spec()
    (t,) = lorajax.select(spec, params)
    leaf = _trained(spec, params)["dense"]["kernel"]
    w = params["dense"]["kernel"]
    x = jax.random.normal(jax.random.key(4), (T, D_IN))
    g_out = jax.random.normal(jax.random.key(5), (T, D_OUT))
    lr, s, idx = 0.01, ALPHA / R, np.asarray(leaf["paca_indices"])
    grad = jax.grad(lambda pw: jnp.sum(V.apply(x, w, {**leaf, "paca_w": pw}, t) * g_out))(leaf["paca_w"])
    before = np.asarray(V.adapted(w, leaf, t), np.float64)
    after = np.asarray(V.adapted(w, {**leaf, "paca_w": leaf["paca_w"] - lr * grad}, t), np.float64)
    xn, gn = np.asarray(x, np.float64), np.asarray(g_out, np.float64)
    np.testing.assert_allclose(after[idx] - before[idx], -lr * s * s * xn[:, idx].T @ gn, rtol=1e-4, atol=1e-5)
    rest = np.setdiff1d(np.arange(D_IN), idx)
    np.testing.assert_array_equal(after[rest], before[rest])


def _residual_shapes(f, *args):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(f, *args)
    text = out.getvalue()
    return text, {tuple(int(d) for d in m.split(",") if d) for m in re.findall(r"\w+\[([0-9,]*)\]", text)}


def test_only_the_selected_activations_are_saved():
    """The w-gradient keeps x[:, idx] ([T, r]) as a residual, never the full x ([T, in])."""
    params = _params()
    spec = _spec()
    (t,) = lorajax.select(spec, params)
    leaf = _trained(spec, params)["dense"]["kernel"]
    w = params["dense"]["kernel"]
    x = jax.random.normal(jax.random.key(4), (T, D_IN))

    def paca_loss(pw, x):
        return jnp.sum(jnp.sin(V.apply(x, w, {**leaf, "paca_w": pw}, t)))

    text, shapes = _residual_shapes(paca_loss, leaf["paca_w"], x)
    assert (T, D_IN) not in shapes, text
    assert (T, R) in shapes, text

    # the check is not vacuous: LoRA's A-gradient saves the full x
    lspec = lorajax.Spec("lora", rank=R, targets=["dense"])
    (lt,) = lorajax.select(lspec, params)
    la = lorajax.init(lspec, params, jax.random.key(0))["dense"]["kernel"]
    text, shapes = _residual_shapes(lambda a, x: jnp.sum(jnp.sin(registry.get("lora").apply(x, w, a, lt))), la, x)
    assert (T, D_IN) in shapes, text


def test_only_the_selected_activations_are_saved_through_adapt():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(D_OUT, name="dense")(jnp.tanh(x))

    model = Net()
    x = jax.random.normal(jax.random.key(3), (T, D_IN))
    variables = model.init(jax.random.key(0), x)
    for variant, saves_x in (("paca", False), ("lora", True)):  # LoRA: the check is not vacuous
        spec = lorajax.Spec(variant, rank=R, alpha=ALPHA, targets=["dense"])
        ad = lorajax.init(spec, variables, jax.random.key(1))
        trainable, frozen = lorajax.partition(spec, ad)
        fwd = lorajax.adapt(model.apply, spec, mode="factored")
        text, shapes = _residual_shapes(
            lambda tr: jnp.sum(jnp.sin(fwd(variables, lorajax.combine(tr, frozen), x))), trainable)
        assert ((T, D_IN) in shapes) == saves_x, f"{variant}:\n{text}"
        assert variant != "paca" or (T, R) in shapes, text


def test_indices_are_frozen_and_counted():
    params = _params()
    spec = _spec()
    ad = lorajax.init(spec, params, jax.random.key(0))
    mask = lorajax.trainable_mask(spec, ad)["dense"]["kernel"]
    assert mask == {"paca_w": True, "paca_indices": False}
    counts = lorajax.count_params(spec, params, ad)
    assert counts["trainable"] == R * D_OUT and counts["frozen_adapter"] == R


def test_no_unmerge():
    params = _params()
    spec = _spec()
    ad = _trained(spec, params)
    with pytest.raises(NotImplementedError):
        lorajax.unmerge(spec, lorajax.merge(spec, params, ad), ad)


def test_bad_selection_raises():
    with pytest.raises(ValueError, match="selection"):
        _spec(selection="gradient")


@pytest.mark.parametrize("kw", [{}, {"rank_pattern": {"up": 2}, "selection": "norm_top"}])
def test_trainable_count_formula(kw):
    """The declared ``trainable_count`` is ``Σ r · out``, as counted on the adapters."""
    params = {"dense": {"kernel": jnp.ones((7, 5))}, "up": {"kernel": jnp.ones((5, 9))}}
    spec = lorajax.Spec("paca", rank=3, targets=["dense", "up"], **kw)
    ad = lorajax.init(spec, params, jax.random.key(0))
    ts = lorajax.select(spec, params)
    want = lorajax.count_params(spec, params, ad)["trainable"]
    assert registry.get("paca").trainable_count(ts) == want
    assert want == sum(t.rank * t.matrix_shape[1] for t in ts)
