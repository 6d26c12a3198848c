"""What the forecasting comparison's score is made of: invalid forecasts and the error of the valid ones.

    python docs/forecast/breakdown.py docs/forecast/selection

Reads each run's final evaluation scores (`final_scores.json`, taken from its `final_eval/eval.json`
beside the export: one `forecast_truth` score s = 1 − (p − q)² per held-out game, rounded to 6
digits, 0 for an invalid forecast) and prints, per cell, mean [95% CI]
over seeds and the paired difference to `all`, of: the share of invalid forecasts (%), the mean
squared error to the true probability over the valid ones (1 − s; ×1000), and, from the samples the
trainer logged in the last 20 steps (`samples_last20.jsonl`, 80 per run, copied beside the export),
the share whose reasoning lines are correct (`trace_is_correct`). Intervals from
`forkrl.sweep.stats`, as the sweep's own table.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from forkrl.sweep.stats import mean_interval, paired_difference
from forkrl.tasks.forecast.matchups import MatchUp, trace_is_correct


def run_numbers(run: Path) -> dict[str, float]:
    scores = json.loads((run / "final_scores.json").read_text())
    valid = [s for s in scores if s > 0.0]
    return {
        "invalid_pct": 100.0 * (len(scores) - len(valid)) / len(scores),
        "mse_valid_x1000": 1000.0 * sum(1.0 - s for s in valid) / len(valid),
    }


def reasoning_correct_pct(run: Path) -> float | None:
    path = run / "samples_last20.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    ok = 0
    for r in rows:
        a, b, home = re.match(r"rating (\d+) vs (\d+) home (yes|no)", r["prompt"]).groups()
        ok += trace_is_correct(r["completion"], MatchUp(int(a), int(b), home == "yes"))
    return 100.0 * ok / len(rows)


def fmt(interval, signed: bool = False) -> str:
    sign = "+" if signed else ""
    if interval.half_width is None:
        return f"{interval.mean:{sign}.2f}"
    return f"{interval.mean:{sign}.2f} [{interval.low:{sign}.2f}, {interval.high:{sign}.2f}]"


def main(root: str) -> None:
    root = Path(root)
    cells: dict[str, dict[int, dict[str, float]]] = {}
    for result in sorted(root.glob("*/seed_*/sweep_result.json")):
        run = result.parent
        numbers = run_numbers(run)
        reasoning = reasoning_correct_pct(run)
        if reasoning is not None:
            numbers["reasoning_pct"] = reasoning
        cells.setdefault(run.parent.name, {})[int(run.name.removeprefix("seed_"))] = numbers
    baseline = cells.get("selection.strategy=all", {})
    keys = ("invalid_pct", "mse_valid_x1000", "reasoning_pct")
    print(
        "| cell | invalid forecasts (%) | Δ vs `all` | MSE to truth, valid forecasts (×1000) | Δ vs `all` "
        "| reasoning correct, last 20 steps' samples (%) | Δ vs `all` |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, seeds in cells.items():
        row = [name if name == "base" else f"`{name}`"]
        for key in keys:
            values = {s: v[key] for s, v in seeds.items() if key in v}
            if not values:
                row += ["—", "—"]
                continue
            row.append(fmt(mean_interval(list(values.values()))))
            base_values = {s: v[key] for s, v in baseline.items() if key in v}
            diff = paired_difference(values, base_values) if name != "base" and base_values else None
            row.append("—" if diff is None or name == "selection.strategy=all" else fmt(diff[0], signed=True))
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
