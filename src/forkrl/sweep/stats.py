"""Confidence intervals over seeds: Student-t means, paired differences against a baseline, curve bands.

A sweep runs each cell with the same n seeds. For a cell's final metric x_1..x_n (one per seed):

    mean = Σ x_i / n,   s = √(Σ (x_i − mean)² / (n − 1)),   95% CI = mean ± t_{0.975, n−1} · s / √n

with t the Student-t quantile with n − 1 degrees of freedom (`scipy.stats.t`). The comparison with
a baseline is *paired*: seed i of both cells shares the data order, the initial sampling and the
evaluation seed, so d_i = x_i − b_i removes what the seeds have in common, and the interval is the
same formula over the d_i (only seeds that both cells finished count). With n = 1 the mean is
reported and the interval is undefined (None).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95


def t_quantile(dof: int, confidence: float = CONFIDENCE) -> float:
    """Two-sided Student-t critical value: t_{(1 + confidence) / 2, dof}."""
    return float(stats.t.ppf(0.5 + confidence / 2, dof))


@dataclass
class Interval:
    """Mean and confidence interval of n values."""

    mean: float
    half_width: float | None
    """t_{0.975, n−1} · s / √n; None when n < 2."""
    n: int
    std: float | None
    """Sample standard deviation s (n − 1 in the denominator); None when n < 2."""

    @property
    def low(self) -> float | None:
        return None if self.half_width is None else self.mean - self.half_width

    @property
    def high(self) -> float | None:
        return None if self.half_width is None else self.mean + self.half_width

    def to_json(self) -> dict:
        return {**asdict(self), "low": self.low, "high": self.high}

    def text(self, digits: int = 1) -> str:
        """`41.2 ± 3.4` (or `41.2` with one value)."""
        if self.half_width is None:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.half_width:.{digits}f}"


def mean_interval(values: list[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean ± Student-t half-width of `values` (module docstring)."""
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    if n == 0:
        raise ValueError("no values")
    if n == 1:
        return Interval(float(x[0]), None, 1, None)
    std = float(x.std(ddof=1))
    return Interval(float(x.mean()), t_quantile(n - 1, confidence) * std / math.sqrt(n), n, std)


def paired_difference(
    cell: dict[int, float], baseline: dict[int, float], confidence: float = CONFIDENCE
) -> tuple[Interval, list[int]] | None:
    """Interval of cell − baseline over the seeds both have, and those seeds; None without any."""
    seeds = sorted(set(cell) & set(baseline))
    if not seeds:
        return None
    return mean_interval([cell[s] - baseline[s] for s in seeds], confidence), seeds


def curve_band(curves: list[np.ndarray], confidence: float = CONFIDENCE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-step mean and CI bounds of several runs' curves (NaN where a run has no value).

    Args:
        curves: one `[steps]` array per seed, NaN-padded to the same length.

    Returns:
        mean, low, high `[steps]`; low = high = mean where fewer than two runs have a value.
    """
    y = np.stack(curves)  # (seeds, steps)
    valid = ~np.isnan(y)
    n = valid.sum(0)  # (steps,) runs with a value at each step
    mean = np.divide(np.where(valid, y, 0.0).sum(0), n, out=np.full(n.shape, np.nan), where=n > 0)
    squares = np.where(valid, (y - mean) ** 2, 0.0).sum(0)
    var = np.divide(squares, n - 1, out=np.zeros(n.shape), where=n > 1)
    t = stats.t.ppf(0.5 + confidence / 2, np.maximum(n - 1, 1))  # (steps,)
    half = np.where(n > 1, t * np.sqrt(var / np.maximum(n, 1)), 0.0)
    return mean, mean - half, mean + half
