"""Calibration of probability forecasts: ECE, Brier and its Murphy decomposition, reliability diagrams.

Binning. Forecasts go to B equal-width bins of [0, 1] (`forkrl.tasks.forecast.equal_width_bin`:
bin k is [k/B, (k+1)/B), the last bin includes 1), the bins of the empirical-win-rate reward.
``bins=0`` instead makes one bin per distinct forecast value. Empty bins are left out.

With N forecasts p_i of 0/1 outcomes y_i, n_k of them in bin k, p̄_k and ȳ_k their means there
and ȳ the overall mean:

- ECE = Σ_k (n_k/N) · |p̄_k − ȳ_k|. Against the true probabilities q_i of a synthetic task the same
  formula with q̄_k (the mean true probability in the bin) in place of ȳ_k (`ece_true`).
- Brier = (1/N) Σ_i (p_i − y_i)²; log loss = −(1/N) Σ_i [y_i ln p_i + (1 − y_i) ln(1 − p_i)] with p
  clipped to [LOG_LOSS_EPS, 1 − LOG_LOSS_EPS] (1e-3: a certain, wrong forecast costs ln 1000 = 6.9).
- Murphy decomposition, computed for the *binned* forecasts (each p_i replaced by its bin's p̄_k),
  for which it is an identity:

      Brier_binned = (1/N) Σ_i (p̄_{k(i)} − y_i)² = REL − RES + UNC
      REL = Σ_k (n_k/N)(p̄_k − ȳ_k)²   RES = Σ_k (n_k/N)(ȳ_k − ȳ)²   UNC = ȳ(1 − ȳ)

  (because Σ_{i∈k} (y_i − ȳ_k)² = n_k ȳ_k(1 − ȳ_k) for 0/1 outcomes). The Brier score of the
  forecasts themselves differs from Brier_binned by the within-bin term
  W = (1/N) Σ_i [(p_i − y_i)² − (p̄_{k(i)} − y_i)²], reported too, so Brier = REL − RES + UNC + W
  exactly; W = 0 with ``bins=0``.
- Bayes-optimal Brier (with true probabilities): (1/N) Σ_i q_i(1 − q_i), the expected Brier of the
  truth itself, the limit no forecaster beats in expectation; and the mean squared error to the
  truth (1/N) Σ_i (p_i − q_i)², which the Brier score exceeds the Bayes limit by, in expectation:
  the expected Brier score over the outcomes' randomness is exactly Bayes + MSE (`expected_brier`),
  a figure free of the noise of one draw of outcomes.

`forkrl analyze calibration FILE` reads stored forecasts from a jsonl file, one object per line:
``outcome`` (0/1, required), the forecast as ``p`` (a number in [0, 1]) or else parsed from the
text in ``completion`` (or ``text``) with `forkrl.tasks.forecast.parse_forecast`, and optionally
``true_p``. The keys are options; a row whose text holds no valid forecast is counted as invalid
and left out of the metrics. The trainer's ``samples.jsonl`` reads with ``--outcome-key answer``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from forkrl.errors import UserError
from forkrl.io import atomic_write_json, jsonl_objects, pyplot, save_figure

# `forkrl.tasks.forecast` (and with it torch) is imported where it is used: `forkrl analyze --help`
# imports this module for its command and should stay fast.

__all__ = [
    "LOG_LOSS_EPS",
    "CalibrationInputError",
    "Forecasts",
    "MurphyDecomposition",
    "brier_score",
    "calibration_bins",
    "calibration_summary",
    "expected_calibration_error",
    "load_forecasts",
    "log_loss",
    "murphy_decomposition",
    "reliability_diagram",
    "run_calibration",
    "sharpness_histogram",
]

LOG_LOSS_EPS = 1e-3
"""Forecasts are clipped to [ε, 1 − ε] in the log loss."""


class CalibrationInputError(UserError):
    """A forecasts file that cannot be read; the message names the file, line and key."""


def _arrays(p, target) -> tuple[np.ndarray, np.ndarray]:
    p, target = np.asarray(p, dtype=np.float64), np.asarray(target, dtype=np.float64)
    if p.shape != target.shape or p.ndim != 1 or p.size == 0:
        raise ValueError(f"need two equal-length, non-empty 1-D sequences, got shapes {p.shape} and {target.shape}")
    return p, target


def _bin_ids(p: np.ndarray, bins: int) -> np.ndarray:
    """(N,) bin of each forecast: equal-width (`equal_width_bin`), or per distinct value when bins = 0."""
    if bins < 0:
        raise ValueError(f"bins must be >= 1, or 0 for one bin per distinct forecast; got {bins}")
    if bins == 0:
        return np.unique(p, return_inverse=True)[1].reshape(-1)
    from forkrl.tasks.forecast import equal_width_bin

    return np.fromiter((equal_width_bin(float(x), bins) for x in p), dtype=np.int64, count=p.size)


def calibration_bins(p, target, bins: int = 10) -> list[dict[str, float]]:
    """One dict per non-empty bin, in order: ``lo``, ``hi`` (the bin's edges; the value itself when
    bins = 0), ``count``, ``mean_forecast`` p̄_k and ``mean_target`` (ȳ_k, or q̄_k for true probabilities)."""
    p, target = _arrays(p, target)
    ids = _bin_ids(p, bins)
    out = []
    for k in np.unique(ids):
        in_bin = ids == k
        lo, hi = (k / bins, (k + 1) / bins) if bins else (float(p[in_bin][0]), float(p[in_bin][0]))
        out.append(
            {
                "lo": float(lo),
                "hi": float(hi),
                "count": int(in_bin.sum()),
                "mean_forecast": float(p[in_bin].mean()),
                "mean_target": float(target[in_bin].mean()),
            }
        )
    return out


def expected_calibration_error(p, target, bins: int = 10) -> float:
    """Σ_k (n_k/N)|p̄_k − t̄_k| (module docstring); `target`: 0/1 outcomes or true probabilities."""
    p, target = _arrays(p, target)
    gaps = [b["count"] * abs(b["mean_forecast"] - b["mean_target"]) for b in calibration_bins(p, target, bins)]
    return sum(gaps) / len(p)


def brier_score(p, y) -> float:
    """(1/N) Σ (p_i − y_i)²."""
    p, y = _arrays(p, y)
    return float(np.mean((p - y) ** 2))


def log_loss(p, y, eps: float = LOG_LOSS_EPS) -> float:
    """−(1/N) Σ [y ln p + (1 − y) ln(1 − p)], p clipped to [eps, 1 − eps]."""
    p, y = _arrays(p, y)
    p = np.clip(p, eps, 1.0 - eps)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


@dataclass
class MurphyDecomposition:
    """Brier_binned = reliability − resolution + uncertainty exactly; brier = that + within_bin."""

    reliability: float
    resolution: float
    uncertainty: float
    brier_binned: float
    """Brier score of the forecasts replaced by their bin means."""
    brier: float
    """Brier score of the forecasts themselves."""
    within_bin: float
    """brier − brier_binned."""


def murphy_decomposition(p, y, bins: int = 10) -> MurphyDecomposition:
    """The decomposition of the module docstring; `y` must be 0/1."""
    p, y = _arrays(p, y)
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("the Murphy decomposition needs 0/1 outcomes")
    n, base = len(p), float(y.mean())
    table = calibration_bins(p, y, bins)
    rel = sum(b["count"] * (b["mean_forecast"] - b["mean_target"]) ** 2 for b in table) / n
    res = sum(b["count"] * (b["mean_target"] - base) ** 2 for b in table) / n
    ids = _bin_ids(p, bins)
    means = np.zeros(int(ids.max()) + 1)
    np.add.at(means, ids, p)
    means /= np.maximum(np.bincount(ids, minlength=len(means)), 1)
    binned, brier = float(np.mean((means[ids] - y) ** 2)), brier_score(p, y)
    return MurphyDecomposition(rel, res, base * (1.0 - base), binned, brier, brier - binned)


def calibration_summary(p, y, true_p=None, bins: int = 10) -> dict[str, Any]:
    """Every figure of the module docstring for one set of forecasts, as a JSON-ready dict."""
    p, y = _arrays(p, y)
    out: dict[str, Any] = {
        "n": len(p),
        "bins": bins,
        "brier": brier_score(p, y),
        "log_loss": log_loss(p, y),
        "ece": expected_calibration_error(p, y, bins),
        "mean_forecast": float(p.mean()),
        "base_rate": float(y.mean()),
        "sharpness": float(np.mean((p - p.mean()) ** 2)),
        "murphy": asdict(murphy_decomposition(p, y, bins)),
        "table": calibration_bins(p, y, bins),
    }
    if true_p is not None:
        p, q = _arrays(p, true_p)
        out["ece_true"] = expected_calibration_error(p, q, bins)
        out["bayes_brier"] = float(np.mean(q * (1.0 - q)))
        out["mse_to_true"] = float(np.mean((p - q) ** 2))
        out["expected_brier"] = out["bayes_brier"] + out["mse_to_true"]
        out["table_true"] = calibration_bins(p, q, bins)
    return out


# ---------------------------------------------------------------------------- figures


def reliability_diagram(
    path: str | os.PathLike,
    sets: Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float] | None]],
    bins: int = 10,
) -> Path:
    """One panel per labelled set (p, y, true_p or None): observed win rate per bin against the
    mean forecast (marker area ∝ count), the mean true probability when known, the diagonal, and
    the forecasts' histogram beneath (sharpness). Writes a PNG."""
    plt = pyplot()
    fig, axes = plt.subplots(
        2, len(sets), figsize=(4.2 * len(sets), 5.2), squeeze=False, sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    for col, (label, (p, y, q)) in enumerate(sets.items()):
        ax, hist = axes[0, col], axes[1, col]
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":", label="perfect calibration")
        table = calibration_bins(p, y, bins)
        xs = [b["mean_forecast"] for b in table]
        sizes = [12 + 300 * b["count"] / len(p) for b in table]
        ax.plot(xs, [b["mean_target"] for b in table], color="tab:blue", lw=1)
        ax.scatter(xs, [b["mean_target"] for b in table], s=sizes, color="tab:blue", label="observed win rate")
        if q is not None:
            ax.plot(xs, [b["mean_target"] for b in calibration_bins(p, q, bins)], "^--", color="tab:orange",
                    ms=4, lw=1, label="true probability")  # fmt: skip
        ece = expected_calibration_error(p, y, bins)
        extra = f", vs truth {expected_calibration_error(p, q, bins):.3f}" if q is not None else ""
        ax.set_title(f"{label}\nECE {ece:.3f}{extra}", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_ylabel("outcome frequency")
        ax.legend(fontsize=7, loc="upper left")
        hist.hist(p, bins=np.linspace(0, 1, max(bins, 10) * 2 + 1), color="tab:blue", alpha=0.6)
        hist.set_xlabel("forecast")
        hist.set_ylabel("count")
    return save_figure(fig, path)


def sharpness_histogram(path: str | os.PathLike, sets: Mapping[str, Sequence[float]], resolution: int = 50) -> Path:
    """Overlaid histograms of the forecasts of each labelled set (how far from 0.5 they go). Writes a PNG."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    edges = np.linspace(0, 1, resolution + 1)
    for label, p in sets.items():
        ax.hist(np.asarray(p, dtype=float), bins=edges, alpha=0.5, label=label)
    ax.set_xlabel("forecast")
    ax.set_ylabel("count")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


# ---------------------------------------------------------------------------- stored forecasts


@dataclass
class Forecasts:
    """The valid forecasts of a file, with their outcomes (and true probabilities when every row has one)."""

    p: np.ndarray
    y: np.ndarray
    true_p: np.ndarray | None
    num_rows: int
    num_invalid: int
    """Rows whose text held no valid forecast (left out)."""


def load_forecasts(
    path: str | os.PathLike,
    outcome_key: str = "outcome",
    forecast_key: str = "p",
    text_keys: Sequence[str] = ("completion", "text"),
    true_key: str = "true_p",
) -> Forecasts:
    """Read a forecasts jsonl (module docstring); `CalibrationInputError` naming file, line and key."""
    from forkrl.tasks.forecast import parse_outcome

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CalibrationInputError(f"{path}: no such file")
    ps, ys, qs, rows, invalid = [], [], [], 0, 0
    for where, row in jsonl_objects(path, CalibrationInputError):
        rows += 1
        if outcome_key not in row:
            raise CalibrationInputError(f"{where}: no outcome field {outcome_key!r} (its fields: {sorted(row)})")
        try:
            y = parse_outcome(row[outcome_key])
        except ValueError as err:
            raise CalibrationInputError(f"{where}: field {outcome_key!r}: {err}") from None
        p = _forecast_of(row, forecast_key, text_keys, where)
        if p is None:
            invalid += 1
            continue
        ps.append(p)
        ys.append(y)
        q = row.get(true_key)
        if q is not None and not (isinstance(q, (int, float)) and 0.0 <= q <= 1.0):
            raise CalibrationInputError(f"{where}: field {true_key!r} must be a probability in [0, 1], got {q!r}")
        qs.append(q)
    if rows == 0:
        raise CalibrationInputError(f"{path}: no rows")
    if not ps:
        raise CalibrationInputError(f"{path}: none of its {rows} rows holds a valid forecast")
    true_p = np.asarray(qs, dtype=float) if all(q is not None for q in qs) else None
    return Forecasts(np.asarray(ps, dtype=float), np.asarray(ys, dtype=float), true_p, rows, invalid)


def _forecast_of(row: dict, forecast_key: str, text_keys: Sequence[str], where: str) -> float | None:
    from forkrl.tasks.forecast import parse_forecast

    if forecast_key in row:
        value = row[forecast_key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise CalibrationInputError(
                f"{where}: field {forecast_key!r} must be a probability in [0, 1], got {value!r}"
            )
        return float(value)
    for key in text_keys:
        if key in row:
            return parse_forecast(row[key]).p
    raise CalibrationInputError(
        f"{where}: no forecast field {forecast_key!r} and no text in {' or '.join(map(repr, text_keys))} "
        f"(its fields: {sorted(row)})"
    )


def run_calibration(
    path: str | os.PathLike,
    out: str | os.PathLike | None = None,
    bins: int = 10,
    outcome_key: str = "outcome",
    forecast_key: str = "p",
    text_key: str | None = None,
    true_key: str = "true_p",
) -> dict[str, Any]:
    """`forkrl analyze calibration`: the summary of one forecasts file; with `out`, also
    ``calibration.json``, ``reliability.png`` and ``sharpness.png`` there. Returns the summary
    without the per-bin tables."""
    text_keys = (text_key,) if text_key else ("completion", "text")
    data = load_forecasts(path, outcome_key, forecast_key, text_keys, true_key)
    summary = {
        "file": os.fspath(path),
        "rows": data.num_rows,
        "invalid_forecasts": data.num_invalid,
        **calibration_summary(data.p, data.y, data.true_p, bins),
    }
    if out is not None:
        out = Path(out)
        atomic_write_json(out / "calibration.json", summary)
        label = Path(path).name
        reliability_diagram(out / "reliability.png", {label: (data.p, data.y, data.true_p)}, bins)
        sharpness_histogram(out / "sharpness.png", {label: data.p})
        summary["written"] = [str(out / n) for n in ("calibration.json", "reliability.png", "sharpness.png")]
    return {k: v for k, v in summary.items() if k not in ("table", "table_true")}
