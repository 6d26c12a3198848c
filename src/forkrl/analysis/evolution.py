"""Evolution of entropy percentiles during RL training (paper 1, Fig. 5).

The trainer logs, every step, the 0th, 10th, ..., 100th percentile of the response-token entropies
of the batch (`entropy_p0` ... `entropy_p100`, sampler policy, Eq. 1) and the fraction of tokens
below 0.01 (`entropy_frac_below_0.01`). This module plots one line per percentile over steps and
summarises how far each percentile moved. The paper's finding on Qwen3-14B: the low percentiles
hardly move; RLVR mostly changes the entropy of the high-entropy tokens.

Percentiles computed over a list of checkpoints elsewhere can be plotted the same way from a
JSON or CSV table with one row per checkpoint (`load_percentile_table`).
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from forkrl.analysis.runs import Run, RunError, load_run
from forkrl.io import atomic_write_json, pyplot, save_figure

__all__ = [
    "PercentileEvolution",
    "load_percentile_table",
    "percentiles_from_run",
    "plot_evolution",
    "run_evolution",
]

FRAC_BELOW_KEY = "entropy_frac_below_0.01"
_RUN_KEY = re.compile(r"^entropy_p(\d+(?:\.\d+)?)$")
_TABLE_KEY = re.compile(r"^(?:entropy_)?p?(\d+(?:\.\d+)?)$")


@dataclass
class PercentileEvolution:
    """Entropy percentiles at a sequence of training points."""

    x: list[Any]
    """Steps (ints) or checkpoint names, in order."""
    x_label: str
    """`step` or `checkpoint`."""
    values: dict[float, np.ndarray]
    """Percentile p (0..100) -> entropy at each point of `x`, NaN where missing. Shape (len(x),)."""
    frac_below: np.ndarray | None = None
    """Fraction of tokens with entropy < 0.01 at each point, when known. Shape (len(x),)."""
    source: str = ""

    def summary(self) -> dict[str, dict[str, float | None]]:
        """Per percentile: first, last, min, max, range (max − min) and change (last − first)."""
        out = {}
        for p, v in self.values.items():
            finite = v[np.isfinite(v)]
            if finite.size == 0:
                out[_name(p)] = {k: None for k in ("first", "last", "min", "max", "range", "change")}
                continue
            out[_name(p)] = {
                "first": float(finite[0]),
                "last": float(finite[-1]),
                "min": float(finite.min()),
                "max": float(finite.max()),
                "range": float(finite.max() - finite.min()),
                "change": float(finite[-1] - finite[0]),
            }
        return out

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "source": self.source,
            "x_label": self.x_label,
            "x": list(self.x),
            "percentiles": {_name(p): v.tolist() for p, v in self.values.items()},
            "summary": self.summary(),
        }
        if self.frac_below is not None:
            out[FRAC_BELOW_KEY] = self.frac_below.tolist()
        return out


def _name(p: float) -> str:
    return f"p{p:g}"


def _select(found: dict[float, str], percentiles: list[float] | None, where: str) -> dict[float, str]:
    if percentiles is None:
        return dict(sorted(found.items()))
    missing = [p for p in percentiles if float(p) not in found]
    if missing:
        have = ", ".join(_name(p) for p in sorted(found))
        raise RunError(f"{where}: no percentile {', '.join(_name(p) for p in missing)}; available: {have}")
    return {float(p): found[float(p)] for p in percentiles}


def percentiles_from_run(run: Run, percentiles: list[float] | None = None) -> PercentileEvolution:
    """The logged `entropy_pN` series of a run (all N found, or the given ones) over its steps."""
    found = {float(m.group(1)): k for k in run.metric_keys() if (m := _RUN_KEY.match(k))}
    if not found:
        raise RunError(
            f"{run.metrics_file}: no entropy percentiles (expected keys entropy_p0 ... entropy_p100, "
            "logged by `forkrl train` every step)"
        )
    keys = _select(found, percentiles, str(run.metrics_file))
    series = {p: _by_step(run, key) for p, key in keys.items()}
    steps = sorted({s for by_step in series.values() for s in by_step})
    values = {p: np.array([by_step.get(s, math.nan) for s in steps]) for p, by_step in series.items()}
    frac = None
    if run.has_metric(FRAC_BELOW_KEY):
        by_step = _by_step(run, FRAC_BELOW_KEY)
        frac = np.array([by_step.get(s, math.nan) for s in steps])
    return PercentileEvolution(x=steps, x_label="step", values=values, frac_below=frac, source=str(run.path))


def _by_step(run: Run, key: str) -> dict[int, float]:
    steps, values = run.series(key)
    return dict(zip(steps.tolist(), values.tolist()))


def load_percentile_table(path: str | os.PathLike, percentiles: list[float] | None = None) -> PercentileEvolution:
    """Percentiles per checkpoint from a JSON or CSV table, one row per checkpoint.

    A row names its point with `step` (an integer) or `checkpoint` (any name) and gives percentile
    p as a column `entropy_pN`, `pN` or `N` — or, in JSON, inside a `percentiles` mapping with such
    keys. JSON is a list of rows or an object with a `rows` or `checkpoints` list. Rows keep their
    order; an optional `entropy_frac_below_0.01` column is kept too.
    """
    path = Path(path)
    if not path.is_file():
        raise RunError(f"{path}: no such file")
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            rows: list[dict[str, Any]] = list(csv.DictReader(f))
    else:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise RunError(f"{path}: not valid JSON ({err})") from err
        rows = data.get("rows", data.get("checkpoints")) if isinstance(data, dict) else data
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise RunError(f"{path}: expected a list of rows (objects), or an object with a 'rows' list")
    if not rows:
        raise RunError(f"{path}: no rows")

    flat_rows = []
    for i, row in enumerate(rows):
        flat = {k: v for k, v in row.items() if k != "percentiles"}
        if isinstance(row.get("percentiles"), dict):
            flat.update(row["percentiles"])
        if "step" not in flat and "checkpoint" not in flat:
            raise RunError(f"{path}, row {i + 1}: needs a 'step' or 'checkpoint' field")
        flat_rows.append(flat)

    found: dict[float, str] = {}
    for flat in flat_rows:
        for k in flat:
            if (m := _TABLE_KEY.match(str(k))) and float(m.group(1)) <= 100:
                found.setdefault(float(m.group(1)), str(k))
    if not found:
        raise RunError(f"{path}: no percentile columns (expected entropy_p0 ... entropy_p100, p50 or 50)")
    keys = _select(found, percentiles, str(path))

    def number(v: Any) -> float:
        try:
            x = float(v)
        except (TypeError, ValueError):
            return math.nan
        return x if math.isfinite(x) else math.nan

    by_step = all(_is_int(flat.get("step")) for flat in flat_rows)
    x = (
        [int(flat["step"]) for flat in flat_rows]
        if by_step
        else [str(flat.get("checkpoint", flat.get("step"))) for flat in flat_rows]
    )
    # A key found in one row may be spelled differently in another (p50 vs entropy_p50).
    values = {p: np.array([number(_lookup(flat, p, key)) for flat in flat_rows]) for p, key in keys.items()}
    frac = None
    if any(FRAC_BELOW_KEY in flat for flat in flat_rows):
        frac = np.array([number(flat.get(FRAC_BELOW_KEY)) for flat in flat_rows])
    return PercentileEvolution(
        x=x, x_label="step" if by_step else "checkpoint", values=values, frac_below=frac, source=str(path)
    )


def _is_int(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return True
    return isinstance(v, str) and v.strip().lstrip("-").isdigit()


def _lookup(flat: dict[str, Any], p: float, key: str) -> Any:
    if key in flat:
        return flat[key]
    for k, v in flat.items():
        if (m := _TABLE_KEY.match(str(k))) and float(m.group(1)) == p:
            return v
    return None


def plot_evolution(evo: PercentileEvolution, path: str | os.PathLike, log_y: bool | None = None) -> None:
    """One line per percentile over training (left); the fraction of tokens below 0.01 (right).

    `log_y=None` picks a log y axis, symlog when some value is 0 (the 0th percentile often is).
    """
    panels = 2 if evo.frac_below is not None else 1
    fig = pyplot().figure(figsize=(6.5 * panels, 4.5), layout="constrained")
    axes = [fig.add_subplot(1, panels, i + 1) for i in range(panels)]
    categorical = evo.x_label != "step"
    xs = np.arange(len(evo.x)) if categorical else np.asarray(evo.x)

    ax = axes[0]
    # Highest percentile first, so the legend reads top to bottom like the lines.
    colors = _colors(len(evo.values))[::-1]
    for color, (p, v) in zip(colors, sorted(evo.values.items(), reverse=True)):
        ok = np.isfinite(v)
        ax.plot(xs[ok], v[ok], color=color, label=f"{p:g}th", marker="o" if categorical else None, lw=1.5)
    all_values = np.concatenate([v[np.isfinite(v)] for v in evo.values.values()] or [np.zeros(0)])
    if log_y is None:
        log_y = all_values.size > 0 and bool((all_values > 0).any())
    if log_y and all_values.size:
        positive = all_values[all_values > 0]
        if (all_values <= 0).any():
            ax.set_yscale("symlog", linthresh=max(1e-6, float(positive.min()) if positive.size else 1e-3))
        else:
            ax.set_yscale("log")
    ax.set_ylabel("token entropy (nats)")
    ax.set_title("Entropy percentiles during training")
    ax.legend(title="percentile", fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))

    if evo.frac_below is not None:
        ax = axes[1]
        ok = np.isfinite(evo.frac_below)
        ax.plot(xs[ok], 100 * evo.frac_below[ok], color="tab:gray", marker="o" if categorical else None)
        ax.set_ylabel("tokens with entropy < 0.01 (%)")
        ax.set_title("Near-deterministic tokens")
    for ax in axes:
        ax.set_xlabel(evo.x_label)
        ax.grid(alpha=0.3)
        if categorical:
            ax.set_xticks(xs, [str(x) for x in evo.x], rotation=30, ha="right")
    save_figure(fig, path, dpi=150)


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(i / max(1, n - 1)) for i in range(n)]


def run_evolution(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    percentiles: list[float] | None = None,
    log_y: bool | None = None,
) -> dict[str, Any]:
    """`forkrl analyze evolution`: write `evolution.png` and `evolution.json` into `out_dir`.

    Args:
        source: a run directory (reads `metrics.jsonl`) or a JSON/CSV table of percentiles per
            checkpoint (see `load_percentile_table`).
        out_dir: created if needed.
        percentiles: which to plot, e.g. [0, 50, 80, 100]; default all that were logged.
        log_y: log y axis (None: automatic).

    Returns the summary: source, number of points, and per percentile first/last/min/max/range/change.
    """
    source = Path(source)
    if source.is_dir():
        evo = percentiles_from_run(load_run(source), percentiles)
    elif source.is_file():
        evo = load_percentile_table(source, percentiles)
    else:
        raise RunError(f"{source}: no such run directory or percentile table")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "evolution.json", evo.to_json())
    plot_evolution(evo, out / "evolution.png", log_y=log_y)
    return {
        "source": evo.source,
        "points": len(evo.x),
        "x_label": evo.x_label,
        "summary": evo.summary(),
        "outputs": [str(out / "evolution.png"), str(out / "evolution.json")],
    }
