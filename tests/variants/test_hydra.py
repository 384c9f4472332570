"""Hydra: what is unique to the variant (the shared checks live in tests/test_conformance.py).

Reference equations (specs/adapters.md §8, Flax orientation ``W: [in, out]``)::

    y  = x W + b + s · (x A_p) B_p + s · ((x W) A_s) B_s       (sequential branch sees x W, no bias)
    W' = W + s · (A_p B_p + W A_s B_s)
    A_p: [in, r_p], B_p: [r_p, out], A_s: [out, r_s], B_s: [r_s, out];  B_p = B_s = 0 at init
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lorajax
from lorajax import registry

D_IN, D_OUT, R_P, R_S, SCALE = 9, 7, 2, 3, 0.5
NAMES = ("hydra_par_A", "hydra_par_B", "hydra_seq_A", "hydra_seq_B")


def _params(dtype=jnp.float32):
    kq, kv = jax.random.split(jax.random.key(0))
    return {
        "q": {"kernel": jax.random.normal(kq, (D_IN, D_OUT), dtype)},
        "v": {"kernel": jax.random.normal(kv, (D_OUT, D_IN), dtype)},
    }


def _spec(**kw):
    kw.setdefault("rank", R_P)
    kw.setdefault("seq_rank", R_S)
    kw.setdefault("scale", SCALE)
    return lorajax.Spec("hydra", targets=["q", "v"], **kw)


def _randomize(adapters, key=1, scale=0.3):
    """Every leaf (all four factors of every target) set to scale · N(0, 1)."""
    leaves, treedef = jax.tree_util.tree_flatten(adapters)
    keys = jax.random.split(jax.random.key(key), len(leaves))
    return jax.tree_util.tree_unflatten(treedef, [scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def _f64(x):
    return np.asarray(x, np.float64)


def _ref(w, leaf, s):
    a_p, b_p, a_s, b_s = (_f64(leaf[k]) for k in NAMES)
    w = _f64(w)
    return w + s * (a_p @ b_p + w @ a_s @ b_s)


def test_init_shapes_zero_up_projections_and_counts():
    params = _params()
    spec = _spec()
    ad = lorajax.init(spec, params, jax.random.key(0))
    for name in ("q", "v"):
        d_in, d_out = params[name]["kernel"].shape
        leaf = ad[name]["kernel"]
        assert [leaf[k].shape for k in NAMES] == [(d_in, R_P), (R_P, d_out), (d_out, R_S), (R_S, d_out)]
        np.testing.assert_array_equal(np.asarray(leaf["hydra_par_B"]), 0.0)
        np.testing.assert_array_equal(np.asarray(leaf["hydra_seq_B"]), 0.0)
    counts = lorajax.count_params(spec, params, ad)
    assert counts["trainable"] == 2 * (R_P * (D_IN + D_OUT)) + R_S * 2 * D_OUT + R_S * 2 * D_IN
    assert counts["frozen_adapter"] == 0


def test_seq_rank_defaults_to_each_targets_rank():
    params = _params()
    ad = lorajax.init(lorajax.Spec("hydra", rank=2, targets=["q", "v"], rank_pattern={"v": 3}), params, 0)
    assert ad["q"]["kernel"]["hydra_seq_A"].shape == (D_OUT, 2)
    assert ad["v"]["kernel"]["hydra_par_A"].shape == (D_OUT, 3) and ad["v"]["kernel"]["hydra_seq_A"].shape == (D_IN, 3)
    # an explicit seq_rank holds for every target; rank_pattern then moves only the parallel rank
    spec = lorajax.Spec("hydra", rank=2, targets=["q", "v"], rank_pattern={"v": 3}, seq_rank=4)
    ad = lorajax.init(spec, params, 0)
    assert ad["v"]["kernel"]["hydra_par_A"].shape == (D_OUT, 3) and ad["v"]["kernel"]["hydra_seq_A"].shape == (D_IN, 4)


@pytest.mark.parametrize("mode", ["xavier", "kaiming"])
def test_down_projection_bounds_are_filled(mode):
    d_in, d_out, r = 400, 300, 16
    params = {"d": {"kernel": jnp.zeros((d_in, d_out))}}
    spec = lorajax.Spec("hydra", rank=r, targets=["d"], init_weights=mode)
    leaf = lorajax.init(spec, params, jax.random.key(0))["d"]["kernel"]
    for name, fan_in in (("hydra_par_A", d_in), ("hydra_seq_A", d_out)):
        x = np.asarray(leaf[name])
        bound = math.sqrt(6.0 / (fan_in + r)) if mode == "xavier" else 1.0 / math.sqrt(fan_in)
        assert np.abs(x).max() <= bound and np.abs(x).max() > 0.95 * bound, name
        np.testing.assert_allclose(x.std(), bound / math.sqrt(3), rtol=0.05, err_msg=name)


def test_merged_weight_equation():
    params = _params()
    spec = _spec()
    ad = _randomize(lorajax.init(spec, params, jax.random.key(0)))
    merged = lorajax.merge(spec, params, ad)
    for name in ("q", "v"):
        want = _ref(params[name]["kernel"], ad[name]["kernel"], SCALE)
        np.testing.assert_allclose(np.asarray(merged[name]["kernel"]), want, rtol=1e-5, atol=1e-5, err_msg=name)


def test_factored_forward_equation_with_a_biased_layer():
    model = nn.Dense(D_OUT, name="dense")
    x = jax.random.normal(jax.random.key(3), (5, D_IN))
    variables = model.init(jax.random.key(0), x)
    variables = {"params": {**variables["params"], "bias": jax.random.normal(jax.random.key(4), (D_OUT,))}}
    spec = lorajax.Spec("hydra", rank=R_P, targets=".*", seq_rank=R_S, scale=SCALE)
    ad = _randomize(lorajax.init(spec, variables, jax.random.key(0)))
    leaf = ad["params"]["kernel"]
    a_p, b_p, a_s, b_s = (_f64(leaf[k]) for k in NAMES)
    w, b = _f64(variables["params"]["kernel"]), _f64(variables["params"]["bias"])
    xw = _f64(x) @ w
    want = xw + b[None, :] + SCALE * (_f64(x) @ a_p) @ b_p + SCALE * (xw @ a_s) @ b_s
    for mode in ("factored", "merged"):
        y = lorajax.adapt(model.apply, spec, mode=mode)(variables, ad, x)
        np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5, err_msg=mode)


def test_sequential_branch_alone_scales_the_output_side():
    """With B_p = 0: W' = W (I + s A_s B_s) exactly (a linear map of the pretrained features)."""
    params = _params()
    spec = _spec()
    ad = _randomize(lorajax.init(spec, params, jax.random.key(0)))
    for name in ("q", "v"):
        ad[name]["kernel"]["hydra_par_B"] = jnp.zeros_like(ad[name]["kernel"]["hydra_par_B"])
    merged = lorajax.merge(spec, params, ad)
    for name in ("q", "v"):
        w = _f64(params[name]["kernel"])
        a_s, b_s = _f64(ad[name]["kernel"]["hydra_seq_A"]), _f64(ad[name]["kernel"]["hydra_seq_B"])
        want = w @ (np.eye(w.shape[1]) + SCALE * a_s @ b_s)
        np.testing.assert_allclose(np.asarray(merged[name]["kernel"]), want, rtol=1e-5, atol=1e-5)


def test_gradient_of_the_sequential_branch_sees_the_pretrained_output():
    """dL/dA_s = s (x W)ᵀ g B_sᵀ: it depends on W (doubling W doubles it), unlike LoRA's dL/dA."""
    spec = lorajax.Spec("hydra", rank=R_P, targets=["d"], seq_rank=R_S, scale=SCALE)
    w = jax.random.normal(jax.random.key(0), (D_IN, D_OUT))
    x = jax.random.normal(jax.random.key(1), (6, D_IN))
    g = jax.random.normal(jax.random.key(2), (6, D_OUT))
    ad = _randomize(lorajax.init(spec, {"d": {"kernel": w}}, jax.random.key(0)))
    fwd = lorajax.adapt(lambda p, xx: xx @ p["d"]["kernel"], spec, mode="merged")

    def grad_a_s(w_):
        params = {"d": {"kernel": w_}}
        return jax.grad(lambda a: jnp.sum(fwd(params, a, x) * g))(ad)["d"]["kernel"]["hydra_seq_A"]

    got = _f64(grad_a_s(w))
    want = SCALE * (_f64(x) @ _f64(w)).T @ _f64(g) @ _f64(ad["d"]["kernel"]["hydra_seq_B"]).T
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(_f64(grad_a_s(2 * w)), 2 * got, rtol=1e-4, atol=1e-5)


def test_matches_a_torch_layer_built_like_the_official_vtab_code():
    """Official forward ``fc2(x) + par(x) + seq(fc2(x))`` with ``par/seq = s · up(down(·))`` and zero
    branch biases: equal to ours up to the documented bias shift s·(b A_s) B_s (the sequential branch
    sees the biased output there), and the official merge W0 + s (W_p + W0 W_s) equals our W'."""
    torch = pytest.importorskip("torch")
    tnn = torch.nn
    spec = lorajax.Spec("hydra", rank=R_P, targets=["d"], seq_rank=R_S, scale=SCALE)
    params = {"d": {"kernel": jax.random.normal(jax.random.key(0), (D_IN, D_OUT))}}
    bias = np.asarray(jax.random.normal(jax.random.key(9), (D_OUT,)))
    ad = _randomize(lorajax.init(spec, params, jax.random.key(0)))
    leaf = ad["d"]["kernel"]
    x = np.asarray(jax.random.normal(jax.random.key(1), (4, D_IN)))

    fc2 = tnn.Linear(D_IN, D_OUT)
    par_down, par_up = tnn.Linear(D_IN, R_P), tnn.Linear(R_P, D_OUT)
    seq_down, seq_up = tnn.Linear(D_OUT, R_S), tnn.Linear(R_S, D_OUT)
    with torch.no_grad():
        fc2.weight.copy_(torch.tensor(np.asarray(params["d"]["kernel"]).T))
        fc2.bias.copy_(torch.tensor(bias))
        for lin, name in ((par_down, "hydra_par_A"), (par_up, "hydra_par_B"), (seq_down, "hydra_seq_A"),
                          (seq_up, "hydra_seq_B")):
            lin.weight.copy_(torch.tensor(np.asarray(leaf[name]).T))
            lin.bias.zero_()
        xt = torch.tensor(x)
        h = fc2(xt)
        y_official = h + SCALE * par_up(par_down(xt)) + SCALE * seq_up(seq_down(h))
        w_p = par_down.weight.T @ par_up.weight.T  # [in, out]
        w_s = seq_down.weight.T @ seq_up.weight.T  # [out, out]
        w0 = fc2.weight.T
        merged_official = w0 + SCALE * (w_p + w0 @ w_s)

    (t,) = lorajax.select(spec, params)
    y = np.asarray(registry.get("hydra").apply(jnp.asarray(x), params["d"]["kernel"], leaf, t)) + bias[None, :]
    shift = SCALE * (bias @ np.asarray(leaf["hydra_seq_A"])) @ np.asarray(leaf["hydra_seq_B"])
    np.testing.assert_allclose(y + shift[None, :], y_official.numpy(), rtol=1e-5, atol=1e-5)
    merged = np.asarray(lorajax.merge(spec, params, ad)["d"]["kernel"])
    np.testing.assert_allclose(merged, merged_official.numpy(), rtol=1e-5, atol=1e-5)


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
    assert ad["q"]["kernel"]["hydra_seq_A"].dtype == jnp.float32
    assert lorajax.merge(spec, params, ad)["q"]["kernel"].dtype == jnp.bfloat16


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(seq_rank=0), "seq_rank"),
        (dict(seq_rank=2.0), "seq_rank"),
        (dict(scale=float("inf")), "scale"),
        (dict(scale="0.1"), "scale"),
        (dict(init_weights="normal"), "init_weights"),
    ],
)
def test_bad_options_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _spec(**kwargs)


def test_seq_rank_larger_than_out_names_the_target():
    with pytest.raises(ValueError, match=r"seq_rank 8 is larger than out = 7 for 'q'"):
        lorajax.init(_spec(seq_rank=8), _params(), jax.random.key(0))


def test_mismatched_adapter_names_the_path():
    params = _params()
    spec = _spec()
    ad = lorajax.init(spec, params, jax.random.key(0))
    ad["v"]["kernel"]["hydra_seq_A"] = jnp.zeros((D_OUT, R_S))  # v is [7, 9]: A_s must be [9, r_s]
    with pytest.raises(ValueError, match=r"v/kernel.*hydra_seq_A: \[out, r_s\]"):
        lorajax.merge(spec, params, ad)


@pytest.mark.parametrize("kw", [{}, {"seq_rank": None, "rank_pattern": {"v": 1}, "init_weights": "kaiming"}])
def test_trainable_count_formula(kw):
    """The declared ``trainable_count`` is ``Σ r_p · (in + out) + 2 · r_s · out``, as counted on the adapters."""
    params = _params()
    spec = _spec(**kw)
    ad = lorajax.init(spec, params, jax.random.key(0))
    ts = lorajax.select(spec, params)
    want = lorajax.count_params(spec, params, ad)["trainable"]
    assert registry.get("hydra").trainable_count(ts) == want
    r_s = spec.options["seq_rank"]
    assert want == sum(t.rank * sum(t.matrix_shape) + 2 * (r_s or t.rank) * t.matrix_shape[1] for t in ts)
