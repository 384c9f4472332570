"""The LoRA train step on the char-LM: loss falls, no weight-gradient matmul is compiled (perf P3), NaN is flagged."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lorajax
from lorajax.models.char_lm import CharLM, Config, next_token_loss


@pytest.fixture(scope="module")
def lm():
    cfg = Config(vocab_size=17, dim=32, layers=2, heads=2, ffn=48, max_len=16)
    model = CharLM(cfg)
    tokens = jax.random.randint(jax.random.key(0), (4, 17), 0, cfg.vocab_size)
    variables = model.init(jax.random.key(1), tokens[:, :-1])
    return model, variables, tokens


def _frozen_shapes(variables):
    shapes = set()
    for w in jax.tree.leaves(variables):
        if w.ndim == 2:
            shapes |= {f"{w.shape[0]},{w.shape[1]}", f"{w.shape[1]},{w.shape[0]}"}
    return shapes


@pytest.mark.parametrize("mode", ["factored", "merged"])
def test_lora_step_has_no_weight_gradient_dot(lm, mode):
    model, variables, tokens = lm
    spec = lorajax.Spec("lora", rank=4, targets="all-linear")
    trainable, frozen = lorajax.partition(spec, lorajax.init(spec, variables, 0))
    fwd = lorajax.adapt(model.apply, spec, mode)

    def loss_fn(params, adapters, batch):
        return next_token_loss(fwd(params, adapters, batch[:, :-1]), batch)

    tx = optax.adamw(1e-2)
    step = lorajax.train.make_lora_step(loss_fn, tx, jit=False)
    args = (variables, lorajax.train.TrainState.create(tx, trainable, frozen), tokens)
    hlo = jax.jit(step).lower(*args).compile().as_text()
    dots = set(re.findall(r"f32\[([0-9,]+)\]\{[0-9,]*\} dot\(", hlo))
    assert dots, "no dots found: the HLO pattern is stale"
    if mode == "factored":
        assert not (_frozen_shapes(variables) & dots), f"weight-shaped dot in the LoRA step: {dots}"
    else:
        # positive control: merged mode forms W' = W + sAB and its full-size gradient by design,
        # so the same check must see weight-shaped dots there
        assert _frozen_shapes(variables) & dots


def test_lora_step_reduces_loss(lm):
    model, variables, tokens = lm
    spec = lorajax.Spec("lora", rank=4, alpha=8, targets="all-linear")
    trainable, frozen = lorajax.partition(spec, lorajax.init(spec, variables, 0))
    fwd = lorajax.adapt(model.apply, spec, "factored")

    def loss_fn(params, adapters, batch):
        return next_token_loss(fwd(params, adapters, batch[:, :-1]), batch)

    tx = optax.adam(1e-2)
    step = lorajax.train.make_lora_step(loss_fn, tx)
    state = lorajax.train.TrainState.create(tx, trainable, frozen)
    losses = []
    for _ in range(30):
        state, metrics = step(variables, state, tokens)
        losses.append(metrics["loss"])  # device arrays: no sync per step
    assert int(state.step) == 30 and bool(metrics["finite"])
    assert float(losses[-1]) < float(losses[0]) - 0.3
    # the base is untouched
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), variables,
                                     model.init(jax.random.key(1), tokens[:, :-1])))


def test_step_flags_non_finite_loss_or_gradients():
    params = {"d": {"kernel": jnp.ones((4, 3))}}
    spec = lorajax.Spec("lora", rank=2, targets=["d"], init_weights=False)
    trainable, frozen = lorajax.partition(spec, lorajax.init(spec, params, 0))

    def loss_fn(p, a, x):
        return jnp.sum(jnp.sqrt(x @ lorajax.merge(spec, p, a)["d"]["kernel"]))  # NaN for negative inputs

    tx = optax.sgd(1e-3)
    step = lorajax.train.make_lora_step(loss_fn, tx)  # donates the state: `trainable` is consumed
    state, m = step(params, lorajax.train.TrainState.create(tx, trainable, frozen), jnp.ones((2, 4)))
    assert bool(m["finite"]) and isinstance(m["finite"], jax.Array)
    _, m = step(params, state, -jnp.ones((2, 4)))
    assert not bool(m["finite"])

    def inf_grad(p, a, x):  # a finite loss whose gradient is not: d/dt sqrt(t) at t = 0
        return jnp.sum(jnp.sqrt(jnp.abs(x @ lorajax.merge(spec, p, a)["d"]["kernel"]) * 0.0))

    fresh = lorajax.train.TrainState.create(tx, *lorajax.partition(spec, lorajax.init(spec, params, 0)))
    _, m = lorajax.train.make_lora_step(inf_grad, tx)(params, fresh, jnp.ones((2, 4)))
    assert np.isfinite(float(m["loss"])) and not bool(m["finite"])


def test_train_state_create_unaliases_and_combines():
    def init(params):
        z = jax.tree.map(jnp.zeros_like, params)
        return (z, z)  # one array at two places

    tx = optax.GradientTransformation(init, lambda g, s, p=None: (g, s))
    state = lorajax.train.TrainState.create(tx, {"a": jnp.ones(3), "b": None}, {"a": None, "b": jnp.zeros(2)})
    assert state.opt_state[0]["a"] is not state.opt_state[1]["a"]
    assert state.step.dtype == jnp.int32 and int(state.step) == 0
    assert set(state.combined) == {"a", "b"} and state.combined["b"].shape == (2,)
    assert jax.tree.structure(lorajax.train.TrainState.create(tx, {"a": jnp.ones(3)}).frozen) == \
        jax.tree.structure({"a": None})
