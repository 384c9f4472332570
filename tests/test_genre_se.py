"""The genre task's standard errors: accuracy SE, the paired SE of a gain, and per-genre accuracy (tiny inputs)."""

import math

import numpy as np
import pytest

from experiments.tasks.genre import mean_se, paired_gain, per_class_accuracy


def test_mean_se_of_a_binary_vector():
    # 3 of 4 right: mean 0.75, sample variance (ddof=1) = (3 * 0.0625 + 0.5625) / 3 = 0.25, SE = 0.5 / 2
    assert mean_se(np.array([1, 1, 1, 0])) == pytest.approx((0.75, 0.25))
    with pytest.raises(ValueError, match="at least 2"):
        mean_se(np.array([1.0]))


def test_paired_se_is_the_se_of_the_per_example_differences():
    run = np.array([1, 1, 1, 1, 0, 1, 0, 1], bool)
    base = np.array([1, 1, 0, 1, 0, 1, 0, 0], bool)  # the run wins on 2 rows, loses on none
    out = paired_gain(run, base)
    d = np.array([0, 0, 1, 0, 0, 0, 0, 1], float)  # mean 0.25, sample variance 2 * 0.5625 + 6 * 0.0625 = 1.5 / 7
    assert out["gain"] == pytest.approx(0.25)
    assert out["gain_se"] == pytest.approx(math.sqrt(1.5 / 7 / 8))
    assert out["gain_se"] == pytest.approx(d.std(ddof=1) / math.sqrt(8))
    assert (out["accuracy"], out["baseline_accuracy"]) == pytest.approx((0.75, 0.5))
    # the runs agree on 6 of 8 rows: the paired SE is well below the unpaired one
    assert out["gain_se_unpaired"] == pytest.approx(math.hypot(out["se"], out["baseline_se"]))
    assert out["gain_se"] < 0.7 * out["gain_se_unpaired"]  # 0.164 vs 0.25


def test_identical_runs_gain_nothing_with_zero_paired_se():
    c = np.array([1, 0, 1, 1, 0], bool)
    out = paired_gain(c, c)
    assert out["gain"] == 0.0 and out["gain_se"] == 0.0 and out["gain_se_unpaired"] > 0.0


def test_paired_gain_needs_the_same_examples():
    with pytest.raises(ValueError, match="same examples"):
        paired_gain(np.ones(4), np.ones(5))


def test_per_class_accuracy():
    correct = np.array([1, 0, 1, 1, 1], bool)
    label = np.array([0, 0, 1, 1, 3])  # comedy 1/2, tragedy 2/2, no history, romance 1/1
    assert per_class_accuracy(correct, label) == {"comedy": 0.5, "tragedy": 1.0, "romance": 1.0}
