"""Interval arithmetic of sweep reports, against numbers worked out by hand."""

import math

import numpy as np
import pytest
from torch.testing import assert_close

from forkrl.sweep.stats import curve_band, mean_interval, paired_difference, t_quantile


def test_t_quantiles_are_the_tables():
    # two-sided 95%: the published Student-t table values for 1, 2, 3 and 4 degrees of freedom
    assert_close(t_quantile(1), 12.706205, rtol=1e-6, atol=0)
    assert_close(t_quantile(2), 4.302653, rtol=1e-6, atol=0)
    assert_close(t_quantile(3), 3.182446, rtol=1e-6, atol=0)
    assert_close(t_quantile(4), 2.776445, rtol=1e-6, atol=0)


def test_mean_interval_of_four_values():
    # x = 1, 2, 3, 4: mean 2.5; deviations ±1.5, ±0.5 -> Σd² = 5, s = √(5/3) = 1.2909944;
    # s/√4 = 0.6454972; t_{0.975,3} = 3.1824463 -> half-width 2.0542603, CI [0.4457397, 4.5542603]
    iv = mean_interval([1.0, 2.0, 3.0, 4.0])
    assert iv.n == 4
    assert_close(iv.mean, 2.5)
    assert_close(iv.std, 1.2909944, rtol=1e-7, atol=0)
    assert_close(iv.half_width, 2.0542603, rtol=1e-7, atol=0)
    assert_close(iv.low, 0.4457397, rtol=1e-6, atol=0)
    assert_close(iv.high, 4.5542603, rtol=1e-7, atol=0)
    assert iv.text(2) == "2.50 ± 2.05"


def test_one_value_has_no_interval():
    iv = mean_interval([41.5])
    assert iv.mean == 41.5 and iv.half_width is None and iv.low is None and iv.text() == "41.5"


def test_paired_difference_by_seed():
    # cell 40, 45, 38 and baseline 38, 41, 37 on seeds 0, 1, 2: d = 2, 4, 1, mean 7/3 = 2.3333333;
    # deviations -1/3, 5/3, -4/3 -> Σd² = 42/9, s = √(42/18) = 1.5275252, s/√3 = 0.8819171;
    # t_{0.975,2} = 4.3026527 -> half-width 3.7945830. Seed 3 (baseline only) is left out.
    cell = {0: 40.0, 1: 45.0, 2: 38.0}
    base = {0: 38.0, 1: 41.0, 2: 37.0, 3: 50.0}
    iv, seeds = paired_difference(cell, base)
    assert seeds == [0, 1, 2]
    assert_close(iv.mean, 7 / 3)
    assert_close(iv.std, 1.5275252, rtol=1e-7, atol=0)
    assert_close(iv.half_width, 3.7945830, rtol=1e-7, atol=0)
    # the cell alone: mean 41, deviations -1, 4, -3 -> s = √13, half-width 4.3026527 · √(13/3) = 8.9566859,
    # more than twice the paired one: pairing removes what a seed does to both cells
    assert_close(mean_interval(list(cell.values())).half_width, 8.9566859, rtol=1e-7, atol=0)
    assert paired_difference({5: 1.0}, base) is None


def test_curve_band_per_step():
    # step 0: values 1 and 3 -> mean 2, s = √2, half = 12.706205 · √2 / √2 = 12.706205
    # step 1: values 2, 2 -> no spread; step 2: one run only -> no band (low = high = mean)
    mean, low, high = curve_band([np.array([1.0, 2.0, 5.0]), np.array([3.0, 2.0, np.nan])])
    assert_close(mean, np.array([2.0, 2.0, 5.0]))
    assert_close(high - mean, np.array([12.706205, 0.0, 0.0]), rtol=1e-6, atol=1e-12)
    assert_close(mean - low, high - mean)


def test_empty_input_is_an_error():
    with pytest.raises(ValueError):
        mean_interval([])
    assert math.isnan(curve_band([np.array([np.nan])])[0][0])
