"""`TrainState`: everything a training run changes, as one pytree.

The step of `make_lora_step` and the loop `fit` take and return one
``TrainState``; a checkpoint is this state (plus a JSON dict of metadata).
The frozen base ``params`` are not part of it: they never change, are never
differentiated nor checkpointed, and are passed to the step as their own
(non-donated) argument.

Example:
  >>> import jax.numpy as jnp, optax, lorajax
  >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
  >>> spec = lorajax.Spec("lora", rank=2, targets=["dense"])
  >>> trainable, frozen = lorajax.partition(spec, lorajax.init(spec, params, 0))
  >>> state = lorajax.train.TrainState.create(optax.adam(1e-3), trainable, frozen)
  >>> int(state.step), state.combined["dense"]["kernel"]["lora_A"].shape
  (0, (4, 2))
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from lorajax.adapters import combine

__all__ = ["TrainState"]


@struct.dataclass
class TrainState:
    """The state of a training run (a pytree of arrays; no functions, so it checkpoints as is).

    ``trainable`` and ``frozen`` are the two halves of `lorajax.partition`
    (each has ``None`` where a leaf belongs to the other); they may hold more
    than adapters, e.g. ``{"adapters": ..., "head": ...}`` or, for full
    fine-tuning, the model's own weights as ``trainable`` and a tree of
    ``None`` as ``frozen``.
    """

    step: jax.Array  # int32 []: optimiser steps taken so far
    trainable: Any  # the leaves being trained: the only tree that is differentiated and updated by the optimiser
    frozen: Any  # adapter buffers that are not trained (VeRA's random matrices, FlyLoRA/SMoRA's routing biases
    #              refreshed by `make_lora_step`'s ``state_update``); None at the trainable leaves
    opt_state: Any  # ``tx.init(trainable)``: the optimiser's state (moments, counts, projectors, ...)

    @classmethod
    def create(cls, tx: optax.GradientTransformation, trainable: Any, frozen: Any = None) -> "TrainState":
        """A step-0 state: ``opt_state = tx.init(trainable)``; ``frozen=None`` means nothing is frozen.

        Arrays that appear at two places of the state (an optimiser whose
        ``init`` returns one array twice, say) are copied, so that the state
        can be donated to the jitted step.
        """
        if frozen is None:
            frozen = jax.tree.map(lambda _: None, trainable)
        state = cls(step=jnp.zeros((), jnp.int32), trainable=trainable, frozen=frozen, opt_state=tx.init(trainable))
        return _unaliased(state)

    @property
    def combined(self) -> Any:
        """``combine(trainable, frozen)``: the whole tree the loss function sees."""
        return combine(self.trainable, self.frozen)


def _unaliased(tree: Any) -> Any:
    """``tree`` with every leaf its own buffer: the jitted step donates the state, and one array at two
    places would make XLA donate a buffer twice."""
    seen: set[int] = set()

    def one(x):
        if isinstance(x, jax.Array) and id(x) in seen:
            return jnp.copy(x)
        seen.add(id(x))
        return x

    return jax.tree.map(one, tree)
