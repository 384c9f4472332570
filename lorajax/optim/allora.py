"""ALLoRA: gradients scaled per row by a coefficient inversely proportional to the row's ℓ2 norm.

**Experimental: the exact formula is unverified.** The abstract fixes the idea
(LoRA without dropout and without the α/r factor; "scaling the per sample and
per parameter gradients with a coefficient inversely proportional to
parameters' ℓ2 norm"); the paper's constants could not be checked here and no
official code was found. lorajax implements the candidate form of
``specs/optim.md`` §2, every open choice an argument::

    c(θ_row) = 1 / sqrt(‖θ_row‖₂^p + 1/η²)        (p = power: 2 by default, 1 as some 3rd-party code)
    g_row ← c(θ_row) · g_row

``c(0) = η``: a zero-initialised B escapes at η times the base step; for
large rows (``p = 2``) ``c ≈ 1/‖θ_row‖``. Rows are PyTorch rows of the factors:
``A: [r, in]`` per rank, ``B: [out, r]`` per output unit, i.e. in lorajax's
Flax orientation (``lora_A: [in, r]``, ``lora_B: [r, out]``) the norm runs over
axis 0 (the leading axis) of every 2-D leaf; 1-D leaves use their whole
norm, scalars are left alone. The coefficient is recomputed every step from the
current parameters.

``position="post"`` (default) applies ``c`` to the base optimiser's update (a
per-row learning rate: with Adam a pre-scaling largely cancels in the
normalisation); ``"pre"`` scales the raw gradient. The model for ALLoRA is a
LoRA with scale 1: ``Spec("lora", rank=r, alpha=r)``.

Example:
  >>> import jax.numpy as jnp, lorajax
  >>> tx = lorajax.optim.allora(1e-3, eta=2.0)
  >>> tree = {"lora_B": jnp.zeros((2, 3))}
  >>> u, _ = tx.update({"lora_B": jnp.ones((2, 3))}, tx.init(tree), tree)
  >>> round(float(u["lora_B"][0, 0]), 6)  # Adam's first step is -lr, times c(0) = eta
  -0.002

References:
  Huang and Balestriero, "ALLoRA: Adaptive Learning Rate Mitigates LoRA Fatal
  Flaws", arXiv:2410.09692 (abstract). No official code found. Sources
  tried for the formula (arXiv HTML v1, OpenReview 7X65yoKl3Y, code search):
  ``docs/unverified.md``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from lorajax.optim._checks import check, is_number, is_traced

__all__ = ["allora_coefficient", "scale_by_allora", "allora"]


def allora_coefficient(theta: jax.Array, eta: float = 2.0, power: int = 2) -> jax.Array:
    """``1 / sqrt(‖θ_row‖^p + 1/η²)`` broadcastable to ``theta`` (rows = leading axis, see module doc)."""
    t = theta.astype(jnp.float32)
    if t.ndim == 0:
        return jnp.ones((), jnp.float32)
    if t.ndim == 1:
        norm = jnp.linalg.norm(t)
    else:
        norm = jnp.sqrt(jnp.sum(t * t, axis=0, keepdims=True))
    return jax.lax.rsqrt(norm**power + 1.0 / eta**2)


def scale_by_allora(eta: float = 2.0, power: int = 2) -> optax.GradientTransformation:
    """Multiply each leaf's update by `allora_coefficient` of its parameter."""
    check("eta", eta, lambda v: v > 0, "> 0")
    if not is_traced(power) and (not is_number(power) or power not in (1, 2)):
        raise ValueError(f"power must be 1 or 2, got {power!r}")

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("scale_by_allora needs params: call tx.update(grads, state, params)")
        return jax.tree.map(
            lambda u, p: (u * allora_coefficient(p, eta, power)).astype(u.dtype), updates, params
        ), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def allora(
    learning_rate: optax.ScalarOrSchedule,
    *,
    eta: float = 2.0,
    power: int = 2,
    position: str = "post",
    optimizer: Callable[[Any], optax.GradientTransformation] | None = None,
) -> optax.GradientTransformation:
    """``optimizer(learning_rate)`` with ALLoRA's per-row scaling after (``post``) or before (``pre``) it.

    Args:
      learning_rate: float or optax schedule.
      eta: ``η``, the coefficient at zero norm.
      power: ``p`` in ``‖θ_row‖^p`` (1 or 2).
      position: ``"post"`` (scale the base optimiser's update) or ``"pre"`` (the gradient).
      optimizer: a factory ``learning_rate -> GradientTransformation`` (default
        ``optax.adamw``; bind other hyper-parameters with ``functools.partial``;
        under ``optax.inject_hyperparams`` pass ``static_args="optimizer"``).
    """
    if position not in ("pre", "post"):
        raise ValueError(f"position must be 'pre' or 'post', got {position!r}")
    base = (optax.adamw if optimizer is None else optimizer)(learning_rate)
    scale = scale_by_allora(eta, power)
    return optax.chain(scale, base) if position == "pre" else optax.chain(base, scale)
