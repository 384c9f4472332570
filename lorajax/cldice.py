"""Soft skeleton, clDice loss and hard topology metrics for thin-structure segmentation.

Differentiable part (jax, jit-safe): the soft morphology and soft skeleton of
Shit et al., "clDice – a Novel Topology-Preserving Loss Function for Tubular
Structure Segmentation", CVPR 2021 (official code jocpae/clDice,
``cldice_loss/pytorch/soft_skeleton.py`` and ``cldice.py``), with the loss as
TopoLoRA-SAM uses it (Khazem et al., official code salimkhazem/Seglab,
``seglab/models/sam_peft/topo_losses.py``).

* Soft erosion ``E(I)``: the elementwise min of the 1-D 3-pools along each
  spatial axis (a cross-shaped min; min-pool = −maxpool(−I)). Soft dilation
  ``D(I)``: the 3×3 (3×3×3) max-pool, stride 1. Opening ``O(I) = D(E(I))``.
  The pools are ``lax.reduce_window`` max-pools with init −inf and explicit
  (1, 1) padding (the min-pool negates in and out, so its padding acts as
  +inf), so borders equal PyTorch's ``max_pool`` with padding 1 (padded cells
  never win). Checked once against Seglab's torch code on random inputs: equal
  skeletons (to 6e-8), losses and input gradients (to 1e-8) with ``iters=9``.
* Soft skeleton with ``iters = k`` (the official loop)::

      S ← relu(I − O(I))
      repeat k times:  I ← E(I);  δ ← relu(I − O(I));  S ← S + relu(δ − S⊙δ)

  Seglab's ``soft_skeletonize(img, iters)`` starts from ``S = 0`` and takes δ
  *before* eroding, so its ``iters = n`` equals ``k = n − 1`` here: Seglab's
  10 is ``iters=9``. A structure of half-width ``w`` px is fully thinned after
  ``k ≥ w`` steps, so the two agree on anything thinner than 19 px.
* clDice (Seglab's form, per sample, ``eps`` = ``smooth``), with ``P`` the
  predicted probability, ``G`` the target, ``S_P = skel(P)``, ``S_G = skel(G)``
  and sums over every axis but the first::

      Tprec = Σ S_P⊙G / (Σ S_P + eps),  Tsens = Σ S_G⊙P / (Σ S_G + eps)
      clDice = (2·Tprec·Tsens + eps) / (Tprec + Tsens + eps)
      L_clDice = 1 − mean_batch(clDice)

  The official repository instead adds ``smooth = 1`` to the numerators too,
  uses ``k = 3`` and mixes ``(1 − α)·L_softDice + α·L_clDice`` (α = 0.5);
  Seglab adds ``0.5·L_clDice`` to BCE + soft Dice.
* Soft Dice (Seglab): ``1 − mean_batch((2 Σ P⊙G + eps) / (Σ P + Σ G + eps))``.

Hard metrics (numpy, on masks thresholded at 0.5, as Seglab's
``seglab/metrics/topology.py``): `dice_score`, `skeletonize` (Zhang & Suen,
"A fast parallel algorithm for thinning digital patterns", CACM 27(3), 1984;
Seglab uses skimage's ``skeletonize``, which is not a dependency here; its
lookup table departs from the paper's conditions in 25 of the 256 neighbour
patterns, e.g. it also removes staircase corners and keeps some two-neighbour
line ends, so hard skeletons, and the hard clDice, can differ slightly),
`cldice_score` (``2·Tprec·Tsens / (Tprec + Tsens + eps)`` on hard skeletons),
`betti0` / `betti0_error` (8-connected foreground components) and `betti1`
(holes: 4-connected background components that do not touch the border).

Shapes: the soft functions take ``[..., H, W]`` (``spatial_dims=2``) or
``[..., D, H, W]`` (``spatial_dims=3``); leading axes are batch/channel axes.
The losses take ``[N, ...spatial]`` (a channel axis after ``N`` is allowed and
summed with the spatial axes, as Seglab's ``[N, 1, H, W]``) and return a
scalar. Channel-last maps (a Flax conv's ``[N, H, W, 1]``) must drop or move
the channel first; a last axis of size 1 is refused. The hard metrics take
``[H, W]`` or ``[N, H, W]``.

Example:
  >>> import jax.numpy as jnp
  >>> bar = jnp.zeros((1, 9, 12)).at[0, 2:7, 1:11].set(1.0)  # 5 px thick
  >>> float(cldice_loss(bar, bar)) < 1e-6
  True
  >>> int(skeletonize(np.asarray(bar[0])).sum(axis=0).max())  # one px per column
  1
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from scipy import ndimage  # type: ignore[import-untyped]

_EIGHT = np.ones((3, 3), dtype=bool)  # 8-connectivity structure for ndimage.label


def _spatial(x: jax.Array, spatial_dims: int) -> int:
    """Check ``spatial_dims`` against ``x`` and return the number of leading axes."""
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    if x.ndim < spatial_dims:
        raise ValueError(f"expected at least {spatial_dims} axes ([..., *spatial]), got shape {x.shape}")
    if x.shape[-1] == 1:
        raise ValueError(
            f"the last spatial axis has size 1 (shape {x.shape}): channel-last input? "
            "pass [..., H, W] (e.g. x[..., 0] of an [N, H, W, 1] map)"
        )
    return x.ndim - spatial_dims


def _pool(x: jax.Array, window: tuple[int, ...], lead: int, op: str) -> jax.Array:
    """Stride-1 max- or min-pool over the last axes with ``window``, padded by ``w // 2`` each side."""
    dims = (1,) * lead + window
    pad = ((0, 0),) * lead + tuple((w // 2, w // 2) for w in window)
    sign = 1.0 if op == "max" else -1.0  # min-pool = −maxpool(−x), as the official code
    init = np.array(-np.inf, x.dtype)  # a concrete numpy init: jax then uses its differentiable max-pool
    return sign * lax.reduce_window(sign * x, init, lax.max, dims, (1,) * x.ndim, pad)


def _float(x: jax.Array | np.ndarray) -> jax.Array:
    x = jnp.asarray(x)
    return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.float32)


def _erode(x: jax.Array, spatial_dims: int) -> jax.Array:
    lead = x.ndim - spatial_dims
    pools = [_pool(x, tuple(3 if a == i else 1 for a in range(spatial_dims)), lead, "min") for i in range(spatial_dims)]
    out = pools[0]
    for p in pools[1:]:
        out = jnp.minimum(out, p)
    return out


def _dilate(x: jax.Array, spatial_dims: int) -> jax.Array:
    return _pool(x, (3,) * spatial_dims, x.ndim - spatial_dims, "max")


def _open(x: jax.Array, spatial_dims: int) -> jax.Array:
    return _dilate(_erode(x, spatial_dims), spatial_dims)


def _skeleton(x: jax.Array, iters: int, spatial_dims: int) -> jax.Array:
    def step(_, carry):
        img, skel = carry
        img = _erode(img, spatial_dims)
        delta = jax.nn.relu(img - _open(img, spatial_dims))
        return img, skel + jax.nn.relu(delta - skel * delta)

    skel = jax.nn.relu(x - _open(x, spatial_dims))
    return lax.fori_loop(0, iters, step, (x, skel))[1]  # static trip count: reverse-differentiable


_erode_jit = jax.jit(_erode, static_argnums=1)
_dilate_jit = jax.jit(_dilate, static_argnums=1)
_open_jit = jax.jit(_open, static_argnums=1)
_skeleton_jit = jax.jit(_skeleton, static_argnums=(1, 2))


def soft_erode(x: jax.Array, spatial_dims: int = 2) -> jax.Array:
    """Soft erosion: min over the 1-D 3-pools along each spatial axis (cross-shaped). Shape kept."""
    x = _float(x)
    _spatial(x, spatial_dims)
    return _erode_jit(x, spatial_dims)


def soft_dilate(x: jax.Array, spatial_dims: int = 2) -> jax.Array:
    """Soft dilation: 3×3 (3×3×3) max-pool, stride 1, padding 1. Shape kept."""
    x = _float(x)
    _spatial(x, spatial_dims)
    return _dilate_jit(x, spatial_dims)


def soft_open(x: jax.Array, spatial_dims: int = 2) -> jax.Array:
    """Soft opening ``D(E(x))``. Shape kept."""
    x = _float(x)
    _spatial(x, spatial_dims)
    return _open_jit(x, spatial_dims)


def soft_skeleton(x: jax.Array, iters: int = 10, spatial_dims: int = 2) -> jax.Array:
    """Soft skeleton with ``iters`` = k erosion steps of the official loop (Seglab's n is k = n − 1).

    Args:
      x: ``[..., H, W]`` or ``[..., D, H, W]`` values in [0, 1].
      iters: k ≥ 0.
      spatial_dims: 2 or 3.

    Returns:
      The skeleton, same shape as ``x``, values in [0, 1].
    """
    if not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be an int >= 0, got {iters!r}")
    x = _float(x)
    _spatial(x, spatial_dims)
    return _skeleton_jit(x, iters, spatial_dims)


def _check_pair(prob: jax.Array, target: jax.Array, spatial_dims: int) -> None:
    if prob.shape != target.shape:
        raise ValueError(f"prob and target shapes differ: {prob.shape} vs {target.shape}")
    if prob.ndim < spatial_dims + 1:
        raise ValueError(f"expected [N, ...spatial] with {spatial_dims} spatial axes, got shape {prob.shape}")
    for name, v in (("prob", prob), ("target", target)):
        if not isinstance(v, jax.core.Tracer) and v.size:  # value check on concrete arrays only (numpy: also
            host = np.asarray(v)  # for an array a jitted function closes over, where jnp.min would be traced)
            lo, hi = float(host.min()), float(host.max())
            if not (0.0 <= lo and hi <= 1.0):
                raise ValueError(f"{name} must lie in [0, 1] (a probability), got range [{lo}, {hi}]")


@jax.jit
def _dice(prob: jax.Array, target: jax.Array, smooth: jax.Array) -> jax.Array:
    axes = tuple(range(1, prob.ndim))
    inter = jnp.sum(prob * target, axis=axes)
    denom = jnp.sum(prob, axis=axes) + jnp.sum(target, axis=axes)
    return 1.0 - jnp.mean((2.0 * inter + smooth) / (denom + smooth))


def soft_dice_loss(prob: jax.Array, target: jax.Array, smooth: float = 1e-6) -> jax.Array:
    """Seglab's soft Dice loss ``1 − mean_N((2 Σ P⊙G + s) / (Σ P + Σ G + s))``.

    Args:
      prob, target: ``[N, ...]`` in [0, 1]; sums run over every axis but the first.
      smooth: ``s`` (Seglab's eps).

    Returns:
      Scalar loss.
    """
    prob, target = _float(prob), _float(target)
    _check_pair(prob, target, 1)
    return _dice(prob, target, jnp.asarray(smooth, prob.dtype))


@functools.partial(jax.jit, static_argnums=(3, 4))
def _cldice(prob: jax.Array, target: jax.Array, smooth: jax.Array, iters: int, spatial_dims: int) -> jax.Array:
    axes = tuple(range(1, prob.ndim))
    skel_p = _skeleton(prob, iters, spatial_dims)
    skel_t = _skeleton(target, iters, spatial_dims)
    tprec = jnp.sum(skel_p * target, axis=axes) / (jnp.sum(skel_p, axis=axes) + smooth)
    tsens = jnp.sum(skel_t * prob, axis=axes) / (jnp.sum(skel_t, axis=axes) + smooth)
    cl = (2.0 * tprec * tsens + smooth) / (tprec + tsens + smooth)
    return 1.0 - jnp.mean(cl)


def cldice_loss(
    prob: jax.Array, target: jax.Array, iters: int = 10, smooth: float = 1e-6, spatial_dims: int = 2
) -> jax.Array:
    """clDice loss ``1 − mean_N(clDice)`` in Seglab's form (see the module docstring).

    Args:
      prob: ``[N, ..., H, W]`` (or ``[N, ..., D, H, W]``) predicted probabilities.
      target: same shape, the label (soft or binary).
      iters: k of the official skeleton loop (Seglab's default 10 is ``iters=9``).
      smooth: eps in Tprec, Tsens and the harmonic mean.
      spatial_dims: 2 or 3.

    Returns:
      Scalar loss.
    """
    if not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be an int >= 0, got {iters!r}")
    prob, target = _float(prob), _float(target)
    _spatial(prob, spatial_dims)
    _check_pair(prob, target, spatial_dims)
    return _cldice(prob, target, jnp.asarray(smooth, prob.dtype), iters, spatial_dims)


# ----------------------------------------------------------------------------- hard metrics (numpy)


def _masks(x: np.ndarray | jax.Array, threshold: float, name: str) -> np.ndarray:
    """``[H, W]`` or ``[N, H, W]`` -> bool ``[N, H, W]`` (``x > threshold``)."""
    a = np.asarray(x)
    if a.ndim not in (2, 3):
        raise ValueError(f"{name} must be [H, W] or [N, H, W], got shape {a.shape}")
    return (a > threshold).reshape((-1,) + a.shape[-2:])


def _pair(pred: np.ndarray | jax.Array, target: np.ndarray | jax.Array, threshold: float):
    p, t = _masks(pred, threshold, "pred"), _masks(target, threshold, "target")
    if p.shape != t.shape:
        raise ValueError(f"pred and target shapes differ: {np.shape(pred)} vs {np.shape(target)}")
    return p, t


def _reduce(per_sample: np.ndarray, reduction: str) -> float | np.ndarray:
    if reduction == "mean":
        return float(np.mean(per_sample))
    if reduction == "none":
        return per_sample
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def dice_score(
    pred: np.ndarray | jax.Array,
    target: np.ndarray | jax.Array,
    threshold: float = 0.5,
    eps: float = 1e-6,
    reduction: str = "mean",
) -> float | np.ndarray:
    """Hard Dice ``2|P∩G| / (|P| + |G| + eps)`` per image of ``[H, W]`` / ``[N, H, W]``; mean or ``[N]``.

    Per image, then averaged (Seglab's epoch meter pools TP/FP/FN over the batch instead).
    """
    p, t = _pair(pred, target, threshold)
    inter = (p & t).sum(axis=(1, 2))
    return _reduce(2.0 * inter / (p.sum(axis=(1, 2)) + t.sum(axis=(1, 2)) + eps), reduction)


def _zhang_suen(m: np.ndarray) -> np.ndarray:
    """Zhang–Suen thinning of bool ``[N, H, W]`` masks, all images at once (Zhang & Suen 1984).

    Neighbours P2..P9 run clockwise from north. A foreground pixel is deleted in
    a sub-iteration when 2 ≤ B ≤ 6 (B = foreground neighbours), A = 1 (A = 0→1
    transitions in P2, P3, …, P9, P2) and, in the first sub-iteration,
    P2·P4·P6 = 0 and P4·P6·P8 = 0, in the second P2·P4·P8 = 0 and P2·P6·P8 = 0.
    Deletions of one sub-iteration are simultaneous; stop when nothing changes.
    """
    img = np.pad(m, ((0, 0), (1, 1), (1, 1))).astype(np.uint8)
    h, w = m.shape[1:]
    # (dy, dx) of P2..P9: N, NE, E, SE, S, SW, W, NW
    offs = ((-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1))
    while True:
        changed = False
        for step in (0, 1):
            c = img[:, 1 : h + 1, 1 : w + 1]
            nb = np.stack([img[:, 1 + dy : h + 1 + dy, 1 + dx : w + 1 + dx] for dy, dx in offs])
            b = nb.sum(axis=0)
            a = ((nb == 0) & (np.roll(nb, -1, axis=0) == 1)).sum(axis=0)
            p2, p4, p6, p8 = nb[0], nb[2], nb[4], nb[6]
            if step == 0:
                side = (p2 * p4 * p6 == 0) & (p4 * p6 * p8 == 0)
            else:
                side = (p2 * p4 * p8 == 0) & (p2 * p6 * p8 == 0)
            delete = (c == 1) & (b >= 2) & (b <= 6) & (a == 1) & side
            if delete.any():
                changed = True
                c[delete] = 0  # c is a view into img
        if not changed:
            return img[:, 1 : h + 1, 1 : w + 1].astype(bool)


def skeletonize(mask: np.ndarray | jax.Array, threshold: float = 0.5) -> np.ndarray:
    """Hard 1-px skeleton of ``mask > threshold`` by Zhang–Suen thinning; ``[H, W]`` or ``[N, H, W]`` bool.

    Zhang–Suen removes some tiny components entirely (a 2×2 square); each
    8-connected component left with no skeleton pixel gets back its most
    interior pixel (largest distance to the background), so every component
    keeps a skeleton.
    """
    a = np.asarray(mask)
    m = _masks(a, threshold, "mask")
    skel = _zhang_suen(m)
    for i in range(m.shape[0]):
        labels, n = ndimage.label(m[i], structure=_EIGHT)
        if n == 0:
            continue
        kept = np.unique(labels[skel[i]])
        lost = np.setdiff1d(np.arange(1, n + 1), kept)
        if lost.size:
            dist = ndimage.distance_transform_edt(m[i])
            for pos in ndimage.maximum_position(dist, labels, lost):
                skel[i][tuple(int(v) for v in pos)] = True
    return skel.reshape(a.shape)


def cldice_score(
    pred: np.ndarray | jax.Array,
    target: np.ndarray | jax.Array,
    threshold: float = 0.5,
    eps: float = 1e-6,
    reduction: str = "mean",
) -> float | np.ndarray:
    """Hard clDice on thresholded masks, per image (Seglab's ``cldice_score``); mean or ``[N]``.

    ``Tprec = |skel(P)∩G| / (|skel(P)| + eps)``, ``Tsens = |skel(G)∩P| / (|skel(G)| + eps)``,
    ``clDice = 2·Tprec·Tsens / (Tprec + Tsens + eps)``.
    """
    p, t = _pair(pred, target, threshold)
    sp, st = skeletonize(p), skeletonize(t)
    tprec = (sp & t).sum(axis=(1, 2)) / (sp.sum(axis=(1, 2)) + eps)
    tsens = (st & p).sum(axis=(1, 2)) / (st.sum(axis=(1, 2)) + eps)
    return _reduce(2.0 * tprec * tsens / (tprec + tsens + eps), reduction)


def betti0(mask: np.ndarray | jax.Array, threshold: float = 0.5) -> int:
    """Number of 8-connected foreground components of one ``[H, W]`` mask (``mask > threshold``)."""
    m = _masks(mask, threshold, "mask")
    if m.shape[0] != 1 or np.ndim(mask) != 2:
        raise ValueError(f"betti0 takes one [H, W] mask, got shape {np.shape(mask)}")
    return int(ndimage.label(m[0], structure=_EIGHT)[1])


def betti1(mask: np.ndarray | jax.Array, threshold: float = 0.5) -> int:
    """Number of holes of one ``[H, W]`` mask: 4-connected background components not touching the border.

    The mask is padded by one background pixel, so the outside is one component
    (subtracted); 4-connected background is the dual of 8-connected foreground.
    """
    m = _masks(mask, threshold, "mask")
    if m.shape[0] != 1 or np.ndim(mask) != 2:
        raise ValueError(f"betti1 takes one [H, W] mask, got shape {np.shape(mask)}")
    return int(ndimage.label(~np.pad(m[0], 1))[1]) - 1


def betti0_error(
    pred: np.ndarray | jax.Array,
    target: np.ndarray | jax.Array,
    threshold: float = 0.5,
    reduction: str = "mean",
) -> float | np.ndarray:
    """``|b0(pred) − b0(target)|`` per image of ``[H, W]`` / ``[N, H, W]``; mean or ``[N]``."""
    p, t = _pair(pred, target, threshold)
    err = np.array(
        [abs(ndimage.label(a, structure=_EIGHT)[1] - ndimage.label(b, structure=_EIGHT)[1]) for a, b in zip(p, t)],
        dtype=np.float64,
    )
    return _reduce(err, reduction)
