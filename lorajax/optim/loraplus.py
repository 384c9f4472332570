"""LoRA+: the same optimiser with a larger learning rate for B than for A.

Rule: ``lr_A = lr``, ``lr_B = λ·lr`` (``λ = lr_ratio``, ≥ 1), via
``optax.multi_transform`` over the roles of `lorajax.optim.leaf_labels`. Leaves
other than the factors (a head, biases, DoRA's magnitude) get ``lr``, or with
``one_d_as_b=True`` every 1-D leaf gets ``λ·lr`` as in the official grouping
(``lora_B`` in the name **or** a 1-D parameter). Schedules are scaled too:
``lr_B(t) = λ·lr(t)``. ``λ = 1`` is the plain optimiser, bit for bit.

Example:
  >>> import jax, jax.numpy as jnp, optax, lorajax
  >>> tree = {"lora_A": jnp.ones((4, 2)), "lora_B": jnp.ones((2, 3))}
  >>> tx = lorajax.optim.loraplus(1e-3, lr_ratio=16.0)
  >>> grads = jax.tree.map(jnp.ones_like, tree)
  >>> updates, _ = tx.update(grads, tx.init(tree), tree)
  >>> round(float(updates["lora_B"][0, 0] / updates["lora_A"][0, 0]), 3)
  16.0

References:
  Hayou, Ghosh, Yu, "LoRA+: Efficient Low Rank Adaptation of Large Models",
  ICML 2024, arXiv:2402.12354. Official code nikhil-ghosh-berkeley/loraplus
  ``lora_plus.py`` (``create_loraplus_optimizer``: parameter groups and
  ``loraplus_lr_ratio``). PEFT: ``peft/optimizers/loraplus.py``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax

from lorajax.optim.labels import leaf_labels

__all__ = ["loraplus", "scaled_lr"]


def scaled_lr(learning_rate: Any, factor: float) -> Any:
    """``factor · learning_rate`` for a float or an optax schedule."""
    if callable(learning_rate):
        return lambda count: factor * learning_rate(count)
    return factor * learning_rate


def loraplus(learning_rate: Any, lr_ratio: float, *, optimizer: Callable[..., optax.GradientTransformation] = optax.adamw,
             one_d_as_b: bool = False, **optimizer_kwargs) -> optax.GradientTransformation:
    """``optimizer(lr)`` for A and other leaves, ``optimizer(λ·lr)`` for B.

    Args:
      learning_rate: float or optax schedule for A.
      lr_ratio: ``λ = lr_B / lr_A`` (the paper recommends ≥ 1; e.g. 16).
      optimizer: an optax optimiser factory taking ``learning_rate`` first
        (default ``optax.adamw``).
      one_d_as_b: put every 1-D non-factor leaf in B's group (official quirk).
      **optimizer_kwargs: passed to both ``optimizer`` calls (b1, b2, eps,
        weight_decay, ...).
    """
    if not isinstance(lr_ratio, (int, float)) or isinstance(lr_ratio, bool) or not lr_ratio > 0:
        raise ValueError(f"lr_ratio must be a positive number, got {lr_ratio!r}")
    base = optimizer(learning_rate, **optimizer_kwargs)
    fast = optimizer(scaled_lr(learning_rate, float(lr_ratio)), **optimizer_kwargs)

    def labels(params):
        def group(label):
            return "fast" if label == "B" else "base"

        return jax.tree.map(group, leaf_labels(params, one_d_as="B" if one_d_as_b else None))

    return optax.multi_transform({"base": base, "fast": fast}, labels)
