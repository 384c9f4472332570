"""LoRA-GA: LoRA's A and B from the SVD of the full-weight gradient; the base is shifted by their product.

Maths as in PEFT's ``init_lora_weights="lora_ga"`` (PyTorch orientation,
``W = Kᵀ: [m=out, n=in]``, ``Ḡ = ∂L/∂W`` averaged over batches, see
`lorajax.inits.estimate_gradients`)::

    Ḡ ≈ U diag(S) Vᵀ               top 2r triplets; randomized SVD with q = min(4r, m, n)
                                    and 4 power iterations (torch.svd_lowrank), float32
    direction "ArB2r" (default):   A = V[:, :r]ᵀ              : [r, n]
                                    B = U[:, r:2r] diag(S[r:2r]) : [m, r]
              "A2rBr":             A = V[:, r:2r]ᵀ,  B = U[:, :r] diag(S[:r])
              "ArBr":              A = V[:, 1:2r:2]ᵀ, B = U[:, 0:2r:2] diag(S[0:2r:2])
              "random":            I = the first r of a random permutation of 0..2r-1,
                                    A = V[:, I]ᵀ, B = U[:, I] diag(S[I])
    scale "stable" (default):      B ← B · m^{1/4} / √γ          (γ = stable_gamma = 16)
          "weight_svd":            B ← B · σ₁(W) / S_B[0]        (if S_B[0] > 0)
          "gd_scale":              A ← A / s,  B ← B / s
          "unit":                  unchanged
    A, B rounded to the base weight's dtype
    W_res = W - s · B A            (float32, then cast to W's dtype)

so ``W_res + s·B A = W`` and the model computes the same function at init
(``s = α/r``, or ``α/√r`` with ``use_rslora``). ``m`` in "stable" is the
output size (PEFT reads ``weight.shape[0]``, which for a GPT-2 ``Conv1D`` is
the input size instead; lorajax always uses the output size). In lorajax's
Flax orientation ``lora_A = Aᵀ: [in, r]``, ``lora_B = Bᵀ: [r, out]`` and the
returned params hold ``K_res = W_resᵀ``.

Why: plain SGD on both factors moves ``W`` by ``-η s² (B Bᵀ Ḡ + Ḡ Aᵀ A)`` at
the first step; with ``A = V_rᵀ`` the second term is the gradient's own top-r
part ``U_r S_r V_rᵀ``, so LoRA's first step follows full fine-tuning's
leading directions.

Signs: singular vectors are unique up to paired signs, and ArB2r pairs A's
row i with B's column r+i, so the signs change ``B A`` (not only A and B).
PEFT leaves them to LAPACK and to the random sketch; lorajax fixes them (each
column of U has its largest-magnitude entry positive), which makes the init
deterministic; the parity test gives PEFT's ``torch.svd_lowrank`` the same
sign rule. ``niter=None`` takes the exact SVD instead of the randomized one
(equal when ``4r >= min(m, n)``).

Differences from the authors' code (Outsider565/LoRA-GA ``lora_ga_init``,
``source="official"``): B takes no singular values (``B = U[:, r:2r]``);
"stable" scales both A and B by ``m^{1/4}/√γ``; the scales are named "gd",
"unit", "stable", "weightS" (A and B times ``mean_{i<r} √(σ_i(W)/s)``, with
``σ`` from ``svd_lowrank(W, q=4r, niter=4)``); "random" draws A's and B's
indices as the two halves of one permutation of 0..2r-1; A and B are not
rounded before the shift (its ``dtype="fp32"`` default); its optional
``norm_clip`` (off by default) is not implemented. With unscaled
factors ``B Bᵀ Ḡ + Ḡ Aᵀ A = U_{2r} S_{2r} V_{2r}ᵀ``, the best rank-2r
approximation of the gradient.

Saving for the original base: the trained adapter lives on ``W_res``; use
`lorajax.inits.to_plain_lora` to express it as a rank-2r LoRA on the
original weights (PEFT's ``path_initial_model_for_weight_conversion``).

Example:
  >>> import jax, jax.numpy as jnp, lorajax
  >>> params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (8, 6))}}
  >>> grads = {"dense": {"kernel": jax.random.normal(jax.random.key(1), (8, 6))}}
  >>> spec = lorajax.Spec("lora", rank=2, alpha=4, targets=["dense"])
  >>> adapters, residual = lorajax.inits.lora_ga(spec, params, grads)
  >>> merged = lorajax.merge(spec, residual, adapters)
  >>> bool(jnp.allclose(merged["dense"]["kernel"], params["dense"]["kernel"], atol=1e-5))
  True

References:
  Wang, Yu, Li, "LoRA-GA: Low-Rank Adaptation with Gradient Approximation",
  NeurIPS 2024, arXiv:2407.05000; official code Outsider565/LoRA-GA
  ``peft/src/peft/tuners/lora/layer.py`` (``lora_ga_init``). PEFT:
  ``src/peft/tuners/lora/layer.py`` (``LoraLayer.lora_ga_init``),
  ``src/peft/tuners/lora/loraga.py`` (``preprocess_loraga``),
  ``src/peft/tuners/lora/config.py`` (``LoraGAConfig``).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from lorajax import adapters as adapters_lib
from lorajax import registry, targets
from lorajax.adapters import target_key
from lorajax.inits._common import init_with_residual
from lorajax.inits._svd import top_svd
from lorajax.inits.gradients import lookup
from lorajax.spec import Spec
from lorajax.variants import lora
from lorajax.variants.lora import scaling

__all__ = ["lora_ga", "DIRECTIONS", "SCALES"]

DIRECTIONS = ("ArB2r", "A2rBr", "ArBr", "random")
#: Scales per ``source``.
SCALES = {"peft": ("stable", "weight_svd", "gd_scale", "unit"), "official": ("stable", "weightS", "gd", "unit")}
_HI = jax.lax.Precision.HIGHEST


def _check(direction: str, scale: str, stable_gamma: Any, source: str, niter: Any) -> None:
    if source not in SCALES:
        raise ValueError(f"source must be one of {tuple(SCALES)}, got {source!r}")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if scale not in SCALES[source]:
        raise ValueError(f"scale must be one of {SCALES[source]} with source={source!r}, got {scale!r}")
    if (
        isinstance(stable_gamma, bool)
        or not isinstance(stable_gamma, (int, float))
        or not (math.isfinite(stable_gamma) and stable_gamma > 0)
    ):
        raise ValueError(f"stable_gamma must be a finite number > 0, got {stable_gamma!r}")
    if niter is not None and (isinstance(niter, bool) or not isinstance(niter, int) or niter < 0):
        raise ValueError(f"niter must be a non-negative int or None (exact SVD), got {niter!r}")


def _indices(direction: str, r: int, key: jax.Array, source: str) -> tuple[jax.Array, jax.Array]:
    """Indices of the singular triplets that go to A (rows of Vᵀ) and to B (columns of U)."""
    if direction == "ArB2r":
        return jnp.arange(r), jnp.arange(r, 2 * r)
    if direction == "A2rBr":
        return jnp.arange(r, 2 * r), jnp.arange(r)
    if direction == "ArBr":
        return jnp.arange(1, 2 * r, 2), jnp.arange(0, 2 * r, 2)
    perm = jax.random.permutation(key, 2 * r)
    if source == "official":  # two disjoint halves of one permutation
        return perm[:r], perm[r:]
    return perm[:r], perm[:r]  # PEFT: the same r indices for A and B


def lora_ga(
    spec: Spec,
    params: Any,
    grads: Any,
    key: jax.Array | None = None,
    *,
    direction: str = "ArB2r",
    scale: str = "stable",
    stable_gamma: float = 16,
    niter: int | None = 4,
    source: str = "peft",
) -> tuple[dict, Any]:
    """LoRA-GA adapters and the shifted base.

    Args:
      spec: a ``"lora"`` Spec (``use_rslora``, ``rank_pattern``,
        ``alpha_pattern`` and ``dtype`` apply; ``init_weights`` is ignored).
      params: the base params (not changed).
      grads: the averaged full-weight gradients of the targeted weights, as
        returned by `lorajax.inits.estimate_gradients` (any tree with the
        weight's shape at the weight's path).
      key: PRNG key for the randomized SVD's sketch and the "random"
        direction (default key 0); per target ``fold_in(key, crc32(path))``.
      direction: which singular triplets go to A and B (see the module docstring).
      scale: "stable" | "weight_svd" | "gd_scale" | "unit" (PEFT), or
        "stable" | "weightS" | "gd" | "unit" with ``source="official"``.
      stable_gamma: γ of the "stable" scale (PEFT's default 16).
      niter: power iterations of the randomized SVD (PEFT: 4); None for the
        exact SVD.
      source: "peft" (PEFT 0.21's ``lora_ga_init``, default) or "official"
        (the authors' ``lora_ga_init``, see the module docstring).

    Returns:
      ``(adapters, new_params)``: LoRA adapters and the params with every
      targeted weight replaced by ``W - s·B A``.

    Raises:
      ValueError: a bad option; ``2r > min(in, out)`` for a target (naming
        it); a missing or misshapen gradient (naming its path); a non-"lora" spec.
    """
    _check(direction, scale, stable_gamma, source, niter)
    registry.plain_lora(spec.variant, "LoRA-GA")
    key = jax.random.key(0) if key is None else key
    selected = targets.select(spec, params)
    weights = dict(targets.weight_leaves(params))
    g_by_keys = {}
    for t in selected:
        g_by_keys[t.keys] = lookup(grads, t.keys, t.shape)
        if 2 * t.rank > min(t.matrix_shape):
            raise ValueError(
                f"LoRA-GA takes 2r = {2 * t.rank} singular vectors of the gradient of {t.name!r}, "
                f"more than min(in, out) = {min(t.matrix_shape)} (weight {t.shape}); lower the rank"
            )

    def make(k: jax.Array, t) -> tuple[dict, jax.Array]:
        w = k.T  # [out, in], float32
        m, n = w.shape
        r = t.rank
        w_dtype = jnp.asarray(weights[t.keys]).dtype
        store = lora.adapter_dtype(t, weights[t.keys])
        key_svd, key_dir, key_w = jax.random.split(target_key(key, t), 3)
        g = adapters_lib.as_matrix(g_by_keys[t.keys], t).astype(jnp.float32).T  # [out, in]
        u, s_g, vh = top_svd(g, 2 * r, niter=niter, q=min(4 * r, m, n), key=key_svd)
        idx_a, idx_b = _indices(direction, r, key_dir, source)
        a = vh[idx_a]  # [r, in]
        b = u[:, idx_b]  # [out, r]
        s_b = s_g[idx_b]
        sc = scaling(t)
        if source == "peft":
            b = b * s_b[None, :]
            if scale == "stable":
                b = b * (m**0.25 / stable_gamma**0.5)
            elif scale == "weight_svd":
                s_w = top_svd(w, r, niter=niter, q=r, key=key_w)[1]
                b = jnp.where(s_b[0] > 0, b * (s_w[0] / s_b[0]), b)
            elif scale == "gd_scale":
                a, b = a / sc, b / sc
            a = a.astype(w_dtype)  # PEFT casts A, B to the base dtype before the shift
            b = b.astype(w_dtype)
        else:
            if scale == "stable":
                c = m**0.25 / stable_gamma**0.5
                a, b = a * c, b * c
            elif scale == "weightS":
                s_w = top_svd(w, min(4 * r, m, n), niter=niter, q=4 * r, key=key_w)[1]
                c = jnp.mean(jnp.sqrt(s_w[:r] / sc))
                a, b = a * c, b * c
            elif scale == "gd":
                a, b = a / sc, b / sc
        a = a.astype(store).astype(jnp.float32)  # the values the adapter will hold
        b = b.astype(store).astype(jnp.float32)
        w_res = w - sc * jnp.matmul(b, a, precision=_HI)
        return {"lora_A": a.T, "lora_B": b.T}, w_res.T

    return init_with_residual(spec, params, make, "LoRA-GA")
