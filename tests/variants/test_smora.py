"""SMoRA: what is unique to the variant (the shared checks live in tests/test_conformance.py).

Reference equations (specs/adapters.md §10a, official ``srmole/layer.py``; Flax orientation)::

    g⁺ = repeat(sigmoid(x G), p) + β;   (v, I) = top_k(g⁺, k)   (kept values include β)
    ĝ_i = v_i / Σ v for i ∈ I, else 0;  y = x W + α Σ_{i∈I} ĝ_i (x a_i) b_i
    β ← β + u · sign(mean(c) − c),  c = per-rank selection counts
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
from lorajax.variants import smora
from lorajax.variants.base import Context


def _apply(x, w, ad, t):
    """``(y, stats)``: the output and the statistics `smora.apply` sows."""
    stats = []
    y = smora.apply(x, w, ad, t, Context(sink=stats.append))
    (aux,) = stats
    return y, aux


#: jitted (the target, a hashable dataclass, is static): op-by-op dispatch is slow on a busy CPU
apply_jit = jax.jit(_apply, static_argnums=3)

D_IN, D_OUT, R, K = 24, 16, 8, 3


def _params(key=0):
    return {"proj": {"kernel": jax.random.normal(jax.random.key(key), (D_IN, D_OUT))}}


def _spec(**kw):
    kw = {"rank": R, "alpha": 4.0, "targets": ["proj"], "activate_r": K, **kw}
    return lorajax.Spec("smora", **kw)


def _target(spec, params):
    (t,) = lorajax.select(spec, params)
    return t


def _random_adapter(spec, params, key=1, bias_scale=0.1):
    ad = dict(lorajax.init(spec, params, jax.random.key(key))["proj"]["kernel"])
    kb, kd = jax.random.split(jax.random.key(key + 100))
    ad["lora_B"] = jax.random.normal(kb, ad["lora_B"].shape)
    ad["lora_biases"] = bias_scale * jax.random.normal(kd, (spec.rank,))
    return ad


def test_init_shapes_bounds_and_identity():
    params = {"w": {"kernel": jnp.zeros((400, 64))}}
    spec = lorajax.Spec("smora", rank=16, targets=["w"], rank_partition=4)
    ad = lorajax.init(spec, params, jax.random.key(0))["w"]["kernel"]
    assert ad["lora_A"].shape == (400, 16) and ad["lora_B"].shape == (16, 64)
    assert ad["lora_router"].shape == (400, 4) and ad["lora_biases"].shape == (16,)
    bound = 1 / math.sqrt(400)
    for name in ("lora_A", "lora_router"):
        x = np.asarray(ad[name])
        assert np.abs(x).max() <= bound and np.abs(x).max() > 0.95 * bound
    np.testing.assert_array_equal(np.asarray(ad["lora_B"]), 0.0)
    np.testing.assert_array_equal(np.asarray(ad["lora_biases"]), 0.0)
    assert not np.allclose(np.asarray(ad["lora_A"][:, :4]), np.asarray(ad["lora_router"]))  # own keys

    spec, params = _spec(), _params()
    ad = {**lorajax.init(spec, params, jax.random.key(0))["proj"]["kernel"], "lora_biases": jnp.arange(R) * 0.1}
    x = jax.random.normal(jax.random.key(5), (7, D_IN))
    y, aux = apply_jit(x, params["proj"]["kernel"], ad, _target(spec, params))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x @ params["proj"]["kernel"]))
    assert float(aux["counts"].sum()) == 7 * K


@pytest.mark.parametrize("p", [1, 2])
def test_forward_equation_token_by_token(p):
    spec, params = _spec(rank_partition=p, activate_r=4), _params()
    ad = _random_adapter(spec, params)
    w = params["proj"]["kernel"]
    x = jax.random.normal(jax.random.key(6), (6, D_IN))
    y, aux = apply_jit(x, w, ad, _target(spec, params))
    xn, an, bn, gn, beta = (np.asarray(ad[k], np.float64) if k != "x" else np.asarray(x, np.float64)
                            for k in ("x", "lora_A", "lora_B", "lora_router", "lora_biases"))
    counts = np.zeros(R)
    for t_ in range(6):
        g = 1 / (1 + np.exp(-(xn[t_] @ gn)))
        score = np.repeat(g, p) + beta
        idx = np.argsort(-score, kind="stable")[:4]
        gate = score[idx] / score[idx].sum()  # kept values include β
        want = xn[t_] @ np.asarray(w, np.float64) + spec.alpha * sum(
            gate[j] * (xn[t_] @ an[:, i]) * bn[i] for j, i in enumerate(idx))
        np.testing.assert_allclose(np.asarray(y[t_]), want, rtol=1e-5, atol=1e-5)
        counts[idx] += 1
    np.testing.assert_array_equal(np.asarray(aux["counts"]), counts)


def test_gates_k_nonzero_sum_to_one():
    spec, params = _spec(), _params()
    ad = _random_adapter(spec, params)
    g = np.asarray(smora.gates(jax.random.normal(jax.random.key(8), (11, D_IN)), ad, _target(spec, params)))
    assert g.shape == (11, R)
    np.testing.assert_array_equal((g != 0).sum(axis=1), K)
    np.testing.assert_allclose(g.sum(axis=1), 1.0, rtol=1e-6)  # the official ĝ·k sums to k
    np.testing.assert_allclose((g * K).sum(axis=1), K, rtol=1e-6)


def test_partitioned_gates_come_in_equal_adjacent_pairs():
    """p = 2, β = 0, k even: each router entry covers two adjacent ranks, kept and weighted alike."""
    spec, params = _spec(rank_partition=2, activate_r=4), _params()
    ad = {**_random_adapter(spec, params), "lora_biases": jnp.zeros(R)}
    assert ad["lora_router"].shape == (D_IN, R // 2)
    g = np.asarray(smora.gates(jax.random.normal(jax.random.key(9), (10, D_IN)), ad, _target(spec, params)))
    np.testing.assert_array_equal(g[:, 0::2], g[:, 1::2])
    np.testing.assert_array_equal((g != 0).sum(axis=1), 4)


@pytest.mark.parametrize("p", [1, 2])
def test_dense_and_gather_paths_agree(p):
    """One token and a batch: gathering the k ranks == the dense masked matmuls, values and gradients."""
    params = _params()
    dense, gather = _spec(rank_partition=p, activate_r=4), _spec(rank_partition=p, activate_r=4, dense_compute=False)
    ad = _random_adapter(dense, params)
    w = params["proj"]["kernel"]
    t_d, t_g = _target(dense, params), _target(gather, params)
    for n in (1, 9):
        x = jax.random.normal(jax.random.key(n), (n, D_IN))
        (y_d, aux_d), (y_g, aux_g) = apply_jit(x, w, ad, t_d), apply_jit(x, w, ad, t_g)
        np.testing.assert_allclose(np.asarray(y_d), np.asarray(y_g), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(aux_d["counts"]), np.asarray(aux_g["counts"]))
    trainable = {k: ad[k] for k in ("lora_A", "lora_B", "lora_router")}

    def loss(tr, x, t):
        return jnp.sum(jnp.sin(smora.apply(x, w, {**ad, **tr}, t)))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
    g_d, g_g = grad(trainable, x, t_d), grad(trainable, x, t_g)  # x: the batch of 9
    for a, b in zip(jax.tree.leaves(g_d), jax.tree.leaves(g_g)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_router_gets_gradient_except_with_one_active_rank():
    params = _params()
    x = jax.random.normal(jax.random.key(3), (5, D_IN))
    size = {}
    for k in (K, 1):
        spec = _spec(activate_r=k)
        ad = _random_adapter(spec, params)
        t = _target(spec, params)
        g = jax.jit(jax.grad(lambda gk: jnp.sum(smora.apply(x, params["proj"]["kernel"],
                                                             {**ad, "lora_router": gk}, t))))(ad["lora_router"])
        size[k] = float(jnp.abs(g).max())
    assert size[K] > 1e-2
    assert size[1] < 1e-5 * size[K]  # with k = 1 the single gate v / v is always 1: only rounding is left


def test_bias_update_on_crafted_counts():
    spec, params = _spec(bias_update_rate=1e-3), _params()
    t = _target(spec, params)
    beta = jnp.array([0.5, 0.0, -0.5, 0.0, 0.0, 0.0, 0.0, 0.0])
    c = jnp.array([3.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0])  # mean 1
    new = smora.update({"lora_biases": beta}, {"counts": c}, t)
    np.testing.assert_allclose(np.asarray(new["lora_biases"]),
                               np.asarray(beta) + 1e-3 * np.array([-1, 0, 1, 0, 0, 0, 0, 1]), rtol=1e-6)
    assert set(new) == {"lora_biases"}
    assert smora.Options().bias_update_rate == 1e-5


def test_options_validated():
    for bad in (dict(activate_r=0), dict(activate_r=2.0), dict(rank_partition=0), dict(bias_update_rate=-1.0),
                dict(dense_compute=1)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            _spec(**bad)
    with pytest.raises(ValueError, match=r"proj: activate_r=9 must be <= rank 8"):
        lorajax.init(_spec(activate_r=9), _params(), jax.random.key(0))
    with pytest.raises(ValueError, match=r"proj: rank_partition=3 must divide rank 8"):
        lorajax.init(_spec(rank_partition=3), _params(), jax.random.key(0))
    # default k: the official 8 where the rank allows it
    assert smora.activate_r(_target(lorajax.Spec("smora", rank=16, targets=["proj"]), _params())) == 8
    assert smora.activate_r(_target(lorajax.Spec("smora", rank=4, targets=["proj"]), _params())) == 4


@pytest.mark.parametrize("p", [1, 2])
def test_not_mergeable_and_trainable_count(p):
    spec, params = _spec(rank_partition=p), _params()
    adapters = lorajax.init(spec, params, jax.random.key(0))
    with pytest.raises(ValueError, match="cannot be merged"):
        lorajax.merge(spec, params, adapters)
    counts = lorajax.count_params(spec, params, adapters)
    assert counts["trainable"] == R * (D_IN + D_OUT) + (R // p) * D_IN
    assert counts["frozen_adapter"] == R
    assert smora.VARIANT.trainable_count(lorajax.select(spec, params)) == counts["trainable"]
    assert smora.VARIANT.is_buffer("lora_biases") and not smora.VARIANT.is_buffer("lora_router")


def test_trainable_count_formula_over_targets():
    """``Σ r · (in + out) + (r / p) · in`` over targets of different ranks, as counted on the adapters."""
    params = {"proj": {"kernel": jnp.zeros((D_IN, D_OUT))}, "up": {"kernel": jnp.zeros((D_OUT, 12))}}
    for kw in ({}, {"rank_pattern": {"up": 4}, "rank_partition": 2, "activate_r": 2}):
        spec = lorajax.Spec("smora", rank=R, targets=["proj", "up"], **kw)
        adapters = lorajax.init(spec, params, jax.random.key(0))
        want = lorajax.count_params(spec, params, adapters)["trainable"]
        assert smora.VARIANT.trainable_count(lorajax.select(spec, params)) == want


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        dense = nn.Dense(D_IN, name="shared")
        return nn.Dense(D_OUT, name="proj")(dense(x) + dense(jnp.tanh(x)))


def test_train_step_updates_biases():
    model = Net()
    x = jax.random.normal(jax.random.key(0), (4, 3, D_IN))
    variables = model.init(jax.random.key(1), x)
    spec = _spec(targets=["shared", "proj"], bias_update_rate=0.01)
    adapters = lorajax.init(spec, variables, jax.random.key(2))
    fwd = lorajax.adapt(model.apply, spec)
    _, aux = fwd(variables, adapters, x, adapter_aux=True)
    assert float(aux["params"]["shared"]["kernel"]["counts"].sum()) == 2 * 12 * K  # two calls add up

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
        new_beta = np.asarray(new_fr["params"][name]["kernel"]["lora_biases"])
        delta = new_beta - old["params"][name]["kernel"]["lora_biases"]
        assert np.all(np.isclose(np.abs(delta), 0.01) | (delta == 0)) and np.abs(delta).max() > 0
        assert float(jnp.abs(new_tr["params"][name]["kernel"]["lora_B"]).max()) > 0
