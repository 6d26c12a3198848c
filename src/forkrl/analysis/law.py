"""The entropy–performance law of paper 2 (arXiv 2505.22617): R = −a·e^H + b.

During RL, downstream performance R rises as policy entropy H falls, and the trade follows
R = −a·e^H + b: performance is bought with entropy, and at H = 0 it reaches the ceiling b − a.
The model is linear in (a, b) given x = e^H, so ordinary least squares on the columns
[−e^H, 1] gives the fit in closed form.

`run_law` fits it to the (entropy, accuracy) pairs of one or more runs' `metrics.jsonl` (pooled
and per run), checks how well a fit on the first part of a run predicts the rest (paper 2
predicts late-training performance from early training), and plots the per-step covariance
statistics that drive the entropy change (`cov_mean`, `cov_pos_frac`).

Pairs come from the same log record: the policy entropy of step N's update and the accuracy
logged at step N (the training batch's accuracy, or an evaluation right after the update).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from forkrl.analysis.law_study import (
    RunSource,
    bootstrap_fit,
    cell_label,
    expand_run_dirs,
    group_residuals,
    law_markdown,
)
from forkrl.analysis.runs import Run, RunError, group_by_setting, load_runs, resolve_accuracy_key
from forkrl.io import atomic_write_json, atomic_write_text, pyplot, save_figure

__all__ = [
    "HoldoutError",
    "LawFit",
    "fit_entropy_law",
    "holdout_error",
    "law_pairs",
    "run_law",
]

COVARIANCE_KEYS = ("entropy", "cov_mean", "cov_pos_frac")


@dataclass
class LawFit:
    """R = −a·e^H + b fitted by least squares."""

    a: float
    b: float
    n: int
    """Points fitted."""
    r2: float | None
    """Coefficient of determination on the fitted points (None when R is constant)."""
    rmse: float
    """Root-mean-square residual on the fitted points."""

    @property
    def ceiling(self) -> float:
        """Predicted performance at zero entropy, b − a."""
        return self.b - self.a

    def predict(self, entropy: np.ndarray | float) -> np.ndarray:
        return -self.a * np.exp(entropy) + self.b

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ceiling": self.ceiling}


def fit_entropy_law(entropy: Sequence[float] | np.ndarray, performance: Sequence[float] | np.ndarray) -> LawFit:
    """Least-squares fit of R = −a·e^H + b. `entropy`, `performance`: shape (n,), n ≥ 2 with two distinct H."""
    h = np.asarray(entropy, dtype=np.float64)
    r = np.asarray(performance, dtype=np.float64)
    if h.shape != r.shape or h.ndim != 1:
        raise ValueError(f"entropy and performance must be 1-D of equal length, got {h.shape} and {r.shape}")
    if h.size < 2 or np.ptp(h) == 0:
        raise ValueError(f"the fit needs at least 2 points with different entropy, got {h.size}")
    design = np.stack([-np.exp(h), np.ones_like(h)], axis=1)  # (n, 2): R = design @ [a, b]
    (a, b), *_ = np.linalg.lstsq(design, r, rcond=None)
    residual = r - design @ np.array([a, b])
    ss_res = float(residual @ residual)
    ss_tot = float(((r - r.mean()) ** 2).sum())
    return LawFit(
        a=float(a),
        b=float(b),
        n=int(h.size),
        r2=1.0 - ss_res / ss_tot if ss_tot > 0 else None,
        rmse=math.sqrt(ss_res / h.size),
    )


@dataclass
class HoldoutError:
    """A fit on the first `fit_fraction` of each series, scored on the rest."""

    fit: LawFit
    fit_fraction: float
    n_train: int
    n_test: int
    rmse: float
    mae: float
    max_abs: float
    carry_forward_rmse: float
    """The same points predicted without the law: each run's mean performance over its last
    `CARRY_FORWARD` fitted steps, carried forward (what the law has to beat)."""

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "fit": self.fit.to_json()}


CARRY_FORWARD = 5


def _split(n: int, fit_fraction: float) -> int:
    return int(math.floor(fit_fraction * n + 1e-9))


def holdout_error(series: Sequence[tuple[np.ndarray, np.ndarray]], fit_fraction: float = 0.5) -> HoldoutError:
    """Fit on the first `fit_fraction` of the points of every (entropy, performance) series (in
    training order), predict the remaining points from their entropy, and report RMSE / MAE / max
    error on them, beside the RMSE of carrying each series' recent performance forward."""
    if not 0.0 < fit_fraction < 1.0:
        raise ValueError(f"fit_fraction must be in (0, 1), got {fit_fraction}")
    train_h, train_r, test_h, test_r, carried = [], [], [], [], []
    for h, r in series:
        k = _split(len(h), fit_fraction)
        train_h.append(h[:k])
        train_r.append(r[:k])
        test_h.append(h[k:])
        test_r.append(r[k:])
        if k > 0:
            carried.append(r[k:] - r[max(0, k - CARRY_FORWARD) : k].mean())
    th, tr = np.concatenate(train_h), np.concatenate(train_r)
    vh, vr = np.concatenate(test_h), np.concatenate(test_r)
    if vh.size == 0:
        raise ValueError(f"no points left to predict with fit_fraction={fit_fraction}")
    fit = fit_entropy_law(th, tr)
    err = fit.predict(vh) - vr
    return HoldoutError(
        fit=fit,
        fit_fraction=fit_fraction,
        n_train=int(th.size),
        n_test=int(vh.size),
        rmse=float(np.sqrt(np.mean(err**2))),
        mae=float(np.mean(np.abs(err))),
        max_abs=float(np.max(np.abs(err))),
        carry_forward_rmse=float(np.sqrt(np.mean(np.concatenate(carried) ** 2))),
    )


def law_pairs(run: Run, accuracy_key: str, entropy_key: str = "entropy") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, entropy, accuracy) at the steps where both are finite numbers, in step order."""
    key = resolve_accuracy_key(run, accuracy_key)
    h_steps, h = run.series(entropy_key)
    r_steps, r = run.series(key)
    steps, hi, ri = np.intersect1d(h_steps, r_steps, assume_unique=True, return_indices=True)
    return steps, h[hi], r[ri]


def _try(fn, *args) -> tuple[Any, str | None]:
    try:
        return fn(*args), None
    except ValueError as err:
        return None, str(err)


def run_law(
    run_dirs: Sequence[str | os.PathLike] | str | os.PathLike,
    out_dir: str | os.PathLike,
    accuracy_key: str = "accuracy",
    fit_fraction: float = 0.5,
    entropy_key: str = "entropy",
    bootstrap: int = 1000,
    seed: int = 0,
    exclude: Sequence[str] = (),
) -> dict[str, Any]:
    """`forkrl analyze law`: fit R = −a·e^H + b and write `law.json`, `law.md`, `law.png`, `covariance.png`.

    Args:
        run_dirs: run directories and/or sweep results folders (`forkrl sweep` output or its
            export; each `CELL/seed_N` is a run of group CELL). Their points are fitted together
            ("pooled"), per group of runs (a sweep's cell, or runs whose configs differ only in
            seeds) and per run.
        out_dir: created if needed.
        accuracy_key: `accuracy` (training batch, fraction) or an eval metric such as
            `eval/aime24/acc_at_k` (percent); a bare benchmark name `aime24` means the latter.
        fit_fraction: the held-out check fits on this first fraction of each run's points and
            predicts the rest.
        entropy_key: the entropy metric (default: mean token entropy of the current policy).
        bootstrap: resamples of runs for the pooled fit's intervals (0: none).
        seed: the bootstrap's seed.
        exclude: groups left out of the pooled fit (still plotted, and their residuals about the
            pooled curve are then out of sample).

    Returns the contents of `law.json`: the pooled fit (a, b, ceiling b − a, R², RMSE) with its
    bootstrap intervals and held-out RMSE/MAE; per group its own fit, held-out error and mean
    residual about the pooled curve [t interval over its runs]; the same per run.
    """
    if not 0.0 < fit_fraction < 1.0:
        raise ValueError(f"fit_fraction must be in (0, 1), got {fit_fraction}")
    if bootstrap < 0:
        raise ValueError(f"bootstrap must be ≥ 0 resamples, got {bootstrap}")
    sources, notes = expand_run_dirs(run_dirs)
    runs = load_runs([source.path for source in sources])
    data = []
    for run in runs:
        key = resolve_accuracy_key(run, accuracy_key)
        data.append((run, *law_pairs(run, key, entropy_key), key))
    if sum(len(h) for _, _, h, _, _ in data) < 2:
        raise RunError(
            f"fewer than 2 steps with both {entropy_key!r} and {accuracy_key!r} in "
            + ", ".join(str(run.metrics_file) for run in runs)
        )
    groups, labels = _groups(sources, runs, data)
    unknown = sorted(set(exclude) - set(groups))
    if unknown:
        raise RunError(
            f"--exclude {', '.join(map(repr, unknown))}: no such group; the groups are {', '.join(map(repr, groups))}"
        )
    series = [(h, r) for label, members in groups.items() if label not in exclude for _, h, r in members if len(h)]
    if not series:
        raise RunError("every group is excluded: nothing left to fit")
    all_h = np.concatenate([h for h, _ in series])
    all_r = np.concatenate([r for _, r in series])
    try:
        pooled = fit_entropy_law(all_h, all_r)
    except ValueError as err:
        raise RunError(f"cannot fit the law: {err}") from err
    pooled_hold, pooled_hold_err = _try(holdout_error, series, fit_fraction)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    notes += _plot_covariance(runs, out / "covariance.png")
    _plot_law(data, groups, pooled, fit_fraction, accuracy_key, entropy_key, out / "law.png")
    summary = {
        "law": "R = -a * exp(H) + b",
        "accuracy_key": accuracy_key,
        "entropy_key": entropy_key,
        "fit_fraction": fit_fraction,
        "excluded": list(exclude),
        "pooled": {
            **pooled.to_json(),
            "runs": len(series),
            "bootstrap": bootstrap_fit(series, bootstrap, seed, fit_entropy_law),
            "holdout": pooled_hold.to_json() if pooled_hold else None,
            "holdout_error": pooled_hold_err,
        },
        "groups": _group_rows(pooled, groups, fit_fraction, exclude),
        "runs": [_run_row(item, fit_fraction, label) for item, label in zip(data, labels)],
        "notes": notes,
        "outputs": [str(out / n) for n in ("law.json", "law.md", "law.png", "covariance.png")],
    }
    atomic_write_json(out / "law.json", summary)
    atomic_write_text(out / "law.md", law_markdown(summary))
    return summary


def _groups(sources: list[RunSource], runs: list[Run], data) -> tuple[dict[str, list], list[str]]:
    """Runs by group, in first-seen order (a sweep's cell, else runs whose configs differ only in
    seeds), as {label: [(run, H, R), ...]}, and each run's label in the order of `data`."""
    setting_label = {id(run): group.label for group in group_by_setting(runs) for run in group.runs}
    labels = [cell_label(s.cell) if s.cell else setting_label[id(run)] for s, run in zip(sources, runs)]
    groups: dict[str, list[tuple[Run, np.ndarray, np.ndarray]]] = {}
    for label, (run, _, h, r, _) in zip(labels, data):
        groups.setdefault(label, []).append((run, h, r))
    return groups, labels


def _group_rows(pooled: LawFit, groups, fit_fraction: float, exclude: Sequence[str]) -> list[dict[str, Any]]:
    rows = group_residuals(pooled, groups)
    for row in rows:
        row["excluded"] = row["group"] in exclude
        members = [(h, r) for _, h, r in groups[row["group"]] if len(h)]
        fit, fit_err = _try(
            fit_entropy_law, np.concatenate([h for h, _ in members]), np.concatenate([r for _, r in members])
        )
        hold, hold_err = _try(holdout_error, members, fit_fraction)
        row.update(
            fit=fit.to_json() if fit else None,
            fit_error=fit_err,
            holdout=hold.to_json() if hold else None,
            holdout_error=hold_err,
        )
    return rows


def _run_row(item, fit_fraction: float, group: str) -> dict[str, Any]:
    run, steps, h, r, key = item
    fit, fit_err = _try(fit_entropy_law, h, r)
    hold, hold_err = _try(holdout_error, [(h, r)], fit_fraction)
    return {
        "name": run.name,
        "label": run.label,
        "group": group,
        "path": str(run.path),
        "accuracy_key": key,
        "points": len(h),
        "steps": [int(steps[0]), int(steps[-1])] if len(steps) else None,
        "fit": fit.to_json() if fit else None,
        "fit_error": fit_err,
        "holdout": hold.to_json() if hold else None,
        "holdout_error": hold_err,
    }


def _plot_law(
    data, groups, pooled: LawFit, fit_fraction: float, accuracy_key: str, entropy_key: str, path: Path
) -> None:
    """Every run's (H, R) trajectory, coloured by group; filled: the first `fit_fraction` of a run's
    steps, hollow: the rest. With one run per group (up to 10), each run's own early fit, dashed."""
    fig = pyplot().figure(figsize=(8, 5.5), layout="constrained")
    ax = fig.add_subplot()
    runs = [run for run, *_ in data]
    color_of = {label: f"C{i % 10}" for i, label in enumerate(groups)}
    per_run_fits = len(data) <= 10 and all(len(m) == 1 for m in groups.values())
    for label, members in groups.items():
        color = color_of[label]
        text = label if not per_run_fits else _legend_label(members[0][0], runs)
        for i, (_, h, r) in enumerate(members):
            if len(h) == 0:
                continue
            k = _split(len(h), fit_fraction)
            ax.plot(h, r, color=color, lw=0.6, alpha=0.35)
            ax.scatter(h[:k], r[:k], s=9, color=color, label=text if i == 0 else None)
            ax.scatter(h[k:], r[k:], s=9, facecolors="none", edgecolors=color, linewidths=0.7)
            fit, _ = _try(fit_entropy_law, h[:k], r[:k]) if per_run_fits else (None, None)
            if fit is not None:
                grid = np.linspace(0.0, h.max() * 1.05, 200)
                ax.plot(grid, fit.predict(grid), color=color, ls="--", lw=1)
    grid = np.linspace(0.0, _max_entropy(data) * 1.05, 200)
    low = min(float(r.min()) for _, _, _, r, _ in data if len(r))
    high = max(max(float(r.max()) for _, _, _, r, _ in data if len(r)), pooled.ceiling)
    margin = 0.05 * (high - low or 1.0)
    ax.set_ylim(low - margin, high + margin)  # the fitted curve keeps falling past the data
    ax.plot(
        grid,
        pooled.predict(grid),
        color="black",
        lw=1.8,
        label=f"R = −{pooled.a:.3g}·e^H + {pooled.b:.3g}  (R² {_fmt(pooled.r2)}, ceiling {pooled.ceiling:.3g})",
    )
    hollow = f"first {100 * fit_fraction:g}% of each run's steps filled, the rest hollow"
    ax.plot([], [], color="gray", ls="--" if per_run_fits else "", lw=1, label=hollow)
    ax.set_xlabel(f"policy entropy H ({entropy_key})")
    ax.set_ylabel(accuracy_key)
    ax.set_title(f"Entropy–performance law (paper 2): {len(data)} run(s)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path, dpi=150)


def _legend_label(run: Run, runs: list[Run]) -> str:
    """The run's label, with its seed (or directory name) when another run shares the label."""
    if sum(r.label == run.label for r in runs) < 2:
        return run.label
    seed = run.config_value("seed")
    return f"{run.label} (seed {seed})" if seed is not None else f"{run.label} ({run.name})"


def _max_entropy(data) -> float:
    return max(float(h.max()) for _, _, h, _, _ in data if len(h))


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _plot_covariance(runs: list[Run], path: Path) -> list[str]:
    """Entropy, mean token covariance cov(log π, A) and the fraction of positive covariances vs step."""
    notes = []
    fig = pyplot().figure(figsize=(15, 4), layout="constrained")
    axes = [fig.add_subplot(1, 3, i + 1) for i in range(3)]
    titles = {
        "entropy": "policy entropy",
        "cov_mean": "mean token cov(log π, A)",
        "cov_pos_frac": "fraction of tokens with cov > 0",
    }
    for i, run in enumerate(runs):
        for ax, key in zip(axes, COVARIANCE_KEYS):
            if not run.has_metric(key):
                notes.append(f"{run.metrics_file}: no {key!r}; left out of covariance.png")
                continue
            steps, values = run.series(key)
            ax.plot(steps, values, color=f"C{i % 10}", label=_legend_label(run, runs), lw=1.2)
    for ax, key in zip(axes, COVARIANCE_KEYS):
        ax.set_title(titles[key])
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[1].axhline(0.0, color="gray", lw=0.8)
    if len(runs) > 1:
        axes[0].legend(fontsize=8)
    save_figure(fig, path, dpi=150)
    return notes
