"""lorajax.federated: FedAvg, pFedLoRA, Fed-SB aggregation, DP-SGD clipping and the (ε, δ) account."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lorajax
from lorajax import federated

IN, MID, OUT, R = 8, 6, 4, 2


@pytest.fixture(scope="module")
def base():
    k = jax.random.split(jax.random.key(0), 2)
    return {
        "l1": {"kernel": jax.random.normal(k[0], (IN, MID)) / 3},
        "l2": {"kernel": jax.random.normal(k[1], (MID, OUT)) / 3},
    }


def _spec(variant: str, **kw):
    return lorajax.Spec(variant, rank=R, alpha=4, targets=["l1", "l2"], **kw)


def _forward(spec, params, adapters, x):
    p = lorajax.merge(spec, params, adapters)
    return jnp.tanh(x @ p["l1"]["kernel"]) @ p["l2"]["kernel"]


def _loss(spec, params):
    def loss_fn(trainable, frozen, batch):
        x, y = batch
        return jnp.mean((_forward(spec, params, lorajax.combine(trainable, frozen), x) - y) ** 2)

    return loss_fn


def _data(key, *lead):
    kx, ky = jax.random.split(key)
    return jax.random.normal(kx, (*lead, IN)), jax.random.normal(ky, (*lead, OUT))


@pytest.fixture(scope="module")
def lora(base):
    spec = _spec("lora", init_weights=False)  # B != 0: both factors get gradients
    trainable, frozen = lorajax.partition(spec, lorajax.init(spec, base, 1))
    return spec, trainable, frozen


def _close(a, b, **kw):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kw)


def test_identical_clients_one_round_equals_centralised(base, lora):
    spec, trainable, frozen = lora
    loss_fn, tx = _loss(spec, base), optax.adam(1e-2)
    batches = _data(jax.random.key(2), 3, 5)  # [steps, B, ...]
    k = 4
    clients = jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (k, *x.shape)), batches)
    rnd = jax.jit(functools.partial(federated.fedavg_round, loss_fn, tx))
    new, losses = rnd(trainable, frozen, clients, jnp.array([5.0, 1.0, 2.0, 7.0]))
    central, c_losses = jax.jit(functools.partial(federated.local_train, loss_fn, tx))(trainable, frozen, batches)
    _close(new, central, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(losses), np.broadcast_to(np.asarray(c_losses), (k, 3)), rtol=1e-6)
    assert not np.allclose(np.asarray(new["l1"]["kernel"]["lora_A"]), np.asarray(trainable["l1"]["kernel"]["lora_A"]))


def test_fedsgd_weighted_by_sizes_equals_centralised_step(base, lora):
    # one SGD step per client on its mean loss, averaged with p_k = n_k / n, is one step on the union's mean loss
    spec, trainable, frozen = lora
    loss_fn, tx = _loss(spec, base), optax.sgd(0.1)
    sizes = [3, 7]
    data = [_data(jax.random.key(10 + i), 1, n) for i, n in enumerate(sizes)]  # different sizes: a loop
    trained = [federated.local_train(loss_fn, tx, trainable, frozen, d)[0] for d in data]
    avg = federated.fedavg(trained, weights=sizes)
    union = tuple(jnp.concatenate([d[j] for d in data], axis=1) for j in range(2))
    central, _ = federated.local_train(loss_fn, tx, trainable, frozen, union)
    _close(avg, central, rtol=1e-5, atol=1e-6)
    uniform = federated.fedavg(trained)  # not the union's step when sizes differ
    assert not np.allclose(np.asarray(uniform["l1"]["kernel"]["lora_B"]), np.asarray(central["l1"]["kernel"]["lora_B"]))


def test_communicated_bytes_equal_the_formula(base, lora):
    k = 5
    _, trainable, _ = lora
    lora_b = 4 * sum(R * (i + o) for i, o in [(IN, MID), (MID, OUT)])  # r·(in + out) float32s per target
    assert federated.round_bytes(trainable, k) == {
        "per_client_up": lora_b,
        "per_client_down": lora_b,
        "total": 2 * k * lora_b,
    }
    spec = _spec("lora_xs")
    sb_trainable, sb_frozen = lorajax.partition(spec, lorajax.init(spec, base, 1))
    assert federated.round_bytes(sb_trainable, k)["total"] == 2 * k * 2 * 4 * R * R  # two r×r cores only
    assert federated.tree_bytes(sb_frozen) == 4 * sum(R * (i + o) for i, o in [(IN, MID), (MID, OUT)])


def test_fed_sb_aggregation_is_exact_and_lora_fedavg_is_not(base):
    spec = _spec("lora_xs")
    shared = lorajax.init(spec, base, 1)
    keys = jax.random.split(jax.random.key(3), 3)
    clients = [
        jax.tree_util.tree_map_with_path(
            lambda p, x, kk=kk: (
                jax.random.normal(jax.random.fold_in(kk, len(x.shape) + x.shape[0]), x.shape)
                if jax.tree_util.keystr(p).endswith("'lora_R']")
                else x
            ),
            shared,
        )
        for kk in keys
    ]
    w = np.array([1.0, 2.0, 5.0])
    agg = federated.fed_sb_aggregate(spec, clients, weights=list(w))
    merged = lorajax.merge(spec, base, agg)
    mean_merged = jax.tree_util.tree_map(
        lambda *xs: sum(wi * x for wi, x in zip(w / w.sum(), xs)), *[lorajax.merge(spec, base, c) for c in clients]
    )
    _close(merged, mean_merged, rtol=1e-5, atol=1e-6)
    # plain LoRA: averaging A and B separately is not the average update
    lspec = _spec("lora", init_weights=False)
    lclients = [lorajax.init(lspec, base, int(i)) for i in range(3)]
    lmerged = lorajax.merge(lspec, base, federated.fedavg(lclients))["l1"]["kernel"]
    lmean = sum(lorajax.merge(lspec, base, c)["l1"]["kernel"] for c in lclients) / 3
    assert float(jnp.max(jnp.abs(lmerged - lmean))) > 1e-2
    # clients with different frozen A: not exact, refused
    other = lorajax.init(spec, jax.tree_util.tree_map(lambda x: x + 1.0, base), 1)
    with pytest.raises(ValueError, match="client 1's frozen .*lora_A.* share A and B"):
        federated.fed_sb_aggregate(spec, [clients[0], other])
    with pytest.raises(ValueError, match="lora_xs"):
        federated.fed_sb_aggregate(lspec, lclients)


def test_mismatched_client_trees_and_weights_raise(base):
    a = lorajax.init(_spec("lora"), base, 0)
    b = lorajax.init(lorajax.Spec("lora", rank=R + 1, targets=["l1", "l2"]), base, 0)
    with pytest.raises(ValueError, match=r"client 1's adapter leaf .*lora_A.*\(shape, dtype\)"):
        federated.fedavg([a, b])
    c = lorajax.init(lorajax.Spec("lora", rank=R, targets=["l1"]), base, 0)
    with pytest.raises(ValueError, match="client 1's adapter tree differs.*missing leaves"):
        federated.fedavg([a, c])
    with pytest.raises(ValueError, match="one number per client"):
        federated.fedavg([a, a], weights=[1.0])
    with pytest.raises(ValueError, match="not all 0"):
        federated.fedavg([a, a], weights=[0.0, 0.0])
    with pytest.raises(ValueError, match="no client"):
        federated.fedavg([])
    back = federated.unstack(federated.stack([a, b := jax.tree_util.tree_map(lambda v: v + 1, a)]))
    _close(back[0], a, rtol=0)
    _close(back[1], b, rtol=0)


def test_dp_clipping_bounds_each_example_and_noise_scale(base, lora):
    spec, trainable, frozen = lora
    loss_fn = _loss(spec, base)
    x, y = _data(jax.random.key(4), 16)
    batch = (3.0 * x, 10.0 * y)  # large per-example gradients
    c = 20.0  # the per-example norms here range over about 7..70
    dp = federated.DPSGD(c, 2.0, expected_batch_size=32)
    mask = jnp.arange(16) % 3 != 0  # a Poisson sample's padding: these examples are out

    @jax.jit  # one compile for every quantity checked
    def run(t, b, key):
        one = lambda t, ex: loss_fn(t, frozen, jax.tree_util.tree_map(lambda v: v[None], ex))  # noqa: E731
        per_ex = jax.vmap(jax.grad(one), (None, 0))(t, b)
        clipped, norms = federated.clip_per_example(per_ex, dp.clip_norm)
        noisy, _ = federated.dp_grad(loss_fn, t, frozen, b, key, dp, mask=mask)
        return per_ex, clipped, norms, noisy, jax.grad(loss_fn)(t, frozen, b)

    per_ex, clipped, norms, noisy, plain = run(trainable, batch, jax.random.key(1))
    # per-example gradients are the mean loss's gradient, split by example
    _close(jax.tree_util.tree_map(lambda v: jnp.mean(v, axis=0), per_ex), plain, rtol=1e-4, atol=1e-6)
    sq = sum(jnp.sum(v.reshape(16, -1) ** 2, axis=1) for v in jax.tree_util.tree_leaves(clipped))
    assert float(jnp.max(norms)) > c > float(jnp.min(norms))  # the test clips some, not all
    assert np.all(np.sqrt(np.asarray(sq)) <= c * (1 + 1e-5))
    small = np.asarray(norms) < c
    np.testing.assert_allclose(np.sqrt(np.asarray(sq))[small], np.asarray(norms)[small], rtol=1e-5)
    # the masked clipped sum plus N(0, σ²C²), over the expected batch size
    m = np.asarray(mask, np.float32)
    csum = jax.tree_util.tree_map(lambda v: jnp.tensordot(m, v, axes=1) / 32, clipped)
    resid = np.concatenate(
        [np.ravel(a - b) for a, b in zip(jax.tree_util.tree_leaves(noisy), jax.tree_util.tree_leaves(csum))]
    )
    sd = 2.0 * c / 32
    assert abs(resid.std() / sd - 1) < 0.35 and abs(resid.mean()) < 0.5 * sd  # 48 noise draws
    with pytest.raises(ValueError, match="clip_norm must be > 0"):
        federated.DPSGD(0.0, 1.0)
    with pytest.raises(ValueError, match="needs key="):
        federated.local_train(loss_fn, optax.sgd(0.1), trainable, frozen, (x[None], y[None]), dp=dp)


def _rdp_int(q: float, sigma: float, alpha: int) -> float:
    """Mironov et al. 2019: RDP of the Poisson-subsampled Gaussian at an integer order (binomial expansion)."""
    s = sum(
        math.comb(alpha, k) * (1 - q) ** (alpha - k) * q**k * math.exp((k * k - k) / (2 * sigma**2))
        for k in range(alpha + 1)
    )
    return math.log(s) / (alpha - 1)


def test_accountant_values():
    pytest.importorskip("dp_accounting")
    for q, sigma, steps in [(0.01, 1.1, 100), (0.2, 2.0, 7), (1.0, 3.0, 5)]:
        got = federated.dp_rdp(sigma, q, steps, orders=[2, 3, 5])
        want = [steps * _rdp_int(q, sigma, a) for a in (2, 3, 5)]
        np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(
        federated.dp_rdp(3.0, 1.0, 5, orders=[4]), [5 * 4 / (2 * 9.0)], rtol=1e-9
    )  # Gaussian: α/2σ²
    e = federated.dp_epsilon(1.1, 0.01, 1000, 1e-5)
    assert federated.dp_epsilon(1.5, 0.01, 1000, 1e-5) < e < federated.dp_epsilon(1.1, 0.01, 2000, 1e-5)
    sigma = federated.dp_noise_multiplier(2.0, 1e-5, 0.01, 500)
    assert federated.dp_epsilon(sigma, 0.01, 500, 1e-5) <= 2.0 < federated.dp_epsilon(sigma * 0.995, 0.01, 500, 1e-5)
    assert federated.check_budget(2.0, 1e-5, sigma, 0.01, 500) <= 2.0


def test_budget_that_cannot_be_met_raises():
    pytest.importorskip("dp_accounting")
    with pytest.raises(ValueError, match="budget cannot be met.*noise_multiplier=2.0"):
        federated.dp_noise_multiplier(0.1, 1e-5, 1.0, 1000, max_noise_multiplier=2.0)
    with pytest.raises(ValueError, match="budget cannot be met.*spend"):
        federated.check_budget(1.0, 1e-5, 0.8, 0.1, 1000)
    with pytest.raises(ValueError, match="delta must be in"):
        federated.dp_epsilon(1.0, 0.1, 10, 1.5)
    with pytest.raises(ValueError, match="sample_rate"):
        federated.dp_epsilon(1.0, 0.0, 10, 1e-5)


def test_pfedlora_heterogeneous_clients_aggregate_adapters_only(base, lora):
    spec, trainable, frozen = lora

    def make_loss(width):  # client-specific local model: a private head of its own width
        def loss_fn(local, adapter, batch):
            x, y = batch
            h = _forward(spec, base, lorajax.combine(adapter, frozen), x)  # [B, OUT]
            return jnp.mean((jnp.tanh(h @ local["w1"]) @ local["w2"] - y) ** 2)

        return loss_fn

    widths = [3, 5]
    locals_ = [
        {
            "w1": jax.random.normal(jax.random.key(20 + w), (OUT, w)) / 2,
            "w2": jax.random.normal(jax.random.key(30 + w), (w, OUT)) / 2,
        }
        for w in widths
    ]
    txl, txa = optax.sgd(0.05), optax.sgd(0.1)
    steps = [jax.jit(functools.partial(federated.pfedlora_local, make_loss(w), txl, txa)) for w in widths]
    batches = [(_data(jax.random.key(40 + i), 2, 4), _data(jax.random.key(50 + i), 3, 4)) for i in range(2)]
    new_locals, glob, losses = federated.pfedlora_round(steps, locals_, trainable, batches, sizes=[1, 3])
    alone = [s(loc, trainable, lb, ab) for s, loc, (lb, ab) in zip(steps, locals_, batches)]
    _close(glob, federated.fedavg([a[1] for a in alone], weights=[1, 3]), rtol=1e-6)
    for got, (want, _, _) in zip(new_locals, alone):  # local models stay on the client, heterogeneous
        _close(got, want, rtol=1e-6)
    assert [nl["w1"].shape[1] for nl in new_locals] == widths and losses[0]["adapter"].shape == (3,)
    # identical clients, data and local models: one round equals the centralised alternating run
    same, glob2, _ = federated.pfedlora_round([steps[0]] * 3, [locals_[0]] * 3, trainable, [batches[0]] * 3)
    _close(glob2, alone[0][1], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="one step, local model and batches per client"):
        federated.pfedlora_round(steps, locals_[:1], trainable, batches)
