"""SYNTHETIC thin-curve and blob segmentation data (`lorajax.data.curves`)."""

import numpy as np
import pytest

from lorajax import cldice
from lorajax.data import curves


@pytest.fixture(scope="module")
def curve_set():
    return curves.make_curves(24, size=48, seed=3, channels=3)


def test_shapes_dtypes_ranges(curve_set):
    images, masks = curve_set
    assert images.shape == (24, 48, 48, 3) and masks.shape == (24, 48, 48)
    assert images.dtype == np.float32 and masks.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert set(np.unique(masks).tolist()) == {0.0, 1.0}
    assert (masks.reshape(24, -1).sum(1) > 0).all()  # every image has a structure
    gray, _ = curves.make_curves(2, size=32, seed=0, channels=1)
    assert gray.shape == (2, 32, 32, 1)


def test_deterministic_in_seed_and_independent_of_chunking(curve_set, monkeypatch):
    images, masks = curves.make_curves(24, size=48, seed=3, channels=3)
    np.testing.assert_array_equal(images, curve_set[0])
    np.testing.assert_array_equal(masks, curve_set[1])
    monkeypatch.setattr(curves, "_CHUNK", 5)  # rendering in other chunks draws nothing new
    chunked = curves.make_curves(24, size=48, seed=3, channels=3)
    np.testing.assert_array_equal(chunked[0], images)
    np.testing.assert_array_equal(chunked[1], masks)
    other = curves.make_curves(24, size=48, seed=4, channels=3)
    assert not np.array_equal(other[1], masks) and not np.array_equal(other[0], images)


def test_curve_masks_are_thin_and_darker_than_background(curve_set):
    images, masks = curve_set
    m = masks > 0.5
    # skeleton length / area ≈ 1 / width: widths 1-3 px give > 0.3; blobs (radius ≥ 4 px) far less
    assert cldice.skeletonize(m).sum() / m.sum() > 0.3
    _, blob_masks = curves.make_blobs(8, size=48, seed=3)
    b = blob_masks > 0.5
    assert cldice.skeletonize(b).sum() / b.sum() < 0.1
    # the structure darkens the background: mean intensity on the mask below that off the mask, per image
    gray = images.mean(-1)
    on = (gray * m).sum((1, 2)) / m.sum((1, 2))
    off = (gray * ~m).sum((1, 2)) / (~m).sum((1, 2))
    assert (on < off).mean() > 0.9


def test_blobs_shapes_and_determinism():
    a = curves.make_blobs(6, size=32, seed=1, channels=2)
    b = curves.make_blobs(6, size=32, seed=1, channels=2)
    assert a[0].shape == (6, 32, 32, 2) and a[1].shape == (6, 32, 32)
    np.testing.assert_array_equal(a[0], b[0])
    assert a[0].min() >= 0.0 and a[0].max() <= 1.0 and set(np.unique(a[1]).tolist()) == {0.0, 1.0}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n=0), "n must"),
        (dict(n=2.5), "n must"),
        (dict(n=2, size=8), "size must"),
        (dict(n=2, channels=0), "channels must"),
        (dict(n=2, contrast=(0.5, 0.2)), "contrast"),
        (dict(n=2, noise=(-0.1, 0.2)), "noise"),
        (dict(n=2, max_curves=1), "max_curves"),
        (dict(n=2, width_max=5.0), "width_max"),
    ],
)
def test_bad_input_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        curves.make_curves(**kwargs)
    if set(kwargs) <= {"n", "size", "channels"}:
        with pytest.raises(ValueError, match=match):
            curves.make_blobs(**kwargs)
