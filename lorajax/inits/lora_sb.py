"""LoRA-SB: LoRA-XS's frozen factors and r × r core from the SVD of an approximate first update.

LoRA-SB trains the LoRA-XS architecture (``W' = W + s · A R B`` with A, B
frozen and only ``R: [r, r]`` trained, `lorajax.variants.lora_xs`) but
initialises it so that the adapter already holds an approximation of the
first step of full fine-tuning with Adam, whose first update is
``-η · sign(gradient)``. Maths (Flax orientation, ``K: [in, out]``,
``Ḡ = ∂L/∂K`` averaged over batches, see `lorajax.inits.estimate_gradients`)::

    D = -η · sign(Ḡ)                       [in, out], the approximate first update
    D ≈ U_r diag(σ_1..σ_r) V_rᵀ             top-r SVD (float32)
    lora_A = U_r       : [in, r]   frozen,  lora_Aᵀ lora_A = I_r
    lora_B = V_rᵀ      : [r, out]  frozen,  lora_B lora_Bᵀ = I_r
    lora_R = diag(σ) / s : [r, r]  trained
    s · lora_A lora_R lora_B = trunc_r(D)   (best rank-r approximation of D)

The official code fixes ``α = r`` (``s = 1``, "hyperparameter independent"),
so ``R = diag(σ)``; lorajax divides by ``s`` so that the adapter holds
``trunc_r(D)`` whatever α is (identical at α = r). In PyTorch orientation
(the official code: ``lora_A.weight = U_rᵀ``, ``lora_B.weight = V_r``,
``default_lora_latent_mapping.weight = diag(σ)``) this is the SVD of
``Dᵀ = -η sign(∂L/∂W)``, the same factors transposed.

η is the learning rate of the first optimiser step. The official scripts use
``η = lr / (warmup_ratio · total_steps)`` (the first step of a linear warm-up;
``total_steps = len(estimation loader) × epochs``); see `warmup_first_lr`.
Because ``trunc_r(η M) = η trunc_r(M)``, η only scales R.

The base is NOT shifted (as in the official code): the model starts at
``W + trunc_r(D)``, i.e. already one approximate step away from ``W``. To
start from the unchanged function instead, shift it yourself:
``residual = lorajax.unmerge(spec, params, adapters)`` gives
``W - s·A R B``, and ``merge(spec, residual, adapters) == params``.

Gradient of R: ``∂L/∂R = s · lora_Aᵀ Ḡ lora_Bᵀ``, so a step on R moves the
weight by ``-η s² A Aᵀ Ḡ Bᵀ B``: the two-sided projection of the full
gradient onto the fixed subspaces.

Differences from the official code (RaghavSinghal10/lora-sb): the SVD is
exact by default (``niter=10`` uses the randomized SVD with q = r and 10
power iterations, as its ``torch.svd_lowrank(Dᵀ, q=r, niter=10)``); factors
are stored in the adapter dtype (the official code rounds U, σ, V to
bfloat16); the gradient is the mean of the per-batch gradients, whose sign
equals the official sum of ``loss / batch_size`` gradients when all batches
have the same size.

Example:
  >>> import jax, jax.numpy as jnp, lorajax
  >>> params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (8, 6))}}
  >>> grads = {"dense": {"kernel": jax.random.normal(jax.random.key(1), (8, 6))}}
  >>> spec = lorajax.Spec("lora_xs", rank=2, alpha=2, targets=["dense"])
  >>> ad = lorajax.inits.lora_sb(spec, params, grads, lr=1e-3)["dense"]["kernel"]
  >>> ad["lora_A"].shape, ad["lora_R"].shape, ad["lora_B"].shape
  ((8, 2), (2, 2), (2, 6))
  >>> bool(jnp.allclose(ad["lora_A"].T @ ad["lora_A"], jnp.eye(2), atol=1e-5))
  True

References:
  Ponkshe, Singhal, Gorbunov, Tumanov, Horvath, Vepakomma, "Initialization
  using Update Approximation is a Silver Bullet for Extreme Efficient
  Low-Rank Fine-Tuning", arXiv:2411.19557; official code
  RaghavSinghal10/lora-sb (commit 37b33d4c) ``utils/gradient_utils.py``
  (``estimate_and_process_grads_torch``), ``utils/initialization_utils.py``
  (``find_and_initialize_grad``), ``utils/svd_utils.py`` (``get_svd_grad``),
  ``train_arithmetic.py`` (``eff_lr``, ``lora_alpha = lora_r``). Not in PEFT.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from lorajax import adapters as adapters_lib
from lorajax import registry, targets
from lorajax.adapters import target_key
from lorajax.inits._svd import top_svd
from lorajax.inits.gradients import lookup
from lorajax.plan import nest
from lorajax.spec import Spec
from lorajax.variants import lora_xs

__all__ = ["lora_sb", "first_update", "warmup_first_lr"]


def warmup_first_lr(lr: float, warmup_ratio: float, total_steps: int) -> float:
    """The official η: ``lr / (warmup_ratio · total_steps)``, the first step of a linear warm-up."""
    if not (warmup_ratio > 0 and total_steps > 0):
        raise ValueError(f"warmup_ratio and total_steps must be > 0, got {warmup_ratio!r}, {total_steps!r}")
    return lr / (warmup_ratio * total_steps)


def first_update(grad: jax.Array, lr: float) -> jax.Array:
    """``D = -lr · sign(grad)`` (float32): Adam's first step, bias-corrected and without ε."""
    return -lr * jnp.sign(jnp.asarray(grad, jnp.float32))


def lora_sb(
    spec: Spec, params: Any, grads: Any, *, lr: float, niter: int | None = None, key: jax.Array | None = None
) -> dict:
    """LoRA-SB adapters for a ``"lora_xs"`` Spec (the base is not changed: see the module docstring).

    Args:
      spec: a ``"lora_xs"`` Spec (its ``r_init_std`` is ignored; ``dtype`` applies).
      params: the base params.
      grads: averaged full-weight gradients of the targeted weights
        (`lorajax.inits.estimate_gradients`).
      lr: η, the step size of the approximated first update (> 0), e.g.
        ``warmup_first_lr(lr, warmup_ratio, total_steps)``.
      niter: None for the exact SVD; an int for the randomized SVD (q = r)
        with that many power iterations (official: 10).
      key: PRNG key for the randomized SVD (default key 0).

    Returns:
      The adapters tree ``{path: {"lora_A", "lora_R", "lora_B"}}``.
    """
    if registry.get(spec.variant).init is not lora_xs.init:  # the LoRA-XS architecture, under any alias
        raise ValueError(f"LoRA-SB initialises the 'lora_xs' architecture; got variant {spec.variant!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if niter is not None and (isinstance(niter, bool) or not isinstance(niter, int) or niter < 0):
        raise ValueError(f"niter must be a non-negative int or None (exact SVD), got {niter!r}")
    key = jax.random.key(0) if key is None else key
    selected = targets.select(spec, params)
    weights = dict(targets.weight_leaves(params))
    flat = {}
    for t in selected:
        g = adapters_lib.as_matrix(lookup(grads, t.keys, t.shape), t)
        d = first_update(g, lr)
        u, sv, vh = top_svd(d, t.rank, niter=niter, q=t.rank, key=target_key(key, t))
        dtype = lora_xs._dtype(t, jnp.asarray(weights[t.keys]))
        flat[t.keys] = {
            "lora_A": u.astype(dtype),
            "lora_R": (jnp.diag(sv) / lora_xs.scaling(t)).astype(dtype),
            "lora_B": vh.astype(dtype),
        }
    return nest(flat)
