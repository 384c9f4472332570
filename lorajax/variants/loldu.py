"""LoLDU: train only the diagonal of a truncated LDU decomposition of the weight.

The official code works on the PyTorch weight ``W: [out, in]`` (``W = Kᵀ`` for
a Flax kernel ``K: [in, out]``) and decomposes **that** matrix: partial-pivot
LU ``W = P L U`` (``P: [out, out]`` a permutation, ``L: [out, k]`` unit lower,
``U: [k, in]``, ``k = min(in, out)``), ``D = diag(U)``, ``Ũ = U / D`` (rows
divided by the pivots), so ``W = P L diag(D) Ũ``. The LU of the kernel
``K = Wᵀ`` itself would pivot over the other axis and give other factors (of
other shapes when in ≠ out), so lorajax
decomposes ``Kᵀ`` and gets the official ``P, L, D, Ũ`` up to rounding (tested
against the official code's numbers). Keeping the top
``r`` components, the official layer freezes ``W_res = W − σ P L_r diag(D_r)
Ũ_r`` and trains ``z ∈ R^r`` (init ``D_r``)::

    W' = W_res + σ · P L_r diag(z) Ũ_r                          (official, [out, in])
       = W + P L_r diag(σ z − σ₀ D_r) Ũ_r                        (identical, any z, σ)

with ``σ₀ = α / r`` the scaling at init. lorajax uses the second form: the base
weight is not shifted, the update is additive (``W' = W`` exactly at init, as
``σ₀ z − σ₀ D_r = 0``), and the frozen ``d0 = D_r`` is kept. With the default
frozen ``σ = σ₀`` the update is ``σ₀ P L_r diag(z − d0) Ũ_r``. Flax
orientation (``y = x K``)::

    ΔK  = Ũ_rᵀ diag(c) (P L_r)ᵀ,     c = σ₀ (z − d0)   (or σ z − σ₀ d0 with train_sigma)
    K'  = K + ΔK
    y   = x K + ((x loldu_U) ⊙ c) loldu_L[:, loldu_perm]            (factored; never [in, out])

Adapter entries (all frozen but ``loldu_z`` and ``loldu_sigma``)::

    loldu_z:     [r]       trainable, init D_r (init_method="lu")
    loldu_d0:    [r]       D_r, the pivots (diagonal of U)
    loldu_U:     [in, r]   Ũ_rᵀ (official lora_A = Ũ_r: [r, in], transposed)
    loldu_L:     [r, out]  L_rᵀ (official lora_B = L_r: [out, r], transposed; not permuted)
    loldu_perm:  [out]     int32, P[i, perm[i]] = 1, i.e. (P L_r)[i] = L_r[perm[i]]
    loldu_sigma: []        trainable σ, only with train_sigma=True (init α/r)

The LU runs in float32 (or the weight's dtype if wider) and the update is cast
back to the weight's dtype. A zero pivot ``D_i = 0`` for ``i < r`` (a singular
leading block of the pivoted weight) would divide by zero: ``init`` raises,
naming the target. Pivot order can differ between LAPACK builds only for
tied pivots; compare ``W'``, not the factors. `from_ldu` builds an adapter
from factors made elsewhere (e.g. the official layer's ``P``, ``lora_B``,
``lora_A``, ``vector_z``).

Options: ``train_sigma`` (default False: the official ``get_loldu_params``
trains only ``vector_z``). The paper's setting stays UNVERIFIED: its body
was not readable here, and the two figure captions seen (quoted by a
third-party summary page) disagree: Fig. 2 gives the update as
``σ · P · (L_r, diag(z_r), U_r)`` "involving r + 1 trainable parameters"
(σ trained), while Fig. 1 counts "24 trainable parameters" for r = 1 on
ViT-Base, i.e. ``r`` per module for the 24 query/value projections (σ not
trained). See ``docs/unverified.md``. ``init_method``
(the official choices, default ``"lu"``: ``z = D_r``; ``"zeros"``, ``"ones"``,
``"constant"`` (mean of D_r), ``"uniform"`` (``U(±|mean(D_r)|/2)``),
``"normal"`` (``N(mean(D_r), std(D_r))``, unbiased std, needs r ≥ 2),
``"s_uniform"`` (``U(−1, 1)``), ``"s_normal"`` (``N(0, 1)``)). As in the
official code these change ``z`` but not the residual, so every init but
``"lu"`` starts from ``W' ≠ W``. ``σ = α / r`` with the Spec's ``alpha``
(default 8); the official ``from_linear`` defaults are ``rank=4, lora_alpha=1``
(``Spec(rank=4, alpha=1)``). Dropout is not implemented (the official layer
defines it but never applies it).

Trainable per target: ``r`` (``r + 1`` with ``train_sigma``).

Example:
  >>> import jax, jax.numpy as jnp, lorajax
  >>> params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (6, 4))}}
  >>> spec = lorajax.Spec("loldu", rank=2, alpha=2, targets=["dense"])
  >>> adapters = lorajax.init(spec, params, jax.random.key(1))
  >>> ad = adapters["dense"]["kernel"]
  >>> ad["loldu_z"].shape, ad["loldu_U"].shape, ad["loldu_L"].shape, ad["loldu_perm"].shape
  ((2,), (6, 2), (2, 4), (4,))
  >>> bool(jnp.array_equal(lorajax.merge(spec, params, adapters)["dense"]["kernel"], params["dense"]["kernel"]))
  True

References:
  Shi et al., "LoLDU: Low-Rank Adaptation via Lower-Diag-Upper Decomposition
  for Parameter-Efficient Fine-Tuning", arXiv:2410.13618. Official code
  SKDDJ/LoLDU ``minloldu/loldu.py`` (``ldu_decomposition``,
  ``LoLDUParametrization.get_residual_matrix``, ``loldu_forward``) and
  ``minloldu/loldu_utils.py`` (``get_loldu_params``: only ``vector_z`` trains).
  Not in PEFT.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from lorajax.variants import options
from lorajax.variants.base import EVAL, Context, Target, Variant, additive
from lorajax.variants.base import scaling as base_scaling
from lorajax.variants.options import checks, option

INIT_METHODS = ("lu", "zeros", "ones", "constant", "uniform", "normal", "s_uniform", "s_normal")


@dataclasses.dataclass(frozen=True)
class Options(options.Options):
    #: also train ``σ`` (init ``α/r``); False: only ``z`` trains (the official ``get_loldu_params``)
    train_sigma: bool = option(False, checks.boolean)
    #: init of ``z``: ``"lu"`` (``D_r``, identity at init) or one of the official alternatives
    #: (``"zeros"``, ``"ones"``, ``"constant"``, ``"uniform"``, ``"normal"``, ``"s_uniform"``, ``"s_normal"``)
    init_method: str = option("lu", checks.one_of(*INIT_METHODS))


def sigma0(t: Target) -> float:
    """``σ₀ = α / r``."""
    return base_scaling(t.alpha, t.rank)


@functools.partial(jax.jit, static_argnames="dtype")
def ldu(w: jax.Array, dtype=jnp.float32) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """LDU of ``W = wᵀ: [out, in]`` for a kernel ``w: [in, out]``: ``W = P L diag(D) Ũ``.

    Returns ``(perm: [out] int32, L: [out, k], D: [k], Ũ: [k, in])`` with
    ``k = min(in, out)`` and ``(P M)[i] = M[perm[i]]`` (``P[i, perm[i]] = 1``).
    ``Ũ`` has ``inf``/``nan`` rows where ``D`` is zero (the caller checks).
    """
    a = w.T.astype(dtype)  # the PyTorch [out, in] weight the official code decomposes
    d_out, d_in = a.shape
    k = min(d_out, d_in)
    lu, _, permutation = jax.lax.linalg.lu(a)  # a[permutation] = L U
    l_mat = jnp.tril(lu[:, :k], -1) + jnp.eye(d_out, k, dtype=dtype)
    u_mat = jnp.triu(lu[:k, :])
    d = jnp.diagonal(u_mat)
    perm = jnp.argsort(permutation).astype(jnp.int32)  # P = I[:, permutation]: row i of P L is L[perm[i]]
    return perm, l_mat, d, u_mat / d[:, None]


def _check_pivots(d_r: jax.Array, t: Target) -> None:
    if isinstance(d_r, jax.core.Tracer):
        return  # inside jit: values unknown
    d = np.asarray(d_r)
    bad = np.flatnonzero((d == 0) | ~np.isfinite(d))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"LoLDU at {t.name!r}: pivot D[{i}] = {d[i]} of the LU of W [out, in] {tuple(reversed(t.matrix_shape))} "
            f"is zero or not finite (a leading block of the pivoted weight is singular), so Ũ = U / D is undefined; "
            f"use rank <= {i} for this module (rank_pattern) or exclude it"
        )


def _init_z(key: jax.Array, d_r: jax.Array, method: str, t: Target) -> jax.Array:
    r, dtype = d_r.shape[0], d_r.dtype
    if method == "lu":
        return d_r
    if method == "zeros":
        return jnp.zeros_like(d_r)
    if method == "ones":
        return jnp.ones_like(d_r)
    if method == "constant":
        return jnp.full_like(d_r, jnp.mean(d_r))
    if method == "uniform":
        half = jnp.abs(jnp.mean(d_r)) / 2
        return jax.random.uniform(key, (r,), dtype, -1.0, 1.0) * half
    if method == "normal":
        if r < 2:
            raise ValueError(
                f"LoLDU at {t.name!r}: init_method='normal' uses the unbiased std of D_r, which needs rank >= 2"
            )
        return jnp.mean(d_r) + jnp.std(d_r, ddof=1) * jax.random.normal(key, (r,), dtype)
    if method == "s_uniform":
        return jax.random.uniform(key, (r,), dtype, -1.0, 1.0)
    if method == "s_normal":
        return jax.random.normal(key, (r,), dtype)
    raise ValueError(f"init_method must be one of {INIT_METHODS}, got {method!r}")


def from_ldu(perm, l_r, u_r, d_r, z=None, *, sigma=None) -> dict:
    """An adapter from PyTorch-orientation factors of ``W: [out, in]``.

    Args:
      perm: ``[out]`` index vector (``(P M)[i] = M[perm[i]]``) or the permutation
        matrix ``P: [out, out]`` (converted with ``argmax`` over its rows).
      l_r: ``L_r: [out, r]`` (official ``lora_B``), u_r: ``Ũ_r: [r, in]`` (``lora_A``).
      d_r: ``D_r: [r]``, the pivots the residual was built with.
      z: ``[r]`` (official ``vector_z``); default ``d_r`` (identity).
      sigma: a trainable σ (for ``train_sigma=True`` specs); default none.
    """
    perm = jnp.asarray(perm)
    if perm.ndim == 2:
        perm = jnp.argmax(perm, axis=1)
    l_r, u_r, d_r = jnp.asarray(l_r), jnp.asarray(u_r), jnp.asarray(d_r)
    out = {
        # a copy, never the d0 buffer itself: a train step may donate the trainable z
        "loldu_z": jnp.array(d_r if z is None else z, d_r.dtype, copy=True),
        "loldu_d0": d_r,
        "loldu_U": u_r.T,
        "loldu_L": l_r.T,
        "loldu_perm": perm.astype(jnp.int32),
    }
    if sigma is not None:
        out["loldu_sigma"] = jnp.asarray(sigma, d_r.dtype)
    return out


def init(key: jax.Array, w: jax.Array, t: Target) -> dict:
    """LDU of ``wᵀ`` (see the module docstring); ``z`` from ``init_method``."""
    r = t.rank
    dtype = jnp.promote_types(w.dtype, jnp.float32)
    perm, l_mat, d, u_tilde = ldu(w, dtype)
    d_r = d[:r]
    _check_pivots(d_r, t)
    z = _init_z(key, d_r, t.options.init_method, t)
    sigma = sigma0(t) if t.options.train_sigma else None
    return from_ldu(perm, l_mat[:, :r], u_tilde[:r], d_r, z, sigma=sigma)


def _coeff(adapter: dict, t: Target) -> jax.Array:
    """``c = σ₀ (z − d0)``, or ``σ z − σ₀ d0`` with a trainable σ: ``[r]``."""
    z, d0 = adapter["loldu_z"], adapter["loldu_d0"]
    if "loldu_sigma" in adapter:
        return adapter["loldu_sigma"] * z - sigma0(t) * d0
    return sigma0(t) * (z - d0)


def _check(w: jax.Array, adapter: dict) -> None:
    d_in, d_out = w.shape
    u, l_mat, perm = adapter["loldu_U"], adapter["loldu_L"], adapter["loldu_perm"]
    r = adapter["loldu_z"].shape[0]
    if u.shape != (d_in, r) or l_mat.shape != (r, d_out) or perm.shape != (d_out,):
        raise ValueError(
            f"LoLDU factors U {u.shape}, L {l_mat.shape}, perm {perm.shape} do not fit the weight {w.shape} "
            f"with r = {r} (need U [in, r], L [r, out], perm [out])"
        )


def delta(w: jax.Array, adapter: dict, t: Target) -> jax.Array:
    """``ΔK = Ũ_rᵀ diag(c) (P L_r)ᵀ: [in, out]``."""
    _check(w, adapter)
    l_perm = adapter["loldu_L"][:, adapter["loldu_perm"]]  # (P L_r)ᵀ
    return (adapter["loldu_U"] * _coeff(adapter, t)[None, :]) @ l_perm


#: ``K + ΔK`` and its inverse, in the weight's dtype.
adapted, unadapted = additive(delta)


def apply(x: jax.Array, w: jax.Array, adapter: dict, t: Target, ctx: Context = EVAL) -> jax.Array:
    """``x K + ((x Ũ_rᵀ) ⊙ c) (P L_r)ᵀ`` for ``x: [T, in]``; never forms ``[in, out]``."""
    _check(w, adapter)
    u = adapter["loldu_U"]
    y = x @ w
    h = (x.astype(u.dtype) @ u) * _coeff(adapter, t)[None, :]
    return y + (h @ adapter["loldu_L"][:, adapter["loldu_perm"]]).astype(y.dtype)


def trainable_count(targets: list[Target]) -> int:
    """``Σ r`` (``z``), plus one ``σ`` per target with ``train_sigma``."""
    return sum(t.rank + int(t.options.train_sigma) for t in targets)


# No `Factors`: the trained z is a diagonal between the frozen Ũ_rᵀ and (P L_r)ᵀ; there is no trained s·A·B.


VARIANT = Variant(
    name="loldu",
    init=init,
    adapted=adapted,
    apply=apply,
    unadapted=unadapted,
    options=Options,
    buffers=("loldu_d0", "loldu_U", "loldu_L", "loldu_perm"),
    trainable_count=trainable_count,
    doc=__doc__,
)
