"""Which tokens' entropy does RL change? (paper 1, Fig. 4)

For the same responses scored before and after training (two store columns), tokens are
ranked by their *before* entropy and cut into `num_buckets` equal-count buckets (20 buckets of
5% each): bucket b holds the tokens of rank r (0-based, ascending, ties by position) with
floor(r · num_buckets / N) = b. Per bucket we report the mean entropy change (after − before),
the mean absolute change and the before-entropy range. The paper (Qwen3-14B, base vs. step
1360): the higher the base entropy, the larger the increase; low-entropy tokens barely move.

The paper plots the mean change on a log-scale y axis, which only shows positive values. Here
the y axis is *symmetric log* (`symlog`): logarithmic for |y| above a small linear band around
0 (the band's half-width is the smallest non-zero |mean change|, rounded down to a power of
ten), so buckets whose entropy fell appear below the axis instead of vanishing; bars are
coloured by sign.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from forkrl.analysis.store import RolloutStore
from forkrl.io import atomic_write_json, pyplot, save_figure

__all__ = ["entropy_change_by_bucket", "run_shift"]


def entropy_change_by_bucket(before: np.ndarray, after: np.ndarray, num_buckets: int = 20) -> dict[str, list]:
    """Per bucket of `before`'s entropy rank: token count, before-entropy range, mean before,
    mean after, mean change (after − before) and mean |change|. `before`, `after`: `[N]`."""
    before = np.asarray(before)
    after = np.asarray(after)
    if before.shape != after.shape or before.ndim != 1:
        raise ValueError(f"need two [N] arrays of the same length, got {before.shape} and {after.shape}")
    n = before.size
    if n == 0 or num_buckets < 1:
        raise ValueError(f"need tokens and num_buckets >= 1, got N={n}, num_buckets={num_buckets}")
    order = np.argsort(before, kind="stable")  # (N,) rank -> position
    bucket = (np.arange(n, dtype=np.int64) * num_buckets) // n  # (N,) rank -> bucket
    b_sorted = before[order].astype(np.float64)
    change = after[order].astype(np.float64) - b_sorted
    counts = np.bincount(bucket, minlength=num_buckets)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_before = np.bincount(bucket, weights=b_sorted, minlength=num_buckets) / counts
        mean_change = np.bincount(bucket, weights=change, minlength=num_buckets) / counts
        mean_abs = np.bincount(bucket, weights=np.abs(change), minlength=num_buckets) / counts
    lower = np.full(num_buckets, np.nan)
    upper = np.full(num_buckets, np.nan)
    starts = np.searchsorted(bucket, np.arange(num_buckets), side="left")
    ends = np.searchsorted(bucket, np.arange(num_buckets), side="right")
    filled = ends > starts
    lower[filled] = b_sorted[starts[filled]]
    upper[filled] = b_sorted[ends[filled] - 1]
    return {
        "percentile_low": [100.0 * b / num_buckets for b in range(num_buckets)],
        "percentile_high": [100.0 * (b + 1) / num_buckets for b in range(num_buckets)],
        "count": counts.tolist(),
        "entropy_low": lower.tolist(),
        "entropy_high": upper.tolist(),
        "mean_before": mean_before.tolist(),
        "mean_after": (mean_before + mean_change).tolist(),
        "mean_change": mean_change.tolist(),
        "mean_abs_change": mean_abs.tolist(),
    }


def run_shift(
    store: str | os.PathLike | RolloutStore,
    out_dir: str | os.PathLike,
    before: str,
    after: str = "entropy",
    num_buckets: int = 20,
) -> dict[str, Any]:
    """Paper 1 Fig. 4 on a store; writes `shift.json` and `shift.png`.

    Args:
        before: the entropy column (or scoring name) of the model before RL, e.g. "base".
        after: the column of the model after RL (default `entropy`, the generator's).
        num_buckets: equal-count buckets of the before-entropy rank (20 = 5% each).

    Returns `shift.json`'s contents.
    """
    store = RolloutStore.open(store)
    before_col, after_col = store.resolve_column(before), store.resolve_column(after)
    if before_col == after_col:
        raise ValueError(f"before and after are the same column {before_col!r}")
    h_before = store.read_token_column(before_col, np.float32)
    h_after = store.read_token_column(after_col, np.float32)
    buckets = entropy_change_by_bucket(h_before, h_after, num_buckets)
    result = {
        "store": str(store.path),
        "before": before_col,
        "after": after_col,
        "num_tokens": int(h_before.size),
        "num_buckets": num_buckets,
        "mean_change_all": float(np.mean(h_after.astype(np.float64) - h_before)),
        "buckets": buckets,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "shift.json", result)
    _plot(buckets, before_col, after_col, out / "shift.png")
    return result


def _plot(buckets: dict[str, list], before: str, after: str, path: Path) -> None:
    plt = pyplot()
    change = np.asarray(buckets["mean_change"], dtype=np.float64)
    fig, ax = plt.subplots(figsize=(9, 4))
    x = np.arange(len(change))
    shown = np.nan_to_num(change)
    ax.bar(x, shown, color=np.where(shown >= 0, "#c44e52", "#4c72b0"))
    nonzero = np.abs(shown[shown != 0])
    linthresh = 10.0 ** math.floor(math.log10(nonzero.min())) if nonzero.size else 1e-6
    ax.set_yscale("symlog", linthresh=linthresh)
    ax.axhline(0.0, color="black", linewidth=0.8)
    labels = [f"{lo:g}-{hi:g}" for lo, hi in zip(buckets["percentile_low"], buckets["percentile_high"])]
    ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=8)
    ax.set_xlabel(f"entropy percentile range of {before.removeprefix('entropy_')} (%)")
    ax.set_ylabel("mean entropy change (symlog)")
    ax.set_title(
        f"{after.removeprefix('entropy_')} − {before.removeprefix('entropy_')}: red = increase, blue = decrease"
    )
    ax.grid(alpha=0.3, axis="y")
    save_figure(fig, path)
