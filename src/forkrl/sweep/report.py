"""`forkrl sweep report DIR`: per-cell final Acc@k / Len@k with 95% t intervals over seeds, paired differences
against the baseline cell, cost, and training curves with bands: `summary.json`, `summary.md`, `figures/*.png`.

Everything is read back from the sweep directory (`sweep.json`, each run's `sweep_result.json` and
`metrics.jsonl`, the base model's `base/seed_S/sweep_result.json`), so the report can be rebuilt at
any time, also while the sweep is still running (missing runs are listed and left out).
The statistics are those of `forkrl.sweep.stats`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from forkrl.errors import UserError
from forkrl.io import atomic_write_json, atomic_write_text, pyplot, save_figure
from forkrl.sweep.grid import Cell, find_baseline
from forkrl.sweep.runner import RESULT_FILE
from forkrl.sweep.stats import CONFIDENCE, curve_band, mean_interval, paired_difference

SWEEP_FILE = "sweep.json"
CURVES = (
    ("accuracy", "training accuracy (sampled batch)"),
    ("entropy", "mean token entropy (nats)"),
    ("response_length", "response length (tokens)"),
    ("kept_frac", "kept fraction of tokens"),
)
"""metrics.jsonl keys drawn as mean ± 95% CI bands over seeds, with their axis labels."""
METRICS = ("acc_at_k", "len_at_k")


class SweepReportError(UserError):
    """A directory that is not a sweep (no sweep.json) or a baseline that names no cell."""


def run_dir(out: Path, cell: Cell, seed: int) -> Path:
    return out / cell.slug / f"seed_{seed}"


def base_dir(out: Path, seed: int) -> Path:
    return out / "base" / f"seed_{seed}"


def load_sweep(out: Path) -> dict[str, Any]:
    path = out / SWEEP_FILE
    if not path.is_file():
        raise SweepReportError(f"{out}: no {SWEEP_FILE} here (is it a forkrl sweep directory?)")
    try:
        sweep = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SweepReportError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(sweep, dict) or not isinstance(sweep.get("cells"), list):
        raise SweepReportError(f"{path}: not a sweep record (no list of cells)")
    return sweep


def cells_of(sweep: dict[str, Any]) -> list[Cell]:
    return [Cell(tuple((k, v) for k, v in c["assignments"])) for c in sweep["cells"]]


def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _series(metrics_file: Path, key: str) -> dict[int, float]:
    out = {}
    if metrics_file.is_file():
        for line in metrics_file.read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            if r.get(key) is not None:
                out[int(r["step"])] = float(r[key])
    return out


def build_summary(out: str | Path, baseline: str | None = None) -> dict[str, Any]:
    """The numbers of the report (also `summary.json`)."""
    out = Path(out)
    sweep = load_sweep(out)
    cells, seeds = cells_of(sweep), sweep["seeds"]
    baseline = baseline if baseline is not None else sweep.get("baseline")
    try:
        base_cell = find_baseline(baseline, cells) if baseline else None
    except ValueError as err:
        raise SweepReportError(str(err)) from err

    results = {c.name: {s: _read(run_dir(out, c, s) / RESULT_FILE) for s in seeds} for c in cells}
    results = {name: {s: r for s, r in by_seed.items() if r is not None} for name, by_seed in results.items()}
    base = {s: r for s in seeds if (r := _read(base_dir(out, s) / RESULT_FILE)) is not None}
    k = next((r["k"] for by_seed in [base, *results.values()] for r in by_seed.values()), None)

    def summarize(by_seed: dict[int, dict]) -> dict[str, Any]:
        entry: dict[str, Any] = {"seeds": sorted(by_seed)}
        for m in METRICS:
            values = {s: by_seed[s][m] for s in sorted(by_seed)}
            entry[m] = {"values": values, **(mean_interval(list(values.values())).to_json() if values else {})}
        return entry

    rows = []
    for cell in cells:
        by_seed = results[cell.name]
        row = {"name": cell.name, "assignments": [list(a) for a in cell.assignments], **summarize(by_seed)}
        if base_cell is not None and cell != base_cell:
            ref = results[base_cell.name]
            row["vs_baseline"] = {}
            for m in METRICS:
                paired = paired_difference({s: r[m] for s, r in by_seed.items()}, {s: r[m] for s, r in ref.items()})
                if paired is not None:
                    row["vs_baseline"][m] = {**paired[0].to_json(), "seeds": paired[1]}
        if by_seed:
            row["cost"] = {
                key: mean_interval([r[key] for r in by_seed.values()]).to_json()
                for key in ("tokens_generated", "tokens_in_gradient", "train_s")
            }
        rows.append(row)
    missing = [f"{c.name}/seed_{s}" for c in cells for s in seeds if s not in results[c.name]]
    return {
        "k": k,
        "seeds": seeds,
        "confidence": CONFIDENCE,
        "interval": "Student t with n - 1 degrees of freedom over seeds; differences paired by seed",
        "baseline": base_cell.name if base_cell else None,
        "config": sweep.get("config"),
        "overrides": sweep.get("overrides", []),
        "base_model": summarize(base) if base else None,
        "cells": rows,
        "missing": missing,
    }


def _fmt(entry: dict | None, digits: int = 1, signed: bool = False) -> str:
    if not entry or "mean" not in entry:
        return "—"
    sign = "+" if signed else ""
    text = f"{entry['mean']:{sign}.{digits}f}"
    if entry.get("half_width") is not None:
        text += f" ± {entry['half_width']:.{digits}f}"
    return text


def summary_markdown(summary: dict[str, Any]) -> str:
    """A table a paper can paste, with what the ± means."""
    k = summary["k"] or "k"
    has_base = summary["baseline"] is not None
    head = ["setting", "seeds", f"Acc@{k} (%)", f"Len@{k} (tokens)"]
    if has_base:
        head[3:3] = [f"Δ Acc@{k} vs baseline"]
        head.append(f"Δ Len@{k}")
    head += ["tokens generated", "tokens in gradient", "train time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def line(name: str, row: dict[str, Any]) -> str:
        cells = [name, str(len(row.get("seeds", []))), _fmt(row.get("acc_at_k"))]
        if has_base:
            cells.append(_fmt(row.get("vs_baseline", {}).get("acc_at_k"), signed=True) if "vs_baseline" in row else "—")
        cells.append(_fmt(row.get("len_at_k")))
        if has_base:
            cells.append(_fmt(row.get("vs_baseline", {}).get("len_at_k"), signed=True) if "vs_baseline" in row else "—")
        cost = row.get("cost", {})
        cells += [_fmt(cost.get("tokens_generated"), 0), _fmt(cost.get("tokens_in_gradient"), 0)]
        cells.append(_fmt(cost.get("train_s"), 0))
        return "| " + " | ".join(cells) + " |"

    if summary.get("base_model"):
        lines.append(line("base model (no training)", summary["base_model"]))
    for row in summary["cells"]:
        label = f"`{row['name']}`" + (" (baseline)" if row["name"] == summary["baseline"] else "")
        lines.append(line(label, row))
    notes = [
        f"Mean ± half-width of the {100 * summary['confidence']:.0f}% confidence interval over seeds "
        f"({', '.join(map(str, summary['seeds']))}): Student t with n − 1 degrees of freedom; no ± with one seed.",
    ]
    if has_base:
        notes.append(
            f"Δ: the paired difference to the baseline `{summary['baseline']}`, seed by seed (same data order, "
            "sampling seeds and evaluation seed), with its own t interval; it excludes 0 when the difference is "
            "significant at 5%."
        )
    notes.append(
        "Acc@k / Len@k: mean accuracy (%) and response length over k samples per held-out question at the "
        "training temperature, of the final model; the base model is evaluated once per seed with the same seeds."
    )
    notes.append("Costs are means over seeds: tokens sampled, response tokens that carried gradient, Σ step time.")
    if summary["missing"]:
        notes.append(f"Not finished (left out): {', '.join(summary['missing'])}.")
    body = "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    return f"# Sweep summary\n\nConfig `{summary['config']}`.\n\n{body}"


def curve_figures(out: Path, summary: dict[str, Any]) -> list[str]:
    """One PNG per metric in `CURVES`: each cell's mean over seeds with its 95% CI band."""
    sweep = load_sweep(out)
    plt = pyplot()
    files = []
    (out / "figures").mkdir(exist_ok=True)
    for key, ylabel in CURVES:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        drawn = False
        for cell in cells_of(sweep):
            series = [_series(run_dir(out, cell, s) / "metrics.jsonl", key) for s in summary["seeds"]]
            series = [s for s in series if s]
            if not series:
                continue
            steps = np.array(sorted(set().union(*series)))
            curves = [np.array([s.get(int(t), np.nan) for t in steps]) for s in series]
            mean, low, high = curve_band(curves)
            (handle,) = ax.plot(steps, mean, label=f"{cell.name} (n={len(curves)})")
            if len(curves) > 1:
                ax.fill_between(steps, low, high, color=handle.get_color(), alpha=0.2, linewidth=0)
            drawn = True
        if not drawn:
            plt.close(fig)
            continue
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
        ax.set_title(f"mean ± {100 * CONFIDENCE:.0f}% CI over seeds", fontsize=9)
        name = f"figures/{key}.png"
        save_figure(fig, out / name)
        files.append(name)
    return files


def write_report(out: str | Path, baseline: str | None = None) -> dict[str, Any]:
    """Write `summary.json`, `summary.md` and `figures/*.png` into the sweep directory; return the summary."""
    out = Path(out)
    summary = build_summary(out, baseline)
    summary["figures"] = curve_figures(out, summary)
    atomic_write_json(out / "summary.json", summary)
    md = summary_markdown(summary) + "".join(f"\n![{f}]({f})\n" for f in summary["figures"])
    atomic_write_text(out / "summary.md", md)
    return summary
