"""A jit-compiled LoRA train step ``(params, state, batch) -> (state, metrics)`` on a `TrainState`.

Only ``state.trainable`` is differentiated. The frozen base ``params`` and the
frozen adapter buffers ``state.frozen`` are arguments, not differentiated, so
XLA never forms the weight-gradient matmuls ``xᵀ·dy`` of the frozen weights
(see ``shared/specs/performance.md`` §6.2): never take a gradient over the
whole tree and mask it afterwards.

The metrics stay on the device (``float()`` them only when logging, so that
steps are dispatched without waiting for the previous one).

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
  >>> state = lorajax.train.TrainState.create(tx, trainable, frozen)
  >>> state, metrics = step(params, state, jnp.ones((2, 4)))
  >>> int(state.step), bool(metrics["loss"] > 0), bool(metrics["finite"])
  (1, True, True)
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from lorajax.adapters import combine, update_state
from lorajax.spec import Spec
from lorajax.train.state import TrainState

__all__ = ["make_lora_step", "refresh_state"]


def make_lora_step(
    loss_fn: Callable[[Any, Any, Any], Any],
    tx: optax.GradientTransformation,
    *,
    jit: bool = True,
    state_update: Callable | None = None,
    skip_nonfinite: bool = False,
) -> Callable:
    """``step(params, state, batch) -> (state, metrics)``: one optimiser step of ``state.trainable``.

    Args:
      loss_fn: ``loss_fn(params, combined, batch) -> loss`` or ``-> (loss, aux)``,
        ``combined`` being ``combine(state.trainable, state.frozen)`` and
        ``loss`` a scalar; ``aux`` is what the adapted forward returns with
        ``aux=True`` (routing statistics; ``{}`` for other variants).
      tx: an optax transformation over the trainable tree (the one that made ``state.opt_state``).
      jit: compile the step; the state passed in is donated (its buffers are
        reused for the new state: do not use it afterwards). ``params`` is not donated.
      state_update: for variants with load-balancing buffers (FlyLoRA, SMoRA):
        ``state_update(params, combined, aux) -> combined`` refreshing frozen
        leaves after the optimiser step, e.g. `refresh_state` ``(spec)``; only
        the frozen leaves of its result are kept (trainable leaves change only
        by the optimiser). ``loss_fn`` must then return ``(loss, aux)``.
      skip_nonfinite: a step whose loss or any gradient leaf is not finite
        leaves ``trainable``, ``frozen`` and ``opt_state`` as they were (selected
        on the device with ``jnp.where``, no host sync); ``step`` still
        advances, so ``batch_fn(step)`` stays the same function of the step.
        (``optax.apply_if_finite`` would do it for the optimiser only, and
        changes the structure of ``opt_state``; this keeps it, and covers the
        ``state_update`` refresh of ``frozen`` too.)

    Returns:
      ``step``. Its ``metrics`` are device arrays: ``loss`` (float32 []) and
      ``finite`` (bool []: the loss and every gradient leaf are finite).
    """

    def step(params: Any, state: TrainState, batch: Any) -> tuple[TrainState, dict]:
        def loss_of(trainable):
            out = loss_fn(params, combine(trainable, state.frozen), batch)
            return out if isinstance(out, tuple) else (out, None)

        (loss, aux), grads = jax.value_and_grad(loss_of, has_aux=True)(state.trainable)
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        frozen = state.frozen
        if state_update is not None:
            if aux is None:
                raise ValueError("state_update needs loss_fn to return (loss, aux), got a bare loss")
            refreshed = state_update(params, combine(trainable, frozen), jax.lax.stop_gradient(aux))
            frozen = jax.tree.map(
                lambda f, new: None if f is None else new, frozen, refreshed, is_leaf=lambda x: x is None
            )
        finite = jnp.isfinite(loss)
        for g in jax.tree.leaves(grads):
            finite = finite & jnp.all(jnp.isfinite(g))
        if skip_nonfinite:
            trainable, frozen, opt_state = _keep_if(
                finite, (trainable, frozen, opt_state), (state.trainable, state.frozen, state.opt_state)
            )
        # flax.struct.dataclass adds .replace
        new = state.replace(step=state.step + 1, trainable=trainable, frozen=frozen, opt_state=opt_state)  # type: ignore[attr-defined]
        return new, {"loss": loss, "finite": finite}

    if not jit:
        return step
    return jax.jit(step, donate_argnums=(1,))


def _keep_if(ok: jax.Array, new: Any, old: Any) -> Any:
    """``new`` where ``ok`` (a bool scalar) else ``old``, leaf by leaf (None leaves stay None)."""
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def refresh_state(spec: Spec) -> Callable:
    """``state_update`` for `make_lora_step` / `fit` on a plain adapters tree: `lorajax.update_state`.

    For variants without load-balancing state ``aux`` is ``{}`` and the adapters come back unchanged.
    """
    return lambda params, adapters, aux: update_state(spec, params, adapters, aux)
