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

from lorajax.adapters import combine, update_state
from lorajax.spec import Spec


def make_lora_step(loss_fn: Callable[[Any, Any, Any], Any], tx: optax.GradientTransformation,
                   *, jit: bool = True, state_update: Callable | None = None) -> Callable:
    """``step(params, trainable, frozen, opt_state, batch) -> (trainable, opt_state, loss)``.

    Args:
      loss_fn: ``loss_fn(params, adapters, batch) -> scalar``; with
        ``state_update``, ``-> (scalar, aux)`` where ``aux`` comes from the
        adapted forward called with ``adapter_aux=True``.
      tx: an optax transformation over the trainable adapter tree.
      jit: compile the step (donating the trainable tree and optimiser state).
      state_update: for variants with load-balancing buffers (FlyLoRA, SMoRA):
        ``state_update(params, combined, aux) -> combined`` refreshing frozen
        leaves, e.g. `refresh_state` ``(spec)``; the step then returns
        ``(trainable, frozen, opt_state, loss)`` (only the frozen leaves of
        the result are kept: trainable leaves change only by the optimiser).
    """

    def step(params, trainable, frozen, opt_state, batch):
        def loss_of(tr):
            return loss_fn(params, combine(tr, frozen), batch)

        if state_update is None:
            loss, grads = jax.value_and_grad(loss_of)(trainable)
        else:
            (loss, aux), grads = jax.value_and_grad(loss_of, has_aux=True)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        if state_update is None:
            return trainable, opt_state, loss
        refreshed = state_update(params, combine(trainable, frozen), jax.lax.stop_gradient(aux))
        frozen = jax.tree.map(lambda f, new: None if f is None else new, frozen, refreshed,
                              is_leaf=lambda x: x is None)
        return trainable, frozen, opt_state, loss

    if not jit:
        return step
    return jax.jit(step, donate_argnums=(1, 2, 3) if state_update is not None else (1, 3))


def refresh_state(spec: Spec) -> Callable:
    """``state_update`` for `make_lora_step` / `fit` on a plain adapters tree: `lorajax.update_state`."""
    return lambda params, adapters, aux: update_state(spec, params, adapters, aux)
