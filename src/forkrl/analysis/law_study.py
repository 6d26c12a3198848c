"""The entropy–performance law across the runs of a study: which runs, in which groups, and how sure.

Paper 2's R = −a·e^H + b is a claim about many runs, so `forkrl analyze law` takes whole sweeps
as well as run directories:

- `expand_run_dirs` turns a sweep's results folder (`forkrl sweep` output or its `forkrl sweep
  export`: `CELL/seed_N/metrics.jsonl`) into its runs, each tagged with its cell, and counts a run
  reached twice (the same `metrics.jsonl` bytes, say a study's runs copied into a second sweep)
  once.
- `bootstrap_fit` resamples *runs* with replacement and refits the pooled law: the steps of one run
  are not independent draws, the runs are.
- `group_residuals` asks which cells depart from the pooled curve: a run's mean residual
  R − R̂(H) over its steps, then the mean over a cell's runs with a Student-t interval over them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from forkrl.analysis.runs import Run, RunError
from forkrl.sweep.stats import mean_interval

__all__ = ["RunSource", "bootstrap_fit", "cell_label", "expand_run_dirs", "group_residuals", "law_markdown"]

CONFIDENCE = 0.95


@dataclass(frozen=True)
class RunSource:
    """A run directory and, when it came from a sweep's results, its cell (`selection.strategy=top,...`)."""

    path: Path
    cell: str | None = None


def _sweep_runs(folder: Path) -> list[Path]:
    """`CELL/seed_N` run directories of a sweep's results folder, in sorted order."""
    return sorted(p.parent for p in folder.glob("*/seed_*/metrics.jsonl"))


def _cell_of(run_dir: Path) -> str:
    """The cell named in the run's `sweep_result.json`, else its parent folder's name."""
    result = run_dir / "sweep_result.json"
    if result.is_file():
        try:
            cell = json.loads(result.read_text(encoding="utf-8")).get("cell")
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RunError(f"{result}: not valid JSON ({err})") from err
        if isinstance(cell, str) and cell:
            return cell
    return run_dir.parent.name


def expand_run_dirs(paths: Sequence[str | os.PathLike] | str | os.PathLike) -> tuple[list[RunSource], list[str]]:
    """Run directories from run directories and sweep results folders; notes on runs counted once.

    A directory with a `metrics.jsonl` is one run; one without is read as a sweep's results folder
    (its `CELL/seed_N` runs, tagged with their cell; `base/seed_N`, which only evaluates, has no
    metrics and is not a run). Runs whose `metrics.jsonl` bytes are equal are one run: the first
    path given is kept and a note names the others.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise RunError("no run directories given")
    sources: list[RunSource] = []
    for raw in paths:
        path = Path(raw)
        if (path / "metrics.jsonl").is_file() or not path.is_dir():
            sources.append(RunSource(path))  # load_run names what is wrong with a bad one
            continue
        runs = _sweep_runs(path)
        if not runs:
            raise RunError(
                f"{path}: neither a run directory (metrics.jsonl) nor a sweep's results (CELL/seed_N/metrics.jsonl)"
            )
        sources.extend(RunSource(run, _cell_of(run)) for run in runs)
    seen: dict[str, Path] = {}
    kept, notes = [], []
    for source in sources:
        metrics = source.path / "metrics.jsonl"
        digest = hashlib.sha256(metrics.read_bytes()).hexdigest() if metrics.is_file() else str(source.path)
        if digest in seen:
            notes.append(f"{source.path}: the same metrics.jsonl as {seen[digest]}; counted once")
            continue
        seen[digest] = source.path
        kept.append(source)
    return kept, notes


def cell_label(cell: str) -> str:
    """`selection.strategy=top,selection.ratio=0.2,loss.normalizer=all-tokens` -> `top ρ=0.2, normalizer=all-tokens`."""
    values = dict(part.split("=", 1) for part in cell.split(",") if "=" in part)
    if not values:
        return cell
    strategy = values.pop("selection.strategy", None)
    head = []
    if strategy is not None:
        head.append(strategy if strategy == "all" else f"{strategy} ρ={values.pop('selection.ratio', '?')}")
    rest = [f"{key.rsplit('.', 1)[-1]}={value}" for key, value in values.items()]
    return ", ".join(head + rest)


def bootstrap_fit(
    series: Sequence[tuple[np.ndarray, np.ndarray]], n_boot: int, seed: int, fit
) -> dict[str, dict[str, float]] | None:
    """Percentile intervals of a, b and b − a from `n_boot` refits on runs resampled with replacement.

    `series`: one (entropy, performance) pair of arrays per run; `fit`: the fitting function
    ((H, R) -> LawFit). Resamples whose points have a single entropy value cannot be fitted and are
    drawn again (they count in `failed`). None with fewer than 2 runs or `n_boot` < 1.
    """
    if len(series) < 2 or n_boot < 1:
        return None
    rng = np.random.default_rng(seed)
    draws: list[tuple[float, float, float]] = []
    failed = 0
    while len(draws) < n_boot:
        pick = rng.integers(0, len(series), size=len(series))
        h = np.concatenate([series[i][0] for i in pick])
        r = np.concatenate([series[i][1] for i in pick])
        try:
            f = fit(h, r)
        except ValueError:
            failed += 1
            if failed > 10 * n_boot:
                return None
            continue
        draws.append((f.a, f.b, f.ceiling))
    values = np.asarray(draws)
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.percentile(values, [tail, 100 - tail], axis=0)
    out: dict[str, Any] = {
        name: {"low": float(low[i]), "high": float(high[i])} for i, name in enumerate(("a", "b", "ceiling"))
    }
    out.update({"resamples": n_boot, "failed": failed, "seed": seed, "confidence": CONFIDENCE, "over": "runs"})
    return out


def group_residuals(pooled, groups: dict[str, list[tuple[Run, np.ndarray, np.ndarray]]]) -> list[dict[str, Any]]:
    """Per group: each run's mean residual R − R̂(H) of the pooled fit, their mean [t interval] over
    the group's runs, and the group's RMSE about the pooled curve."""
    rows = []
    for label, members in groups.items():
        per_run = [float(np.mean(r - pooled.predict(h))) for _, h, r in members if len(h)]
        squares = np.concatenate([(r - pooled.predict(h)) ** 2 for _, h, r in members if len(h)] or [np.zeros(0)])
        if not per_run:
            continue
        interval = mean_interval(per_run, CONFIDENCE)
        rows.append(
            {
                "group": label,
                "runs": len(per_run),
                "points": int(squares.size),
                "mean_residual": interval.to_json(),
                "per_run_mean_residual": per_run,
                "rmse": float(np.sqrt(squares.mean())),
                "departs": interval.low is not None and (interval.low > 0 or interval.high < 0),
            }
        )
    return rows


def _num(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _bracket(point: float, interval: dict[str, float] | None, digits: int = 3) -> str:
    if not interval:
        return _num(point, digits)
    return f"{point:.{digits}f} [{interval['low']:.{digits}f}, {interval['high']:.{digits}f}]"


def law_markdown(summary: dict[str, Any]) -> str:
    """`law.md`: the pooled fit with its intervals and held-out error, and one row per group."""
    pooled = summary["pooled"]
    boot = pooled.get("bootstrap") or {}
    hold = pooled.get("holdout") or {}
    excluded = summary.get("excluded") or []
    left_out = f" ({', '.join(excluded)} left out of the fit)" if excluded else ""
    lines = [
        f"# R = −a·e^H + b: {summary['accuracy_key']} against {summary['entropy_key']}",
        "",
        f"Pooled over {pooled['runs']} run(s){left_out}, {pooled['n']} steps. Intervals: "
        + (
            f"{boot['confidence']:.0%} percentile bootstrap over runs "
            f"({boot['resamples']} resamples, seed {boot['seed']})."
            if boot
            else "none (fewer than 2 runs, or --bootstrap 0)."
        ),
        "",
        "| a | b | ceiling b − a | R² | RMSE | held-out RMSE | held-out MAE | carried forward RMSE |",
        "|---|---|---|---|---|---|---|---|",
        f"| {_bracket(pooled['a'], boot.get('a'))} | {_bracket(pooled['b'], boot.get('b'))} | "
        f"{_bracket(pooled['ceiling'], boot.get('ceiling'))} | {_num(pooled['r2'])} | {_num(pooled['rmse'])} | "
        f"{_num(hold.get('rmse'))} | {_num(hold.get('mae'))} | {_num(hold.get('carry_forward_rmse'))} |",
        "",
        f"Held out: a fit on the first {100 * summary['fit_fraction']:g}% of every run's steps "
        f"({hold.get('n_train', 'n/a')} points) predicts the rest ({hold.get('n_test', 'n/a')} points) from "
        "their entropy. Carried forward: the same points predicted without the law, by each run's mean "
        "over its last 5 fitted steps.",
        "",
        "Per group: its own fit, and its runs' mean residual R − R̂(H) about the pooled curve "
        f"(mean [{CONFIDENCE:.0%} t interval] over the group's runs; *departs*: the interval excludes 0).",
        "",
        "| group | runs | a | b | ceiling | R² | held-out RMSE | residual about pooled | RMSE about pooled | departs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary["groups"]:
        fit = row.get("fit") or {}
        res = row["mean_residual"]
        residual = (
            _num(res["mean"]) if res["low"] is None else f"{res['mean']:+.3f} [{res['low']:+.3f}, {res['high']:+.3f}]"
        )
        lines.append(
            f"| {row['group']} | {row['runs']} | {_num(fit.get('a'))} | {_num(fit.get('b'))} | "
            f"{_num(fit.get('ceiling'))} | {_num(fit.get('r2'))} | {_num((row.get('holdout') or {}).get('rmse'))} | "
            f"{residual} | {_num(row['rmse'])} | {'yes' if row['departs'] else 'no'}"
            + (" (left out of the fit)" if row.get("excluded") else "")
            + " |"
        )
    if summary.get("notes"):
        lines += ["", "Notes:", *[f"- {note}" for note in summary["notes"]]]
    return "\n".join(lines) + "\n"
