"""Load-balancing state: adapt(..., aux=True) -> update_state, and the train step.

Uses a toy routing-style variant registered for the test only: ``y = x W + (x A) B``
with statistics ``counts[j] = #tokens with (x A)[:, j] > 0`` and the frozen
buffer ``seen += counts``.
"""

import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lorajax
from lorajax import registry
from lorajax.variants.base import EVAL, Variant


def _init(key, w, t):
    return {"A": jax.random.normal(key, (w.shape[0], t.rank)), "B": jnp.zeros((t.rank, w.shape[1])),
            "seen": jnp.zeros((t.rank,))}


def _apply(x, w, adapter, t, ctx=EVAL):
    h = x @ adapter["A"]
    ctx.sow({"counts": jnp.sum(h > 0, axis=0).astype(jnp.float32)})
    return x @ w + h @ adapter["B"]


def _update(adapter, aux, t):
    return {"seen": adapter["seen"] + aux["counts"]}


@pytest.fixture(autouse=True)
def toy_variant(monkeypatch):
    module = types.ModuleType("lorajax.variants._toy_aux")
    module.VARIANT = Variant(name="toy_aux", init=_init, adapted=None, apply=_apply, update=_update,
                             buffers=("seen",))
    monkeypatch.setitem(sys.modules, "lorajax.variants._toy_aux", module)
    monkeypatch.setitem(registry._MODULES, "toy_aux", "_toy_aux")


class Twice(nn.Module):
    """The same Dense called twice: its statistics add up."""

    @nn.compact
    def __call__(self, x):
        dense = nn.Dense(4, name="d")
        return nn.Dense(3, name="out")(dense(x) + dense(x[::-1]))


def _setup():
    model = Twice()
    x = jax.random.normal(jax.random.key(0), (5, 4))
    variables = model.init(jax.random.key(1), x)
    spec = lorajax.Spec("toy_aux", rank=3, targets=["d", "out"])
    return model, x, variables, spec, lorajax.init(spec, variables, 2)


def test_aux_collected_per_target_and_summed_over_calls():
    model, x, variables, spec, adapters = _setup()
    fwd = lorajax.adapt(model.apply, spec, mode="factored", aux=True)  # decided when adapt is built
    out, aux = jax.jit(fwd)(variables, adapters, x)
    np.testing.assert_allclose(out, fwd(variables, adapters, x)[0])
    a_d = adapters["params"]["d"]["kernel"]["A"]
    want = np.sum(np.asarray(x @ a_d) > 0, 0) + np.sum(np.asarray(x[::-1] @ a_d) > 0, 0)
    np.testing.assert_array_equal(aux["params"]["d"]["kernel"]["counts"], want)
    assert set(aux["params"]) == {"d", "out"}

    new = lorajax.update_state(spec, variables, adapters, aux)
    np.testing.assert_array_equal(new["params"]["d"]["kernel"]["seen"], want)
    assert new["params"]["d"]["kernel"]["A"] is adapters["params"]["d"]["kernel"]["A"]
    np.testing.assert_array_equal(adapters["params"]["d"]["kernel"]["seen"], 0)  # not mutated


def test_update_state_bare_params_and_errors():
    model, x, variables, spec, adapters = _setup()
    fwd = lorajax.adapt(model.apply, spec, mode="factored")
    _, aux = fwd(variables, adapters, x, adapter_aux=True)
    bare = {"d": adapters["params"]["d"], "out": adapters["params"]["out"]}
    new = lorajax.update_state(spec, variables["params"], bare, aux)
    assert float(new["d"]["kernel"]["seen"].sum()) > 0
    with pytest.raises(ValueError, match="not an adapted weight"):
        lorajax.update_state(spec, variables, adapters, {"nope": {"kernel": {"counts": jnp.ones(3)}}})
    lora = lorajax.Spec("lora", rank=2, targets=["d"])
    with pytest.raises(ValueError, match="keeps no routing state"):
        lorajax.update_state(lora, variables, lorajax.init(lora, variables, 0), aux)


def test_train_step_refreshes_frozen_state():
    model, x, variables, spec, adapters = _setup()
    fwd = lorajax.adapt(model.apply, spec, mode="factored")

    def loss_fn(params, adapters, batch):
        out, aux = fwd(params, adapters, batch, adapter_aux=True)
        return jnp.mean(out ** 2), aux

    tx = optax.sgd(0.1)
    trainable, frozen = lorajax.partition(spec, adapters)
    step = lorajax.train.make_lora_step(loss_fn, tx, state_update=lorajax.train.refresh_state(spec))
    state = lorajax.train.TrainState.create(tx, trainable, frozen)
    seen0 = np.asarray(frozen["params"]["d"]["kernel"]["seen"]).copy()
    state, metrics = step(variables, state, x)
    assert np.isfinite(float(metrics["loss"])) and bool(metrics["finite"])
    assert state.frozen["params"]["d"]["kernel"]["A"] is None  # still the frozen half only
    assert float(np.sum(np.asarray(state.frozen["params"]["d"]["kernel"]["seen"]) - seen0)) > 0
    assert state.trainable["params"]["d"]["kernel"]["seen"] is None


def test_state_update_needs_aux():
    model, x, variables, spec, adapters = _setup()
    fwd = lorajax.adapt(model.apply, spec, mode="factored")
    tx = optax.sgd(0.1)
    step = lorajax.train.make_lora_step(lambda p, a, b: jnp.mean(fwd(p, a, b) ** 2), tx,
                                        state_update=lorajax.train.refresh_state(spec))
    with pytest.raises(ValueError, match="state_update needs loss_fn to return"):
        step(variables, lorajax.train.TrainState.create(tx, *lorajax.partition(spec, adapters)), x)


def test_refresh_state_leaves_other_variants_unchanged():
    """A variant without routing state returns aux == {}: refresh_state is then the identity."""
    model, x, variables, _, _ = _setup()
    spec = lorajax.Spec("lora", rank=2, targets=["d"])
    adapters = lorajax.init(spec, variables, 0)
    fwd = lorajax.adapt(model.apply, spec, mode="factored")

    def loss_fn(params, adapters, batch):
        out, aux = fwd(params, adapters, batch, adapter_aux=True)
        return jnp.mean(out ** 2), aux

    tx = optax.sgd(0.1)
    step = lorajax.train.make_lora_step(loss_fn, tx, state_update=lorajax.train.refresh_state(spec))
    state, metrics = step(variables, lorajax.train.TrainState.create(tx, *lorajax.partition(spec, adapters)), x)
    assert int(state.step) == 1 and bool(metrics["finite"])


def test_variant_needs_a_forward_and_typed_options():
    with pytest.raises(ValueError, match="adapted .mergeable. or apply"):
        Variant(name="bad", init=_init, adapted=None)
    with pytest.raises(TypeError, match="Options dataclass"):
        Variant(name="bad", init=_init, adapted=None, apply=_apply, options={"x": 1})


def test_fit_checkpoints_the_refreshed_state(tmp_path):
    """fit with state_update: buffers evolve, are checkpointed, and a resumed run ends identical."""
    model, x, variables, spec, adapters = _setup()
    fwd = lorajax.adapt(model.apply, spec, mode="factored")

    def loss_fn(params, adapters, batch):
        out, aux = fwd(params, adapters, batch, adapter_aux=True)
        return jnp.mean(out ** 2), aux

    tx = optax.adam(1e-2)
    state0 = lorajax.train.TrainState.create(tx, *lorajax.partition(spec, adapters))
    batch_fn = lambda step: x * (1.0 + 0.1 * step)  # noqa: E731
    kw = dict(state_update=lorajax.train.refresh_state(spec), progress=False, ckpt_every=2, log_every=2)
    full, _ = lorajax.train.fit(loss_fn, tx, variables, state0, batch_fn, 6, out_dir=str(tmp_path / "a"), **kw)
    lorajax.train.fit(loss_fn, tx, variables, state0, batch_fn, 4, out_dir=str(tmp_path / "b"), **kw)
    resumed, _ = lorajax.train.fit(loss_fn, tx, variables, state0, batch_fn, 6, out_dir=str(tmp_path / "b"), **kw)
    assert float(full.frozen["params"]["d"]["kernel"]["seen"].sum()) > 0
    assert int(full.step) == int(resumed.step) == 6
    assert int(state0.step) == 0  # fit copies the state it is given: the caller's stays valid
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(a, b)
    # without out_dir, fit continues from the state's own step
    part, _ = lorajax.train.fit(loss_fn, tx, variables, state0, batch_fn, 4, progress=False, **{
        k: v for k, v in kw.items() if k != "progress"})
    cont, hist = lorajax.train.fit(loss_fn, tx, variables, part, batch_fn, 6, progress=False, **{
        k: v for k, v in kw.items() if k != "progress"})
    assert [h["step"] for h in hist] == [6]
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(cont)):
        np.testing.assert_array_equal(a, b)


def test_fit_survives_an_optimiser_whose_state_aliases_one_array():
    """An init that returns the same array twice must not make the donating step fail."""
    def init(params):
        z = jax.tree.map(jnp.zeros_like, params)
        return (z, z)  # aliased on purpose

    def update(g, state, params=None):
        return jax.tree.map(lambda x: -1e-3 * x, g), (g, g)

    tx = optax.GradientTransformation(init, update)
    params = {"d": {"kernel": jnp.ones((4, 3))}}
    spec = lorajax.Spec("lora", rank=2, targets=["d"], init_weights=False)
    trainable, frozen = lorajax.partition(spec, lorajax.init(spec, params, 0))

    def loss_fn(p, a, x):
        return jnp.sum((x @ lorajax.merge(spec, p, a)["d"]["kernel"]) ** 2)

    state = lorajax.train.TrainState.create(tx, trainable, frozen)
    out, hist = lorajax.train.fit(loss_fn, tx, params, state, lambda s: jnp.ones((2, 4)), 3,
                                  progress=False, log_every=1)
    assert len(hist) == 3 and hist[-1]["loss"] < hist[0]["loss"]
