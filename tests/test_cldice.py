"""Soft skeleton, clDice loss and hard topology metrics (`lorajax.cldice`).

The 32×32 examples are the ones of the applications spec §2 (CHECKED numbers):
a 5-px-thick bar ``M = rows 14..18 × cols 4..27``, the bar with a 2-column gap,
and the bar plus a 1-px branch of 12 px (rows 2..13, col 16) that the
prediction misses.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lorajax import cldice

BAR = np.zeros((32, 32), np.float32)
BAR[14:19, 4:28] = 1.0


def _np_pool(x, window, op):
    """numpy reference: stride-1 pool over the last len(window) axes, padded with ∓inf by w // 2."""
    nd = len(window)
    fill = np.inf if op is np.min else -np.inf
    pad = [(0, 0)] * (x.ndim - nd) + [(w // 2, w // 2) for w in window]
    xp = np.pad(x, pad, constant_values=fill)
    shifts = np.stack(
        [xp[(...,) + tuple(slice(o, o + n) for o, n in zip(off, x.shape[-nd:]))] for off in np.ndindex(*window)]
    )
    return op(shifts, axis=0)


def _np_erode(x, nd):
    return np.min([_np_pool(x, tuple(3 if a == i else 1 for a in range(nd)), np.min) for i in range(nd)], axis=0)


def _np_open(x, nd):
    return _np_pool(_np_erode(x, nd), (3,) * nd, np.max)


def test_soft_morphology_equals_reference_pools_on_random_input():
    x2 = np.random.default_rng(0).random((2, 7, 9)).astype(np.float32)
    x3 = np.random.default_rng(1).random((1, 4, 5, 6)).astype(np.float32)
    np.testing.assert_array_equal(cldice.soft_erode(x2), _np_erode(x2, 2))
    np.testing.assert_array_equal(cldice.soft_dilate(x2), _np_pool(x2, (3, 3), np.max))
    np.testing.assert_array_equal(cldice.soft_erode(x3, spatial_dims=3), _np_erode(x3, 3))
    np.testing.assert_array_equal(cldice.soft_dilate(x3, spatial_dims=3), _np_pool(x3, (3, 3, 3), np.max))


def test_iters_is_k_of_the_official_loop_and_seglab_n_is_k_plus_one():
    x = np.random.default_rng(2).random((2, 12, 12)).astype(np.float32)
    relu = lambda v: np.maximum(v, 0.0)  # noqa: E731
    # Seglab's loop with n = 4: skel = 0; n times {δ = relu(I − O(I)); skel += relu(δ − skel·δ); I = E(I)}
    img, skel = x.copy(), np.zeros_like(x)
    for _ in range(4):
        delta = relu(img - _np_open(img, 2))
        skel = skel + relu(delta - skel * delta)
        img = _np_erode(img, 2)
    np.testing.assert_allclose(cldice.soft_skeleton(x, iters=3), skel, rtol=0, atol=1e-6)


def test_one_pixel_lines_are_their_own_skeleton_2d_and_3d():
    line = np.zeros((32, 32), np.float32)
    line[10, 3:29] = 1.0
    np.testing.assert_array_equal(cldice.soft_skeleton(line, iters=10), line)
    vol = np.zeros((1, 6, 7, 8), np.float32)
    vol[0, 3, 1:6, 4] = 1.0
    np.testing.assert_array_equal(cldice.soft_skeleton(vol, iters=10, spatial_dims=3), vol)


def test_five_pixel_bar_skeleton_is_its_centre_row():
    skel = np.asarray(cldice.soft_skeleton(BAR, iters=10))
    expect = np.zeros_like(BAR)
    expect[16, 6:26] = 1.0  # 20 px, two px shorter than the bar at each end
    np.testing.assert_array_equal(skel, expect)


def test_cldice_of_identical_masks():
    # hard metric, Seglab's 2·Tp·Ts / (Tp + Ts + eps): 1 − 5e-7 (− 5e-8 from Tp = 20 / (20 + eps))
    assert abs((1.0 - cldice.cldice_score(BAR, BAR)) - 5e-7) < 1e-7
    # soft loss in Seglab's form (+eps in the numerator too): exact value 5e-8, float32 resolution 1.2e-7
    assert 0.0 <= float(cldice.cldice_loss(BAR[None], BAR[None])) <= 1.2e-7


def test_gap_example_dice_and_cldice():
    gap = BAR.copy()
    gap[:, 15:17] = 0.0
    assert abs(1.0 - float(cldice.soft_dice_loss(gap[None], BAR[None])) - 0.957) < 1e-3  # 22/23
    assert abs(1.0 - float(cldice.cldice_loss(gap[None], BAR[None])) - 0.947) < 1e-3  # Tsens = 18/20
    assert abs(cldice.dice_score(gap, BAR) - 22 / 23) < 1e-6


def test_missed_thin_branch_hurts_cldice_much_more_than_dice():
    target = BAR.copy()
    target[2:14, 16] = 1.0
    pred = BAR[None]
    assert abs(float(cldice.soft_dice_loss(pred, target[None])) - (1 - 0.952)) < 1e-3  # 1 − 240/252
    assert abs(float(cldice.cldice_loss(pred, target[None])) - (1 - 0.793)) < 1e-3  # Tsens = 21/32


def test_loss_is_per_sample_mean_jits_and_has_finite_nonzero_grad():
    rng = np.random.default_rng(3)
    prob = jnp.asarray(rng.random((3, 1, 16, 16)), jnp.float32)
    target = jnp.asarray(rng.random((3, 1, 16, 16)) > 0.6, jnp.float32)
    loss, g = jax.jit(jax.value_and_grad(cldice.cldice_loss))(prob, target)
    # the batch of three is the mean of three batches of one sample each (same shape: no new compile)
    rep = lambda x, i: jnp.repeat(x[i : i + 1], 3, axis=0)  # noqa: E731
    each = [float(cldice.cldice_loss(rep(prob, i), rep(target, i))) for i in range(3)]
    np.testing.assert_allclose(float(loss), np.mean(each), rtol=1e-5)
    assert bool(jnp.isfinite(g).all()) and float(jnp.abs(g).max()) > 0.0


def test_hard_skeleton_of_thick_shapes_is_thin_connected_and_inside():
    shape = np.zeros((2, 40, 40), bool)
    shape[0, 10:17, 3:37] = True  # 7-px bar
    yy, xx = np.mgrid[:40, :40]
    shape[1] = ((yy - 20) ** 2 + (xx - 20) ** 2 <= 64) | ((np.abs(yy - 20) <= 2) & (xx > 20))  # disk + arm
    skel = cldice.skeletonize(shape)
    for s, m in zip(skel, shape):
        assert not (s & ~m).any() and s.sum() > 10
        assert cldice.betti0(s) == 1
        # 1 px wide: no 2×2 block of skeleton pixels
        assert not (s[:-1, :-1] & s[1:, :-1] & s[:-1, 1:] & s[1:, 1:]).any()
    assert skel[0].sum(axis=0).max() == 1


def test_zhang_suen_keeps_a_pixel_of_a_2x2_square():
    m = np.zeros((6, 6), bool)
    m[2:4, 2:4] = True
    s = cldice.skeletonize(m)
    assert s.sum() == 1 and (s & m).sum() == 1


def test_betti_numbers_and_errors():
    two = np.zeros((20, 20), np.float32)
    two[2:6, 2:6] = 1.0
    two[10:15, 9:16] = 1.0
    assert cldice.betti0(two) == 2
    diag = np.eye(6, dtype=np.float32)  # one 8-connected component
    assert cldice.betti0(diag) == 1
    ring = np.zeros((9, 9), np.float32)
    ring[1:8, 1:8] = 1.0
    ring[3:6, 3:6] = 0.0
    assert cldice.betti1(ring) == 1 and cldice.betti1(two) == 0
    one = two.copy()
    one[10:15, 9:16] = 0.0
    errs = cldice.betti0_error(np.stack([one, two]), np.stack([two, two]), reduction="none")
    np.testing.assert_array_equal(errs, [1.0, 0.0])


def test_bad_input_raises():
    with pytest.raises(ValueError, match="shapes differ"):
        cldice.cldice_loss(jnp.zeros((1, 8, 8)), jnp.zeros((1, 8, 9)))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        cldice.cldice_loss(jnp.full((1, 8, 8), 1.5), jnp.zeros((1, 8, 8)))
    with pytest.raises(ValueError, match="channel-last"):
        cldice.cldice_loss(jnp.zeros((2, 8, 8, 1)), jnp.zeros((2, 8, 8, 1)))
    with pytest.raises(ValueError, match="spatial_dims"):
        cldice.soft_erode(jnp.zeros((8, 8)), spatial_dims=4)
    with pytest.raises(ValueError, match="iters"):
        cldice.soft_skeleton(jnp.zeros((8, 8)), iters=-1)
    with pytest.raises(ValueError, match="shapes differ"):
        cldice.cldice_score(np.zeros((8, 8)), np.zeros((9, 8)))
    with pytest.raises(ValueError, match="reduction"):
        cldice.dice_score(np.zeros((8, 8)), np.zeros((8, 8)), reduction="sum")
