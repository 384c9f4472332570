"""Truncated SVDs for the gradient-based initialisers: exact, or randomized like ``torch.svd_lowrank``.

``top_svd(m, k)`` returns the leading ``k`` singular triplets of ``m: [p, n]``
as ``(U: [p, k], S: [k], Vh: [k, n])`` in float32, with a fixed sign
convention: each column of ``U`` has its entry of largest magnitude positive
(scikit-learn's ``svd_flip``), and the matching row of ``Vh`` is flipped with
it. Singular vectors are unique only up to these signs; fixing them makes an
init deterministic and lets tests compare factors across libraries.

``niter=None`` is LAPACK's full SVD (``jnp.linalg.svd``). ``niter=K`` is the
randomized range finder of Halko, Martinsson and Tropp (2011, Alg. 4.4 + 5.1),
as ``torch.svd_lowrank(m, q, niter=K)`` computes it: the matrix is made tall
(transposed when ``p < n``), sketched with a ``[n, q]`` Gaussian, ``K`` power
iterations re-orthonormalise with QR, then the small ``[q, n]`` projection
gets a full SVD. With ``q >= min(p, n)`` the sketch spans the whole range and
the result equals the exact SVD up to rounding. Matrix products run at
``Precision.HIGHEST`` so that TPUs/GPUs do not round the sketch to bf16/TF32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = ["top_svd", "canonical_signs"]

_HI = jax.lax.Precision.HIGHEST


def canonical_signs(u: jax.Array, vh: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Flip paired ``(u[:, i], vh[i])`` so that ``u[:, i]``'s largest-magnitude entry is positive."""
    k = u.shape[1]
    rows = jnp.argmax(jnp.abs(u), axis=0)
    sign = jnp.sign(u[rows, jnp.arange(k)])
    sign = jnp.where(sign == 0, 1.0, sign).astype(u.dtype)
    return u * sign[None, :], vh * sign[:, None]


@functools.partial(jax.jit, static_argnames=("k", "q", "niter"))
def _top_svd(m: jax.Array, key: jax.Array | None, k: int, q: int, niter: int | None):
    m = m.astype(jnp.float32)
    if niter is None:
        u, s, vh = jnp.linalg.svd(m, full_matrices=False)
    else:
        tall = m.shape[0] >= m.shape[1]
        a = m if tall else m.T
        assert key is not None  # top_svd passes a key whenever niter is set
        omega = jax.random.normal(key, (a.shape[1], q), jnp.float32)
        basis = jnp.linalg.qr(jnp.matmul(a, omega, precision=_HI))[0]
        for _ in range(niter):
            basis = jnp.linalg.qr(jnp.matmul(a.T, basis, precision=_HI))[0]
            basis = jnp.linalg.qr(jnp.matmul(a, basis, precision=_HI))[0]
        u_small, s, vh = jnp.linalg.svd(jnp.matmul(basis.T, a, precision=_HI), full_matrices=False)
        u = jnp.matmul(basis, u_small, precision=_HI)
        if not tall:  # a = mᵀ = u s vh  =>  m = vhᵀ s uᵀ
            u, vh = vh.T, u.T
    u, vh = canonical_signs(u[:, :k], vh[:k])
    return u, s[:k], vh


def top_svd(
    m: jax.Array, k: int, *, niter: int | None = None, q: int | None = None, key: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Leading ``k`` singular triplets ``(U [p, k], S [k], Vh [k, n])`` of ``m: [p, n]`` (float32).

    Args:
      m: the matrix.
      k: how many triplets (``<= min(p, n)``).
      niter: None for the exact SVD; an int for the randomized SVD with that
        many power iterations.
      q: sketch width of the randomized SVD (default ``k``; clipped to
        ``[k, min(p, n)]``).
      key: PRNG key of the Gaussian sketch (randomized only; default key 0).
    """
    if k > min(m.shape):
        raise ValueError(f"cannot take {k} singular triplets of a {tuple(m.shape)} matrix")
    if niter is None:
        return _top_svd(m, None, k=k, q=k, niter=None)
    q = min(max(k if q is None else q, k), min(m.shape))
    return _top_svd(m, jax.random.key(0) if key is None else key, k=k, q=q, niter=niter)
