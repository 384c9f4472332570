"""A jit-compiled LoRA train step that differentiates only the trainable adapter leaves.

The frozen base ``params`` and frozen adapter buffers are arguments, not
differentiated, so XLA never forms the weight-gradient matmuls ``xᵀ·dy`` of the
frozen weights (see ``shared/specs/performance.md`` §6.2): never take a
gradient over the whole tree and mask it afterwards.

Example:
  >>> import jax, jax.numpy as jnp, optax, lorajax
  >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
  >>> spec = lorajax.Spec("lora", rank=2, targets=["dense"], init_weights=False)
  >>> trainable, frozen = lorajax.partition(spec, lorajax.init(spec, params, 0))
  >>> def loss_fn(params, adapters, x):
  ...     w = lorajax.merge(spec, params, adapters)["dense"]["kernel"]
  ...     return jnp.sum((x @ w) ** 2)
  >>> tx = optax.sgd(1e-3)
  >>> step = lorajax.train.make_lora_step(loss_fn, tx)
  >>> trainable2, _, loss = step(params, trainable, frozen, tx.init(trainable), jnp.ones((2, 4)))
  >>> bool(loss > 0)
  True
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax

from lorajax.adapters import combine


def make_lora_step(loss_fn: Callable[[Any, Any, Any], jax.Array], tx: optax.GradientTransformation,
                   *, jit: bool = True) -> Callable:
    """``step(params, trainable, frozen, opt_state, batch) -> (trainable, opt_state, loss)``.

    Args:
      loss_fn: ``loss_fn(params, adapters, batch) -> scalar``.
      tx: an optax transformation over the trainable adapter tree.
      jit: compile the step (donating the trainable tree and optimiser state).
    """

    def step(params, trainable, frozen, opt_state, batch):
        def loss_of(tr):
            return loss_fn(params, combine(tr, frozen), batch)

        loss, grads = jax.value_and_grad(loss_of)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(1, 3)) if jit else step
