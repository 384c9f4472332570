"""The tiny resumable `fit` job the reliability tests share: LoRA r=2 on one 4x3 dense kernel, Adam, 2 x 4 batches.

One loss function and one optimiser object for every test, so the compiled step is built once per process.
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lorajax

PARAMS = {"dense": {"kernel": jnp.arange(12.0).reshape(4, 3) / 10}}
SPEC = lorajax.Spec("lora", rank=2, targets=["dense"], init_weights=False)
TX = optax.adam(1e-2)


def loss(params, adapters, x):
    return jnp.mean((x @ lorajax.merge(SPEC, params, adapters)["dense"]["kernel"] - 1.0) ** 2)


def batch(step):
    """The batch of ``step``: [2, 4] float32, a pure function of the step."""
    return jnp.asarray(np.random.default_rng([3, step]).normal(size=(2, 4)), jnp.float32)


def fresh_state():
    return lorajax.train.TrainState.create(TX, *lorajax.partition(SPEC, lorajax.init(SPEC, PARAMS, 0)))


def fit(out, steps, batch_fn=batch, **kw):
    """``lorajax.train.fit`` of a fresh state into ``out`` (checkpoints and log lines every 2 steps, keep 2)."""
    kw = {"ckpt_every": 2, "keep": 2, "log_every": 2, **kw}
    return lorajax.train.fit(loss, TX, PARAMS, fresh_state(), batch_fn, steps, out_dir=str(out), progress=False, **kw)


def state_bytes(tree):
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def _no_constant(name):
    raise ValueError(f"not strict JSON: {name}")


def strict_lines(path):
    """The JSON objects of a JSONL file, parsed strictly (NaN / Infinity raise)."""
    return [json.loads(line, parse_constant=_no_constant) for line in Path(path).read_text().splitlines()]
