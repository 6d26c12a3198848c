"""Training curves and the Acc@k / Len@k table across selection settings (paper 1, Figs. 6–7, Table 2).

Runs whose configs differ only in their seeds are one setting (`group_by_setting`); each setting
is drawn as the mean over its seeds with a band of ± one standard error of the mean, and its table
entries are mean ± standard error across seeds — the error bars the referee of paper 1 asked for.
A setting with a single run is drawn as a plain line, and its table entry carries the standard
error over questions from its `eval.json` (marked †), which is a different quantity: it measures
benchmark sampling noise, not seed-to-seed variation.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from forkrl.analysis.runs import (
    Run,
    RunError,
    RunGroup,
    group_by_setting,
    load_runs,
    mean_and_stderr,
    resolve_accuracy_key,
)
from forkrl.io import atomic_write_json, atomic_write_text, pyplot, save_figure

__all__ = [
    "Curve",
    "EvalSnapshot",
    "aggregate_curve",
    "compare_table",
    "latest_eval",
    "run_compare",
    "smooth_trailing",
    "table_markdown",
]


def smooth_trailing(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of the last `window` values at each position (fewer at the start). Shape kept."""
    if window < 1:
        raise ValueError(f"smoothing window must be >= 1, got {window}")
    if window == 1 or values.size == 0:
        return values.astype(np.float64)
    csum = np.concatenate([[0.0], np.cumsum(values, dtype=np.float64)])
    idx = np.arange(1, values.size + 1)
    lo = np.maximum(0, idx - window)
    return (csum[idx] - csum[lo]) / (idx - lo)


@dataclass
class Curve:
    """One setting's metric over steps: mean over seeds and its standard error."""

    label: str
    key: str
    steps: np.ndarray
    """Every step at which some seed has a value. Shape (S,)."""
    mean: np.ndarray
    """Mean over the seeds with a value at that step. Shape (S,)."""
    stderr: np.ndarray
    """std(ddof=1)/sqrt(n) over those seeds; NaN where fewer than 2. Shape (S,)."""
    n: np.ndarray
    """Seeds with a value at that step. Shape (S,)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "key": self.key,
            "steps": self.steps.tolist(),
            "mean": self.mean.tolist(),
            "stderr": self.stderr.tolist(),
            "n": self.n.tolist(),
        }


def aggregate_curve(group: RunGroup, key: str, smooth: int = 1) -> Curve:
    """Smooth each seed's series of `key` (trailing window over its logged points), then average
    the seeds step by step. Raises `RunError` when a run never logged `key`."""
    per_run = []
    for run in group.runs:
        steps, values = run.series(key)
        per_run.append(dict(zip(steps.tolist(), smooth_trailing(values, smooth).tolist())))
    steps = np.array(sorted({s for series in per_run for s in series}), dtype=np.int64)
    table = np.array([[series.get(int(s), math.nan) for s in steps] for series in per_run]).reshape(
        len(per_run), steps.size
    )  # (runs, S)
    n = np.isfinite(table).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, np.nansum(table, axis=0) / np.maximum(n, 1), math.nan)
        dev = np.where(np.isfinite(table), table - mean, 0.0)
        var = (dev**2).sum(axis=0) / np.maximum(n - 1, 1)
        stderr = np.where(n >= 2, np.sqrt(var / np.maximum(n, 1)), math.nan)
    return Curve(label=group.label, key=key, steps=steps, mean=mean, stderr=stderr, n=n)


# ---------------------------------------------------------------------------- Acc@k / Len@k


@dataclass
class EvalSnapshot:
    """A run's latest evaluation: per benchmark Acc@k (percent), Len@k (tokens) and std err."""

    step: int
    k: int | None
    benchmarks: dict[str, dict[str, float | None]]
    """name -> {"acc": ..., "len": ..., "std_err": ... (over questions, None if unknown)}."""
    average: dict[str, float | None] | None
    """Unweighted mean over benchmarks (the paper's Avg.); None with fewer than two."""
    source: str


def latest_eval(run: Run) -> EvalSnapshot | None:
    """The latest `eval/step_N/eval.json`, else the latest `eval/<name>/acc_at_k` record in
    `metrics.jsonl`; None when the run was never evaluated."""
    if run.evals:
        step = max(run.evals)
        report = run.evals[step]
        source = run.path / "eval" / f"step_{step:06d}" / "eval.json"
        results = report.get("results")
        if not isinstance(results, list) or not results:
            raise RunError(f"{source}: no 'results' list (expected the layout of `forkrl eval`)")
        benchmarks = {}
        for res in results:
            if not all(k in res for k in ("name", "acc_at_k", "len_at_k")):
                raise RunError(f"{source}: a result lacks one of 'name', 'acc_at_k', 'len_at_k'")
            benchmarks[res["name"]] = {"acc": res["acc_at_k"], "len": res["len_at_k"], "std_err": res.get("std_err")}
        k = report.get("config", {}).get("k") or results[0].get("k")
        avg = report.get("average")
        average = None
        if len(benchmarks) >= 2:
            average = (
                {"acc": avg["acc_at_k"], "len": avg["len_at_k"], "std_err": avg.get("std_err")}
                if isinstance(avg, dict)
                else _mean_over(benchmarks)
            )
        return EvalSnapshot(step=step, k=k, benchmarks=benchmarks, average=average, source=str(source))

    for record in reversed(run.records):
        names = sorted(key[len("eval/") : -len("/acc_at_k")] for key in record if _is_eval_acc(key, record))
        if names:
            benchmarks = {
                name: {
                    "acc": record[f"eval/{name}/acc_at_k"],
                    "len": record.get(f"eval/{name}/len_at_k"),
                    "std_err": None,
                }
                for name in names
            }
            return EvalSnapshot(
                step=record["step"],
                k=run.config_value("trainer.eval_samples"),
                benchmarks=benchmarks,
                average=_mean_over(benchmarks) if len(benchmarks) >= 2 else None,
                source=f"{run.metrics_file} (step {record['step']})",
            )
    return None


def _is_eval_acc(key: str, record: dict[str, Any]) -> bool:
    v = record[key]
    return key.startswith("eval/") and key.endswith("/acc_at_k") and isinstance(v, (int, float)) and math.isfinite(v)


def _mean_over(benchmarks: dict[str, dict[str, float | None]]) -> dict[str, float | None]:
    lens = [b["len"] for b in benchmarks.values()]
    return {
        "acc": sum(b["acc"] for b in benchmarks.values()) / len(benchmarks),
        "len": None if None in lens else sum(lens) / len(lens),
        "std_err": None,
    }


def compare_table(groups: Sequence[RunGroup]) -> dict[str, Any]:
    """Acc@k / Len@k per setting and benchmark, mean ± standard error across the setting's seeds.

    Returns {"k", "benchmarks", "rows", "not_evaluated"}; a row has the setting's label, its runs,
    seeds, eval steps and per benchmark {acc, acc_se, len, len_se, n, se_kind} where `se_kind` is
    "seeds" (across seeds), "questions" (a single run's std err over questions) or None.
    """
    rows, not_evaluated, ks, names = [], [], set(), []
    for group in groups:
        snaps = []
        for run in group.runs:
            snap = latest_eval(run)
            if snap is None:
                not_evaluated.append(str(run.path))
            else:
                snaps.append((run, snap))
                ks.add(snap.k)
                names += [n for n in snap.benchmarks if n not in names]
        if not snaps:
            continue
        entries: dict[str, Any] = {}
        all_names = list(dict.fromkeys(n for _, s in snaps for n in s.benchmarks))
        for name in [*all_names, "average"]:
            per_seed = [s.average if name == "average" else s.benchmarks.get(name) for _, s in snaps]
            per_seed = [e for e in per_seed if e is not None]
            if per_seed:
                entries[name] = _aggregate_entry(per_seed)
        rows.append(
            {
                "label": group.label,
                "runs": [str(run.path) for run, _ in snaps],
                "seeds": [run.config_value("seed") for run, _ in snaps],
                "eval_steps": [s.step for _, s in snaps],
                "sources": [s.source for _, s in snaps],
                "benchmarks": entries,
            }
        )
    if any("average" in row["benchmarks"] for row in rows):
        names.append("average")
    k = ks.pop() if len(ks) == 1 else None
    return {"k": k, "benchmarks": names, "rows": rows, "not_evaluated": not_evaluated}


def _aggregate_entry(per_seed: list[dict[str, float | None]]) -> dict[str, Any]:
    acc, acc_se = mean_and_stderr([e["acc"] for e in per_seed])
    lens = [e["len"] for e in per_seed if e["len"] is not None]
    length, len_se = mean_and_stderr(lens) if lens else (None, None)
    se_kind = "seeds" if acc_se is not None else None
    if len(per_seed) == 1 and per_seed[0].get("std_err") is not None:
        acc_se, se_kind = per_seed[0]["std_err"], "questions"
    return {"acc": acc, "acc_se": acc_se, "len": length, "len_se": len_se, "n": len(per_seed), "se_kind": se_kind}


def table_markdown(table: dict[str, Any]) -> str:
    """Rows = settings; per benchmark an Acc@k and a Len@k column (the paper's Table 2 layout)."""
    k = table["k"] if table["k"] is not None else "k"
    header = ["setting", "seeds", "eval step"]
    for name in table["benchmarks"]:
        header += [f"{name} Acc@{k}", f"{name} Len@{k}"]
    lines = ["| " + " | ".join(header) + " |", "|---|---:|---:|" + "---:|" * (2 * len(table["benchmarks"]))]
    dagger = False
    for row in table["rows"]:
        steps = "/".join(str(s) for s in sorted(set(row["eval_steps"])))
        cells = [row["label"], str(len(row["runs"])), steps]
        for name in table["benchmarks"]:
            e = row["benchmarks"].get(name)
            if e is None:
                cells += ["–", "–"]
                continue
            acc = f"{e['acc']:.2f}"
            if e["acc_se"] is not None:
                acc += f" ± {e['acc_se']:.2f}" + ("†" if e["se_kind"] == "questions" else "")
                dagger |= e["se_kind"] == "questions"
            length = "–" if e["len"] is None else f"{e['len']:.1f}"
            if e["len_se"] is not None:
                length += f" ± {e['len_se']:.1f}"
            cells += [acc, length]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [
        "",
        "Acc@k in percent, Len@k in tokens, from each run's latest evaluation. "
        "± is the standard error of the mean across seeds, std(ddof=1)/√n.",
    ]
    if dagger:
        notes.append("† a single run: standard error over questions from its eval.json, not across seeds.")
    if table["not_evaluated"]:
        notes.append("Not evaluated (left out): " + ", ".join(table["not_evaluated"]) + ".")
    return "\n".join(lines + notes) + "\n"


# ---------------------------------------------------------------------------- command


PANELS = (
    ("accuracy", "training accuracy"),
    ("entropy", "overall entropy"),
    ("response_length", "response length (tokens)"),
)


def run_compare(
    run_dirs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    smooth: int = 1,
    accuracy_key: str = "accuracy",
) -> dict[str, Any]:
    """`forkrl analyze compare`: write `compare.png`, `compare.md` and `compare.json` into `out_dir`.

    Args:
        run_dirs: run directories; runs whose configs differ only in seeds are averaged.
        out_dir: created if needed.
        smooth: trailing moving-average window (in logged points) applied to each run's curves.
        accuracy_key: the first panel's metric: `accuracy` (training batch) or an eval metric,
            e.g. `eval/aime24/acc_at_k` or just `aime24` (paper Fig. 6 plots AIME'24).

    Returns the settings (label, runs, seeds), the table, and the final value of each curve.
    """
    runs = load_runs(run_dirs)
    groups = group_by_setting(runs)
    panels = list(PANELS)
    if accuracy_key != "accuracy":
        keys = {resolve_accuracy_key(run, accuracy_key) for run in runs}
        if len(keys) != 1:
            raise RunError(f"accuracy key {accuracy_key!r} resolves differently across runs: {sorted(keys)}")
        panels[0] = (keys.pop(), f"accuracy ({accuracy_key})")
    curves = {key: [aggregate_curve(g, key, smooth) for g in groups] for key, _ in panels}
    table = compare_table(groups)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _plot_curves(curves, panels, groups, smooth, out / "compare.png")
    markdown = table_markdown(table)
    atomic_write_text(out / "compare.md", markdown)
    settings = [{"label": g.label, "runs": [str(r.path) for r in g.runs], "seeds": g.seeds} for g in groups]
    atomic_write_json(
        out / "compare.json",
        {
            "smooth": smooth,
            "settings": settings,
            "curves": {key: [c.to_json() for c in cs] for key, cs in curves.items()},
            "table": table,
        },
    )
    final = {
        key: {c.label: {"mean": float(c.mean[-1]), "stderr": _or_none(c.stderr[-1])} for c in cs if c.steps.size}
        for key, cs in curves.items()
    }
    return {
        "settings": settings,
        "table": table,
        "final": final,
        "outputs": [str(out / n) for n in ("compare.png", "compare.md", "compare.json")],
    }


def _or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _plot_curves(curves, panels, groups: list[RunGroup], smooth: int, path: Path) -> None:
    fig = pyplot().figure(figsize=(16, 4.5), layout="constrained")
    axes = [fig.add_subplot(1, len(panels), i + 1) for i in range(len(panels))]
    for ax, (key, title) in zip(axes, panels):
        for i, (curve, group) in enumerate(zip(curves[key], groups)):
            color = f"C{i % 10}"
            seeds = len(group.runs)
            label = curve.label + (f" ({seeds} seeds)" if seeds > 1 else "")
            ax.plot(curve.steps, curve.mean, color=color, lw=1.5, label=label)
            band = np.isfinite(curve.stderr)
            if band.any():
                ax.fill_between(
                    curve.steps,
                    curve.mean - np.where(band, curve.stderr, 0.0),
                    curve.mean + np.where(band, curve.stderr, 0.0),
                    where=band,
                    color=color,
                    alpha=0.2,
                    lw=0,
                )
        ax.set_title(title + (f" (smoothed over {smooth})" if smooth > 1 else ""))
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if any(len(g.runs) > 1 for g in groups):
        fig.suptitle("mean over seeds, band: ± one standard error", fontsize=9)
    save_figure(fig, path, dpi=150)
