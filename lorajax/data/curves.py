"""SYNTHETIC thin-structure segmentation data: procedural vessel/road-like curves (and blobs).

Nothing here is real data; results on it must say "synthetic". `make_curves`
draws images of branching thin curves (the task clDice was made for: Shit et
al., CVPR 2021) and their binary masks; `make_blobs` draws thick convex shapes
with the same image statistics (for pre-training an encoder). All in numpy,
deterministic in ``seed`` (one ``np.random.default_rng(seed)``; every random
draw is made for the whole batch before rendering, so the output does not
depend on the chunking), float32.

Geometry of `make_curves` (coordinates in pixels, pixel ``(i, j)`` covers
``[i, i+1) × [j, j+1)``, ``S = size``):

* ``m ~ U{2, …, max_curves}`` main curves per image, each a cubic Bézier
  ``B(t) = (1−t)³P0 + 3(1−t)²t P1 + 3(1−t)t² P2 + t³P3``: ``P0`` on a random
  image side (uniform along it), ``P3`` uniform in ``[0.1S, 0.9S]²``, ``P1``,
  ``P2`` uniform in ``[−0.1S, 1.1S]²``; width ``w ~ U(1.5, width_max)`` px.
* Up to ``max_branches`` branches per main curve, each kept with probability
  0.6: a quadratic Bézier from ``B(t0)``, ``t0 ~ U(0.2, 0.8)``, in the
  direction of the parent's tangent turned by ``±U(25°, 70°)``, length
  ``L ~ U(0.15S, 0.4S)`` (end ``E = B(t0) + L·d``), middle control point
  ``(B(t0) + E)/2 + U(−0.2, 0.2)·L·n`` (``n ⊥ d``); width ``U(1, 2)`` px.
* Each curve is sampled at ``6S + 1`` uniform ``t`` (spacing ≤ 0.85 px, as a
  control polygon inside ``[−0.1S, 1.1S]²`` is shorter than ``5.1S``). The
  pixel holding a sample is a *centreline cell* and keeps that sample's point
  ``p``, unit tangent ``τ``, width and contrast (branches are written after
  their parents; at crossings the later curve's sample wins).
* Anti-aliased coverage of pixel centre ``q`` from each centreline cell within
  2 px (5×5 window): ``clip(w/2 + 0.5 − |(q − p) × τ|, 0, 1)`` when
  ``|(q − p)·τ| ≤ 1`` (the distance to the local tangent line, box-filter
  approximation), else 0; a pixel's coverage ``α`` is the max over cells.
* Mask = ``α ≥ 0.5`` or a centreline cell; consecutive samples are < 1 px
  apart, so each curve's centreline cells are 8-connected and every branch
  touches its parent: masks are 1–3 px wide and connected per tree (a curve
  leaving and re-entering the frame gives two pieces).

Image (shared with `make_blobs`), per image and channel ``c``:

* background ``B = col_c · (1 + a_t·T) · (1 + g·R)``: colour
  ``col_c ~ U(0.35, 0.85)``; ``T`` a smooth noise field (standard normals on
  4×4 and 8×8 grids, bilinearly upsampled, summed with weights 1 and 0.5);
  ``a_t ~ U(0.05, 0.2)``; ``R = ((x − S/2)cos θ + (y − S/2)sin θ)/S`` an
  illumination ramp, ``g ~ U(0, 0.6)``, ``θ ~ U(0, 2π)``;
* the structure darkens it: ``I = B·(1 − k_c·D) + σ·ε``, ``D`` = max over cells
  of contrast × coverage, contrast ``~ U(contrast)`` per main curve, a branch's
  ``= its parent's × U(0.4, 1)`` (faint branches), ``k_c ~ U(0.7, 1)``,
  ``σ ~ U(noise)``, ``ε ~ N(0, 1)`` per pixel; clipped to [0, 1].

`make_blobs`: ``U{1, 2, 3}`` ellipses, centres ``U(0.2S, 0.8S)``, semi-axes
``U(0.08S, 0.22S)``, random angle; coverage ``clip(0.5 − g/|∇g|, 0, 1)`` with
``g = (x'/a)² + (y'/b)² − 1`` (first-order signed distance), mask ``g ≤ 0``;
contrast ``~ U(contrast)`` per ellipse; the same background and noise.

Shapes: images ``[n, size, size, channels]`` float32 in [0, 1], masks
``[n, size, size]`` float32 in {0, 1}.

Example:
  >>> images, masks = make_curves(4, size=32, seed=0, channels=3)
  >>> images.shape, masks.shape, images.dtype, sorted(set(masks.ravel().tolist()))
  ((4, 32, 32, 3), (4, 32, 32), dtype('float32'), [0.0, 1.0])
"""

from __future__ import annotations

from math import comb

import numpy as np

_CHUNK = 128  # images rendered at once (bounds the [chunk, curves, samples] arrays)


def _check(n: int, size: int, channels: int) -> None:
    for name, v, lo in (("n", n, 1), ("size", size, 16), ("channels", channels, 1)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")


def _range(name: str, r: tuple[float, float], lo: float, hi: float) -> tuple[float, float]:
    a, b = (float(v) for v in r)
    if not (lo <= a <= b <= hi):
        raise ValueError(f"{name} must be (low, high) with {lo} <= low <= high <= {hi}, got {r!r}")
    return a, b


def _upsample(grid: np.ndarray, size: int) -> np.ndarray:
    """Bilinear upsampling of ``[n, g, g]`` to ``[n, size, size]`` (grid nodes spread over the image)."""
    g = grid.shape[-1]
    pos = (np.arange(size) + 0.5) / size * (g - 1)
    lo = np.minimum(np.floor(pos).astype(int), g - 2)
    frac = pos - lo
    u = np.zeros((size, g), np.float32)
    u[np.arange(size), lo] = 1.0 - frac
    u[np.arange(size), lo + 1] = frac
    return np.einsum("hg,ngk,wk->nhw", u, grid, u, optimize=True)


def _background(rng: np.random.Generator, n: int, size: int, channels: int) -> np.ndarray:
    """Textured, unevenly lit background ``[n, size, size, channels]`` (see the module docstring)."""
    colour = rng.uniform(0.35, 0.85, (n, 1, 1, channels)).astype(np.float32)
    tex = _upsample(rng.standard_normal((n, 4, 4), np.float32), size)
    tex += 0.5 * _upsample(rng.standard_normal((n, 8, 8), np.float32), size)
    amp = rng.uniform(0.05, 0.2, (n, 1, 1)).astype(np.float32)
    g = rng.uniform(0.0, 0.6, (n, 1, 1)).astype(np.float32)
    theta = rng.uniform(0.0, 2 * np.pi, (n, 1, 1)).astype(np.float32)
    c = (np.arange(size, dtype=np.float32) + 0.5 - size / 2) / size
    ramp = np.cos(theta) * c[None, None, :] + np.sin(theta) * c[None, :, None]
    light = (1.0 + amp * tex) * (1.0 + g * ramp)
    return colour * light[..., None]


def _finish(rng: np.random.Generator, bg: np.ndarray, dark: np.ndarray, noise: tuple[float, float]) -> np.ndarray:
    """``clip(B·(1 − k_c·D) + σ·ε, 0, 1)`` for ``bg [n, S, S, C]``, ``dark [n, S, S]``."""
    n, _, _, ch = bg.shape
    k = rng.uniform(0.7, 1.0, (n, 1, 1, ch)).astype(np.float32)
    sigma = rng.uniform(noise[0], noise[1], (n, 1, 1, 1)).astype(np.float32)
    eps = rng.standard_normal(bg.shape, np.float32)
    return np.clip(bg * (1.0 - k * dark[..., None]) + sigma * eps, 0.0, 1.0).astype(np.float32)


def _bezier(ctrl: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Points and tangents of Bézier curves ``ctrl [..., K+1, 2]`` at ``t [T]`` -> two ``[..., T, 2]``."""
    k = ctrl.shape[-2] - 1
    tt, om = t[:, None], 1.0 - t[:, None]
    basis = np.concatenate([comb(k, i) * om ** (k - i) * tt**i for i in range(k + 1)], axis=1)  # [T, K+1]
    dbasis = np.concatenate([comb(k - 1, i) * om ** (k - 1 - i) * tt**i for i in range(k)], axis=1)  # [T, K]
    ctrl = ctrl.astype(np.float32)
    return basis.astype(np.float32) @ ctrl, (k * dbasis).astype(np.float32) @ np.diff(ctrl, axis=-2)


def _curve_params(
    rng: np.random.Generator,
    n: int,
    size: int,
    max_curves: int,
    max_branches: int,
    width_max: float,
    contrast: tuple[float, float],
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """All random geometry for ``n`` images: main cubic controls, branch quadratic controls, widths, contrasts."""
    s = float(size)
    m = max_curves
    count = rng.integers(2, m + 1, n)
    side = rng.integers(0, 4, (n, m))
    along = rng.uniform(0.0, s, (n, m))
    p0 = np.stack(
        [
            np.where(side == 0, 0.0, np.where(side == 1, s, along)),  # x
            np.where(side == 2, 0.0, np.where(side == 3, s, along)),  # y
        ],
        axis=-1,
    )
    p12 = rng.uniform(-0.1 * s, 1.1 * s, (n, m, 2, 2))
    p3 = rng.uniform(0.1 * s, 0.9 * s, (n, m, 1, 2))
    main = np.concatenate([p0[:, :, None], p12, p3], axis=2)  # [n, m, 4, 2]
    main_on = np.arange(m)[None] < count[:, None]
    main_w = rng.uniform(1.5, width_max, (n, m))
    main_k = rng.uniform(contrast[0], contrast[1], (n, m))

    b = max_branches
    t0 = rng.uniform(0.2, 0.8, (n, m, b))
    turn = rng.uniform(np.deg2rad(25), np.deg2rad(70), (n, m, b)) * rng.choice([-1.0, 1.0], (n, m, b))
    length = rng.uniform(0.15 * s, 0.4 * s, (n, m, b))
    bend = rng.uniform(-0.2, 0.2, (n, m, b))
    br_on = (rng.random((n, m, b)) < 0.6) & main_on[..., None]
    br_w = rng.uniform(1.0, 2.0, (n, m, b))
    br_k = main_k[..., None] * rng.uniform(0.4, 1.0, (n, m, b))

    # start points and tangents of the branches on their parents, one t0 each
    om = 1.0 - t0[..., None]
    tt = t0[..., None]
    c = main[:, :, None]  # [n, m, 1, 4, 2]
    start = om**3 * c[..., 0, :] + 3 * om**2 * tt * c[..., 1, :] + 3 * om * tt**2 * c[..., 2, :] + tt**3 * c[..., 3, :]
    der = 3 * (om**2 * (c[..., 1, :] - c[..., 0, :]) + 2 * om * tt * (c[..., 2, :] - c[..., 1, :]))
    der = der + 3 * tt**2 * (c[..., 3, :] - c[..., 2, :])
    ang = np.arctan2(der[..., 1], der[..., 0]) + turn
    d = np.stack([np.cos(ang), np.sin(ang)], axis=-1)
    nrm = np.stack([-d[..., 1], d[..., 0]], axis=-1)
    end = start + length[..., None] * d
    mid = (start + end) / 2 + (bend * length)[..., None] * nrm
    branch = np.stack([start, mid, end], axis=-2)  # [n, m, b, 3, 2]
    return [main, main_on, main_w, main_k], [branch.reshape(n, m * b, 3, 2), br_on.reshape(n, m * b), br_w, br_k]


def _render_curves(size: int, main: list[np.ndarray], branch: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Coverage-weighted darkness ``D`` and mask for one chunk of images (see the module docstring)."""
    ctrl_m, on_m, w_m, k_m = main
    ctrl_b, on_b, w_b, k_b = branch
    n = ctrl_m.shape[0]
    t = np.linspace(0.0, 1.0, 6 * size + 1)
    grid = np.zeros((n, size, size, 6), np.float32)  # per centreline cell: p (x, y), τ (x, y), width, contrast
    cell = np.zeros((n, size, size), bool)
    for ctrl, on, w, k in ((ctrl_m, on_m, w_m, k_m), (ctrl_b, on_b, w_b.reshape(on_b.shape), k_b.reshape(on_b.shape))):
        pts, der = _bezier(ctrl, t)  # [n, c, T, 2]
        tau = der / np.maximum(np.sqrt((der * der).sum(-1, keepdims=True)), 1e-9)
        ix = np.floor(pts).astype(np.int32)
        keep = on[..., None] & (ix >= 0).all(-1) & (ix < size).all(-1)
        img, cur, smp = np.nonzero(keep)
        cx, cy = ix[img, cur, smp, 0], ix[img, cur, smp, 1]
        cell[img, cy, cx] = True
        wk = np.stack([w[img, cur], k[img, cur]], axis=-1).astype(np.float32)
        grid[img, cy, cx] = np.concatenate([pts[img, cur, smp], tau[img, cur, smp], wk], axis=-1)
    img, cy, cx = np.nonzero(cell)
    px, py, tx, ty, w, k = grid[img, cy, cx].T
    alpha = np.zeros(n * size * size, np.float32)
    dark = np.zeros(n * size * size, np.float32)
    flat = (img * size + cy) * size + cx
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            ok = (cy + dy >= 0) & (cy + dy < size) & (cx + dx >= 0) & (cx + dx < size)
            ry, rx = cy[ok] + (dy + 0.5) - py[ok], cx[ok] + (dx + 0.5) - px[ok]
            along = rx * tx[ok] + ry * ty[ok]
            perp = np.abs(rx * ty[ok] - ry * tx[ok])
            cov = np.clip(w[ok] / 2 + 0.5 - perp, 0.0, 1.0) * (np.abs(along) <= 1.0)
            idx = flat[ok] + (dy * size + dx)  # distinct within one offset: plain fancy max is exact
            alpha[idx] = np.maximum(alpha[idx], cov)
            dark[idx] = np.maximum(dark[idx], cov * k[ok])
    alpha, dark = alpha.reshape(n, size, size), dark.reshape(n, size, size)
    mask = (alpha >= 0.5) | cell
    return dark, mask.astype(np.float32)


def make_curves(
    n: int,
    size: int = 64,
    seed: int = 0,
    *,
    channels: int = 3,
    max_curves: int = 4,
    max_branches: int = 2,
    width_max: float = 3.0,
    contrast: tuple[float, float] = (0.12, 0.45),
    noise: tuple[float, float] = (0.01, 0.05),
) -> tuple[np.ndarray, np.ndarray]:
    """SYNTHETIC branching thin curves on textured backgrounds (generator: the module docstring).

    Args:
      n: number of images (≥ 1).
      size: image side in px (≥ 16).
      seed: the only source of randomness.
      channels: image channels (≥ 1).
      max_curves: main curves per image are ``U{2, …, max_curves}`` (≥ 2).
      max_branches: branch slots per main curve (≥ 0), each used with probability 0.6.
      width_max: main-curve widths ``U(1.5, width_max)`` px, in [1.5, 3].
      contrast: range of the main curves' darkening, within [0, 1].
      noise: range of the per-image Gaussian noise σ, within [0, 1].

    Returns:
      ``(images [n, size, size, channels] float32 in [0, 1], masks [n, size, size] float32 in {0, 1})``.
    """
    _check(n, size, channels)
    if isinstance(max_curves, bool) or not isinstance(max_curves, (int, np.integer)) or max_curves < 2:
        raise ValueError(f"max_curves must be an int >= 2, got {max_curves!r}")
    if isinstance(max_branches, bool) or not isinstance(max_branches, (int, np.integer)) or max_branches < 0:
        raise ValueError(f"max_branches must be an int >= 0, got {max_branches!r}")
    if not 1.5 <= float(width_max) <= 3.0:
        raise ValueError(f"width_max must lie in [1.5, 3], got {width_max!r}")
    contrast, noise = _range("contrast", contrast, 0.0, 1.0), _range("noise", noise, 0.0, 1.0)
    rng = np.random.default_rng(seed)
    main, branch = _curve_params(rng, n, size, int(max_curves), int(max_branches), float(width_max), contrast)
    bg = _background(rng, n, size, channels)
    dark = np.zeros((n, size, size), np.float32)
    masks = np.zeros((n, size, size), np.float32)
    for s in range(0, n, _CHUNK):
        sl = slice(s, s + _CHUNK)
        dark[sl], masks[sl] = _render_curves(size, [a[sl] for a in main], [a[sl] for a in branch])
    return _finish(rng, bg, dark, noise), masks


def make_blobs(
    n: int,
    size: int = 64,
    seed: int = 0,
    *,
    channels: int = 3,
    contrast: tuple[float, float] = (0.12, 0.45),
    noise: tuple[float, float] = (0.01, 0.05),
) -> tuple[np.ndarray, np.ndarray]:
    """SYNTHETIC thick convex shapes (1–3 ellipses) with `make_curves`' image statistics.

    Returns:
      ``(images [n, size, size, channels] float32 in [0, 1], masks [n, size, size] float32 in {0, 1})``.
    """
    _check(n, size, channels)
    contrast, noise = _range("contrast", contrast, 0.0, 1.0), _range("noise", noise, 0.0, 1.0)
    rng = np.random.default_rng(seed)
    s, k = float(size), 3
    count = rng.integers(1, k + 1, n)
    centre = rng.uniform(0.2 * s, 0.8 * s, (n, k, 1, 1, 2)).astype(np.float32)
    axes = rng.uniform(0.08 * s, 0.22 * s, (n, k, 1, 1, 2)).astype(np.float32)
    ang = rng.uniform(0.0, np.pi, (n, k, 1, 1)).astype(np.float32)
    kappa = rng.uniform(contrast[0], contrast[1], (n, k, 1, 1)).astype(np.float32)
    on = (np.arange(k)[None] < count[:, None])[..., None, None]
    bg = _background(rng, n, size, channels)
    c = np.arange(size, dtype=np.float32) + 0.5
    rx, ry = c[None, None, None, :] - centre[..., 0], c[None, None, :, None] - centre[..., 1]
    u = np.cos(ang) * rx + np.sin(ang) * ry
    v = -np.sin(ang) * rx + np.cos(ang) * ry
    a, b = axes[..., 0], axes[..., 1]
    g = (u / a) ** 2 + (v / b) ** 2 - 1.0
    grad = 2.0 * np.sqrt((u / a**2) ** 2 + (v / b**2) ** 2)
    cov = np.clip(0.5 - g / np.maximum(grad, 1e-6), 0.0, 1.0) * on  # [n, k, S, S]
    dark = (cov * kappa).max(axis=1)
    masks = ((g <= 0.0) & on).any(axis=1).astype(np.float32)
    return _finish(rng, bg, dark, noise), masks
