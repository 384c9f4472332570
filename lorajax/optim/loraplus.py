"""LoRA+: the same optimiser with a larger learning rate for B than for A.

Rule: ``lr_A = lr``, ``lr_B = λ·lr`` (``λ = lr_ratio``, ≥ 1), via
``optax.multi_transform`` over the roles of `lorajax.optim.leaf_labels`. Leaves
other than the factors (a head, biases, DoRA's magnitude) get ``lr``, or with
``one_d_as_b=True`` every 1-D leaf gets ``λ·lr`` as in the official grouping
(``lora_B`` in the name **or** a 1-D parameter). Schedules are scaled too:
``lr_B(t) = λ·lr(t)``. ``λ = 1`` is the plain optimiser, bit for bit. Signature as every lorajax
optimiser: ``learning_rate`` first, keywords after.

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

from lorajax.optim._checks import check
from lorajax.optim.labels import leaf_labels

__all__ = ["loraplus", "scaled_lr"]


def scaled_lr(learning_rate: Any, factor: Any) -> Any:
    """``factor · learning_rate`` for a float or an optax schedule."""
    if callable(learning_rate):
        return lambda count: factor * learning_rate(count)
    return factor * learning_rate


def loraplus(
    learning_rate: optax.ScalarOrSchedule,
    *,
    lr_ratio: float,
    optimizer: Callable[[Any], optax.GradientTransformation] | None = None,
    one_d_as_b: bool = False,
) -> optax.GradientTransformation:
    """``optimizer(lr)`` for A and other leaves, ``optimizer(λ·lr)`` for B.

    Args:
      learning_rate: float or optax schedule for A.
      lr_ratio: ``λ = lr_B / lr_A`` (the paper recommends ≥ 1; e.g. 16).
      optimizer: a factory ``learning_rate -> GradientTransformation`` (default
        ``optax.adamw``); bind other hyper-parameters with ``functools.partial``,
        e.g. ``partial(optax.adamw, weight_decay=0.1)``. Under
        ``optax.inject_hyperparams`` pass ``static_args="optimizer"`` with it.
      one_d_as_b: put every 1-D non-factor leaf in B's group (official quirk).
    """
    check("lr_ratio", lr_ratio, lambda v: v > 0, "a positive number")
    make = optax.adamw if optimizer is None else optimizer
    base = make(learning_rate)
    fast = make(scaled_lr(learning_rate, lr_ratio))

    def labels(params):
        def group(label):
            return "fast" if label == "B" else "base"

        return jax.tree.map(group, leaf_labels(params, one_d_as="B" if one_d_as_b else None))

    return optax.multi_transform({"base": base, "fast": fast}, labels)
