"""LoRA-XS: a trainable ``r × r`` core between frozen SVD factors of the weight.

The two LoRA factors are fixed to the top-``r`` singular triplets of the
pretrained kernel and only a small square matrix between them trains, so the
trainable size is ``r²`` per target whatever the layer width. Maths (Flax
orientation, ``W: [in, out]``, ``y = x W``; the official code takes the SVD of
``target.weight.T``, this same ``[in, out]`` matrix)::

    W = U Σ Vᵀ                          (SVD of the kernel itself)
    A = U_r Σ_r: [in, r]                frozen (``lora_A``)
    B = V_rᵀ:    [r, out]               frozen (``lora_B``)
    R:           [r, r]                 trainable (``lora_R``)
    y  = x W + s · ((x A) R) B,         W' = W + s · A R B
    s  = α / r                          (PEFT's LoRA scaling, which the official code keeps)

So ``A B = trunc_r(W)``, the best rank-``r`` approximation of ``W``.

Init: ``R ~ N(0, σ²)`` with ``σ = r_init_std``, default ``1e-5`` as in the
official code (``init_module_weights(..., sigma=0.00001)``): the model is
changed at init by ``O(σ)``, not exactly unchanged. ``r_init_std=0`` gives
``R = 0`` and an exact identity at init; the gradient of ``R`` is
``s Aᵀ (xᵀ g) Bᵀ``, non-zero without any random init, because A and B are
fixed and non-zero.

The SVD is exact (``jnp.linalg.svd`` in float32 or wider); the official code
uses scikit-learn's randomised ``TruncatedSVD(n_iter=10, random_state=42)`` on
the same ``[in, out]`` matrix (``target.weight.T``), which approximates it
(the singular vectors may differ in sign, which changes how a given ``R``
maps to ``ΔW`` but not the set of reachable updates).

Interop with the official PyTorch code (PEFT ``lora.Linear`` plus an
``r × r`` ``nn.Linear`` called ``default_lora_latent_mapping``):
``lora_A = lora_A.weightᵀ``, ``lora_B = lora_B.weightᵀ`` and
``lora_R = default_lora_latent_mapping.weightᵀ`` (note the transpose of R).

Trainable per target: ``r²``; frozen adapter buffers: ``r · (in + out)``.

Example:
  >>> import jax, jax.numpy as jnp, lorajax
  >>> w = jax.random.normal(jax.random.key(0), (6, 4))
  >>> spec = lorajax.Spec("lora_xs", rank=2, targets=["dense"])
  >>> a = lorajax.init(spec, {"dense": {"kernel": w}}, jax.random.key(1))["dense"]["kernel"]
  >>> a["lora_A"].shape, a["lora_R"].shape, a["lora_B"].shape
  ((6, 2), (2, 2), (2, 4))
  >>> u, sv, vt = jnp.linalg.svd(w, full_matrices=False)
  >>> bool(jnp.allclose(a["lora_A"] @ a["lora_B"], (u[:, :2] * sv[None, :2]) @ vt[:2], atol=1e-5))
  True

References:
  Bałazy, Banaei, Aberer, Tabor, "LoRA-XS: Low-Rank Adaptation with Extremely
  Small Number of Parameters", arXiv:2405.17604 (ECAI 2025). Official code
  MohammadrezaBanaei/LoRA-XS: ``utils/initialization_utils.py``
  (``find_and_initialize``, ``init_module_weights``), ``utils/svd_utils.py``
  (``get_linear_rec_svd``), ``utils/latent_utils.py`` (``forward_latent``,
  ``get_delta_weight``). Not in PEFT.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lorajax.variants import options
from lorajax.variants.base import EVAL, Context, Target, Variant, additive, down_project
from lorajax.variants.base import scaling as base_scaling
from lorajax.variants.options import checks, option


@dataclasses.dataclass(frozen=True)
class Options(options.Options):
    #: ``σ``, the std of R's Gaussian init (official 1e-5); 0: ``R = 0``, an exact identity at init
    r_init_std: float = option(1e-5, checks.nonneg)
    #: adapter dtype; None: float32, or the weight's dtype if wider
    dtype: str | None = option(None, checks.dtype)


def scaling(t: Target) -> float:
    """``α / r``."""
    return base_scaling(t.alpha, t.rank)


def _dtype(t: Target, w: jax.Array):
    return jnp.dtype(t.options.dtype or jnp.promote_types(w.dtype, jnp.float32))


def init(key: jax.Array, w: jax.Array, t: Target) -> dict:
    """``{"lora_A": [in, r] = U_r Σ_r, "lora_B": [r, out] = V_rᵀ, "lora_R": [r, r] ~ N(0, σ²)}``."""
    dtype = _dtype(t, w)
    r = t.rank
    u, sv, vt = jnp.linalg.svd(w.astype(dtype), full_matrices=False)
    return {
        "lora_A": u[:, :r] * sv[None, :r],
        "lora_B": vt[:r],
        "lora_R": t.options.r_init_std * jax.random.normal(key, (r, r), dtype),
    }


def _check(w: jax.Array, adapter: dict) -> None:
    a, b, core = adapter["lora_A"], adapter["lora_B"], adapter["lora_R"]
    r = core.shape[0]
    if core.shape != (r, r) or a.shape != (w.shape[0], r) or b.shape != (r, w.shape[1]):
        raise ValueError(
            f"LoRA-XS needs lora_A: [in, r], lora_R: [r, r], lora_B: [r, out] for a weight [in, out] = {w.shape}; "
            f"got lora_A {a.shape}, lora_R {core.shape}, lora_B {b.shape}"
        )


def delta(w: jax.Array, adapter: dict, t: Target) -> jax.Array:
    """``s · A R B: [in, out]``."""
    _check(w, adapter)
    return scaling(t) * ((adapter["lora_A"] @ adapter["lora_R"]) @ adapter["lora_B"])


#: ``W + s · A R B`` and its inverse, in the weight's dtype.
adapted, unadapted = additive(delta)


def apply(x: jax.Array, w: jax.Array, adapter: dict, t: Target, ctx: Context = EVAL) -> jax.Array:
    """``x W + s · ((x A) R) B`` for ``x: [T, in]``; never forms ``A R B``."""
    _check(w, adapter)
    a = adapter["lora_A"]
    y = x @ w
    h = down_project(x.astype(a.dtype), a) @ adapter["lora_R"]
    return y + (scaling(t) * (h @ adapter["lora_B"])).astype(y.dtype)


def trainable_count(targets: list[Target]) -> int:
    """``Σ r²`` (the core ``R``)."""
    return sum(t.rank * t.rank for t in targets)


# No `Factors`: A and B are frozen and the trained core R sits between them (A R B is not a
# function of A B).
VARIANT = Variant(
    name="lora_xs",
    init=init,
    adapted=adapted,
    apply=apply,
    unadapted=unadapted,
    options=Options,
    buffers=("lora_A", "lora_B"),
    trainable_count=trainable_count,
    doc=__doc__,
)
