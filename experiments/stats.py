"""Confidence intervals over seeds and the verdict of a declared effect.

An effect's *contrast* is one number per seed, signed so that a positive value
is the paper's direction (e.g. ``loss(LoRA) - loss(LoRA-GA)`` for "LoRA-GA
reaches a lower loss"). Over ``n`` seeds its 95% confidence interval is the
Student t-interval ``mean ± t_{0.975, n-1} · sd / sqrt(n)``; when every arm of
a seed shares the data order and the initialisation seed, the per-seed
differences are paired and this is the paired t-interval.

Verdicts, fixed before any result is seen:

- ``superiority`` (the paper says "better"): **reproduced** if the interval
  lies above 0, **not reproduced** if it lies below 0, else **inconclusive**.
- ``non-inferiority`` with a declared margin ``m`` > 0 (the paper says "close
  to" / "matches"): **reproduced** if the interval lies above ``-m``, **not
  reproduced** if it lies below ``-m``, else **inconclusive**.

With one seed there is no interval: the verdict is ``single observation``.

Example:
  >>> ci = t_interval([0.30, 0.25, 0.35])
  >>> round(ci.mean, 3), round(ci.low, 3), round(ci.high, 3)
  (0.3, 0.176, 0.424)
  >>> verdict(ci, "superiority")
  'reproduced'
  >>> verdict(t_interval([0.01, -0.02, 0.02]), "non-inferiority", margin=0.05)
  'reproduced'
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np

__all__ = ["Interval", "t_interval", "interval_text", "verdict", "KINDS", "VERDICTS"]

#: the kinds of claim an effect can make
KINDS = ("superiority", "non-inferiority")
#: every verdict `verdict` can give
VERDICTS = ("reproduced", "not reproduced", "inconclusive", "single observation")


class Interval(NamedTuple):
    """A mean with its two-sided confidence interval over ``n`` values (``se``: standard error)."""

    mean: float
    low: float
    high: float
    se: float
    n: int


def t_interval(values: Sequence[float] | np.ndarray, level: float = 0.95) -> Interval:
    """The Student t confidence interval of the mean of ``values`` (one per seed).

    Args:
      values: finite numbers, at least one (with one, low = high = mean and se = nan).
      level: the coverage, in (0, 1).

    Raises:
      ValueError: no values, a non-finite value, or ``level`` outside (0, 1).
    """
    x = np.asarray(values, np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"t_interval needs a non-empty list of numbers, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"t_interval got a non-finite value: {x.tolist()}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    mean = float(x.mean())
    if x.size == 1:
        return Interval(mean, mean, mean, math.nan, 1)
    from scipy import stats  # type: ignore[import-untyped]

    se = float(x.std(ddof=1) / math.sqrt(x.size))
    half = float(stats.t.ppf(0.5 + level / 2, x.size - 1)) * se
    return Interval(mean, mean - half, mean + half, se, int(x.size))


def interval_text(values: Sequence[float] | np.ndarray, sign: str = "+", digits: int = 4) -> str:
    """``"mean [low, high]"`` of `t_interval` ``(values)``, each formatted ``f"{x:{sign}.{digits}f}"``."""
    i = t_interval(values)
    return f"{i.mean:{sign}.{digits}f} [{i.low:{sign}.{digits}f}, {i.high:{sign}.{digits}f}]"


def verdict(ci: Interval, kind: str, margin: float = 0.0) -> str:
    """The verdict of a contrast's interval ``ci`` for a claim of ``kind`` (see the module doc).

    Raises:
      ValueError: an unknown ``kind``, or a non-inferiority claim without a margin > 0.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "non-inferiority" and not margin > 0:
        raise ValueError(f"a non-inferiority claim needs a margin > 0, got {margin}")
    if ci.n < 2:
        return "single observation"
    bound = -margin if kind == "non-inferiority" else 0.0
    if ci.low > bound:
        return "reproduced"
    if ci.high < bound:
        return "not reproduced"
    return "inconclusive"
