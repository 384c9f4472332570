"""FlyLoRA: what is unique to the variant (the shared checks live in tests/test_conformance.py).

Reference equations (specs/adapters.md §5, the authors' PEFT fork; Flax orientation)::

    A: [in, r] frozen, exactly p = in // (r // k) nonzeros per rank, N(0, 1/r²);  B: [r, out] = 0
    a = stop_gradient(x A);   m = 1 at the k largest (signed) a + d per token
    y = x W + s · (a ⊙ m) B,  s = α / r  (α / √r with use_rslora)
    d ← d + u · sign(mean(c) − c),  c = per-rank selection counts
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
from lorajax.variants import flylora
from lorajax.variants.base import Context

D_IN, D_OUT, R, K = 24, 16, 8, 2


def _params(key=0):
    return {"proj": {"kernel": jax.random.normal(jax.random.key(key), (D_IN, D_OUT))}}


def _spec(**kw):
    kw = {"rank": R, "alpha": 16.0, "targets": ["proj"], "top_k": K, **kw}
    return lorajax.Spec("flylora", **kw)


def _target(spec, params):
    (t,) = lorajax.select(spec, params)
    return t


def _apply(x, w, ad, t):
    """``(y, stats)``: the output and the statistics `flylora.apply` sows."""
    stats = []
    y = flylora.apply(x, w, ad, t, Context(sink=stats.append))
    (aux,) = stats
    return y, aux


def _random_adapter(spec, params, key=1, bias_scale=0.3):
    ad = dict(lorajax.init(spec, params, jax.random.key(key))["proj"]["kernel"])
    kb, kd = jax.random.split(jax.random.key(key + 100))
    ad["lora_B"] = jax.random.normal(kb, ad["lora_B"].shape)
    ad["lora_topk_bias"] = bias_scale * jax.random.normal(kd, (spec.rank,))
    return ad


def test_sparse_a_init():
    spec, params = _spec(), _params()
    ad = lorajax.init(spec, params, jax.random.key(0))["proj"]["kernel"]
    a = np.asarray(ad["lora_A"])
    assert a.shape == (D_IN, R) and ad["lora_B"].shape == (R, D_OUT) and ad["lora_topk_bias"].shape == (R,)
    np.testing.assert_array_equal((a != 0).sum(axis=0), D_IN // (R // K))  # p = 6 per rank
    assert len({tuple(np.flatnonzero(a[:, j])) for j in range(R)}) > 1  # positions drawn per rank
    np.testing.assert_array_equal(np.asarray(ad["lora_B"]), 0.0)
    np.testing.assert_array_equal(np.asarray(ad["lora_topk_bias"]), 0.0)
    assert ad["lora_topk_bias"].dtype == jnp.float32


def test_sparse_a_values_are_normal_with_std_one_over_r():
    r = 32
    params = {"w": {"kernel": jnp.zeros((512, 64))}}
    spec = lorajax.Spec("flylora", rank=r, targets=["w"])  # default top_k = r // 4 = 8: density 1/4
    a = np.asarray(lorajax.init(spec, params, jax.random.key(3))["w"]["kernel"]["lora_A"])
    np.testing.assert_array_equal((a != 0).sum(axis=0), 512 // (32 // 8))
    np.testing.assert_allclose(a[a != 0].std(), 1.0 / r, rtol=0.05)
    assert abs(a[a != 0].mean()) < 0.1 / r


def test_identity_when_b_is_zero():
    spec, params = _spec(), _params()
    ad = lorajax.init(spec, params, jax.random.key(0))["proj"]["kernel"]
    ad = {**ad, "lora_topk_bias": jnp.arange(R, dtype=jnp.float32)}
    x = jax.random.normal(jax.random.key(5), (7, D_IN))
    w = params["proj"]["kernel"]
    y, aux = _apply(x, w, ad, _target(spec, params))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x @ w))
    assert float(aux["counts"].sum()) == 7 * K


@pytest.mark.parametrize("use_rslora", [False, True])
def test_forward_equation(use_rslora):
    spec, params = _spec(use_rslora=use_rslora), _params()
    ad = _random_adapter(spec, params)
    w = params["proj"]["kernel"]
    x = jax.random.normal(jax.random.key(6), (9, D_IN))
    y, aux = _apply(x, w, ad, _target(spec, params))
    s = 16.0 / (math.sqrt(R) if use_rslora else R)
    # numpy reference: per token, the k largest signed scores a + d
    xn, an, bn, dn = (np.asarray(v, np.float64) for v in (x, ad["lora_A"], ad["lora_B"], ad["lora_topk_bias"]))
    act = xn @ an
    m = np.zeros_like(act)
    for t_ in range(act.shape[0]):
        m[t_, np.argsort(-(act[t_] + dn))[:K]] = 1.0
    assert (m.sum(axis=1) == K).all()
    want = xn @ np.asarray(w, np.float64) + s * (act * m) @ bn
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(aux["counts"]), m.sum(axis=0))


def test_routing_uses_the_signed_score():
    """The fork ranks a + d, not |a + d|: a large negative activation is not selected."""
    params = {"proj": {"kernel": jnp.zeros((4, 4))}}
    spec = lorajax.Spec("flylora", rank=4, targets=["proj"], top_k=1)
    ad = {"lora_A": jnp.eye(4), "lora_B": jnp.eye(4), "lora_topk_bias": jnp.zeros(4)}
    x = jnp.array([[-5.0, 1.0, 0.5, 0.0]])
    y, aux = _apply(x, params["proj"]["kernel"], ad, _target(spec, params))
    np.testing.assert_array_equal(np.asarray(aux["counts"]), [0, 1, 0, 0])
    np.testing.assert_allclose(np.asarray(y), [[0.0, spec.alpha / 4, 0.0, 0.0]])
    # the bias shifts the choice
    y, aux = _apply(x, params["proj"]["kernel"], {**ad, "lora_topk_bias": jnp.array([0, 0, 0.6, 0])},
                           _target(spec, params))
    np.testing.assert_array_equal(np.asarray(aux["counts"]), [0, 0, 1, 0])


def test_no_gradient_into_x_through_the_adapter():
    spec, params = _spec(), _params()
    ad = _random_adapter(spec, params)
    t = _target(spec, params)
    w = params["proj"]["kernel"]
    x = jax.random.normal(jax.random.key(7), (5, D_IN))
    g = jax.grad(lambda x: jnp.sum(flylora.apply(x, w, ad, t) - x @ w))(x)
    np.testing.assert_array_equal(np.asarray(g), 0.0)
    g_b = jax.grad(lambda b: jnp.sum(flylora.apply(x, w, {**ad, "lora_B": b}, t)))(ad["lora_B"])
    assert float(jnp.abs(g_b).max()) > 0


def test_bias_update_on_crafted_counts():
    spec, params = _spec(bias_u=0.01), _params()
    t = _target(spec, params)
    d = jnp.array([0.5, 0.0, -0.5, 0.0, 0.0, 0.0, 0.0, 0.0])
    c = jnp.array([3.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0])  # mean 1
    new = flylora.update({"lora_topk_bias": d}, {"counts": c}, t)
    np.testing.assert_allclose(np.asarray(new["lora_topk_bias"]),
                               np.asarray(d) + 0.01 * np.array([-1, 0, 1, 0, 0, 0, 0, 1]), rtol=1e-6)
    assert set(new) == {"lora_topk_bias"}


def test_options_validated():
    with pytest.raises(ValueError, match="top_k"):
        _spec(top_k=0)
    with pytest.raises(ValueError, match="top_k"):
        _spec(top_k=2.0)
    with pytest.raises(ValueError, match="bias_u"):
        _spec(bias_u=-1.0)
    with pytest.raises(ValueError, match="use_rslora"):
        _spec(use_rslora="yes")
    with pytest.raises(ValueError, match=r"proj: top_k=9 must be <= rank 8"):
        lorajax.init(_spec(top_k=9), _params(), jax.random.key(0))
    wide = {"proj": {"kernel": jnp.zeros((40, 40))}}
    assert flylora.top_k(_target(lorajax.Spec("flylora", rank=32, targets=["proj"]), wide)) == 8  # the paper's
    assert flylora.top_k(_target(lorajax.Spec("flylora", rank=3, targets=["proj"]), _params())) == 1


def test_not_mergeable_and_trainable_count():
    spec, params = _spec(), _params()
    adapters = lorajax.init(spec, params, jax.random.key(0))
    with pytest.raises(ValueError, match="cannot be merged"):
        lorajax.merge(spec, params, adapters)
    counts = lorajax.count_params(spec, params, adapters)
    assert counts["trainable"] == D_OUT * R  # B only
    assert counts["frozen_adapter"] == D_IN * R + R
    assert flylora.VARIANT.trainable_count(lorajax.select(spec, params)) == counts["trainable"]
    assert flylora.VARIANT.is_buffer("lora_A") and flylora.VARIANT.is_buffer("lora_topk_bias")
    assert not flylora.VARIANT.is_buffer("lora_B")


def test_trainable_count_formula_over_targets():
    """``Σ r · out`` over targets of different ranks, as counted on the adapters."""
    params = {"proj": {"kernel": jnp.zeros((D_IN, D_OUT))}, "up": {"kernel": jnp.zeros((D_OUT, 12))}}
    for kw in ({}, {"rank_pattern": {"up": 4}, "top_k": 1, "use_rslora": True}):
        spec = lorajax.Spec("flylora", rank=R, targets=["proj", "up"], **kw)
        adapters = lorajax.init(spec, params, jax.random.key(0))
        want = lorajax.count_params(spec, params, adapters)["trainable"]
        assert flylora.VARIANT.trainable_count(lorajax.select(spec, params)) == want
        assert want == sum(t.rank * t.matrix_shape[1] for t in lorajax.select(spec, params))


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        dense = nn.Dense(D_IN, name="shared")
        return nn.Dense(D_OUT, name="proj")(dense(x) + dense(jnp.tanh(x)))


def test_train_step_updates_bias_and_b_only():
    model = Net()
    x = jax.random.normal(jax.random.key(0), (4, 3, D_IN))
    variables = model.init(jax.random.key(1), x)
    spec = _spec(targets=["shared", "proj"], bias_u=0.01)
    adapters = lorajax.init(spec, variables, jax.random.key(2))
    fwd = lorajax.adapt(model.apply, spec)

    _, aux = fwd(variables, adapters, x, adapter_aux=True)
    # the shared layer is called twice: its counts add up over both calls
    assert float(aux["params"]["shared"]["kernel"]["counts"].sum()) == 2 * 12 * K
    assert float(aux["params"]["proj"]["kernel"]["counts"].sum()) == 12 * K

    def loss_fn(params, adapters, batch):
        out, aux = fwd(params, adapters, batch, adapter_aux=True)
        return jnp.mean(out ** 2), aux

    tx = optax.sgd(0.1)
    old = jax.tree.map(np.asarray, adapters)  # the step donates its inputs
    trainable, frozen = lorajax.partition(spec, adapters)
    step = lorajax.train.make_lora_step(loss_fn, tx, state_update=lorajax.train.refresh_state(spec))
    state, metrics = step(variables, lorajax.train.TrainState.create(tx, trainable, frozen), x)
    new_tr, new_fr = state.trainable, state.frozen
    assert np.isfinite(float(metrics["loss"]))
    for name in ("shared", "proj"):
        old_a, new_a = old["params"][name]["kernel"], new_fr["params"][name]["kernel"]
        np.testing.assert_array_equal(np.asarray(new_a["lora_A"]), old_a["lora_A"])
        delta = np.asarray(new_a["lora_topk_bias"]) - old_a["lora_topk_bias"]
        assert np.all(np.isclose(np.abs(delta), 0.01) | (delta == 0)) and np.abs(delta).max() > 0
        assert float(jnp.abs(new_tr["params"][name]["kernel"]["lora_B"]).max()) > 0  # B left zero
