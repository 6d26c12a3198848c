"""The tables of a study's doc from its exported sweep summary (`forkrl sweep export`).

    python docs/ablation/tables.py docs/ablation/results/summary.json            # the toy study
    python docs/ablation/tables.py docs/forecast/selection/summary.json --metric "1 − MSE to truth (%)"

Prints markdown: mean [95% CI] per cell, the paired difference to the baseline [95% CI], and the
per-seed values, all read from `summary.json` (Student t over seeds, as `forkrl sweep` computes them).
"""

from __future__ import annotations

import argparse
import json


def label(cell: dict) -> str:
    """`selection.strategy=top,selection.ratio=0.2,loss.normalizer=all-tokens` -> `top` ρ = 0.2, all-tokens."""
    values = dict(cell["assignments"])
    text = f"`{values.pop('selection.strategy', '?')}`"
    if "selection.ratio" in values:
        text += f" ρ = {values.pop('selection.ratio')}"
    rest = [f"{k.rsplit('.', 1)[-1]} {v}" for k, v in values.items()]
    return ", ".join([text, *rest])


def interval(stat: dict | None, digits: int = 1, signed: bool = False) -> str:
    if not stat:
        return "—"
    fmt = f"{{:{'+' if signed else ''}.{digits}f}}"
    if stat.get("n", 0) < 2:
        return fmt.format(stat["mean"]) + " (1 seed)"
    return f"{fmt.format(stat['mean'])} [{fmt.format(stat['low'])}, {fmt.format(stat['high'])}]"


def seed_values(stat: dict, seeds: list[int]) -> str:
    values = stat["values"]
    return ", ".join(f"{values[str(x)]:.1f}" if str(x) in values else "—" for x in seeds)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("summary")
    parser.add_argument("--metric", default="Acc@8 (%)")
    parser.add_argument("--length", default="Len@8")
    args = parser.parse_args()
    s = json.load(open(args.summary, encoding="utf-8"))
    seeds = s["seeds"]
    seed_list = ", ".join(map(str, seeds))
    print(f"| cell | {args.metric} | Δ vs `all` | {args.length} | Δ {args.length} | per seed ({seed_list}) |")
    print("|---|---|---|---|---|---|")
    base = s.get("base_model")
    if base:
        per_seed = seed_values(base["acc_at_k"], seeds)
        row = [interval(base["acc_at_k"]), "—", interval(base["len_at_k"]), "—", per_seed]
        print("| base model | " + " | ".join(row) + " |")
    for cell in s["cells"]:
        vs = cell.get("vs_baseline") or {}
        per_seed = seed_values(cell["acc_at_k"], seeds)
        row = [
            interval(cell["acc_at_k"]),
            interval(vs.get("acc_at_k"), signed=True),
            interval(cell["len_at_k"]),
            interval(vs.get("len_at_k"), signed=True),
            per_seed,
        ]
        print(f"| {label(cell)} | " + " | ".join(row) + " |")
    print()
    print(f"Intervals: {s['interval']}, {s['confidence']:.0%}.")


if __name__ == "__main__":
    main()
