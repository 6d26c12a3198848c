"""The tables of a study's doc from its exported sweep summary (`forkrl sweep export`).

    python docs/ablation/tables.py docs/ablation/results/summary.json            # the toy study
    python docs/ablation/tables.py docs/forecast/selection/summary.json --metric "1 − MSE to truth (%)"
    python docs/ablation/tables.py docs/ablation/rho/summary.json --rho-curve docs/ablation/rho/rho_curve.png

Prints markdown: mean [95% CI] per cell, the paired difference to the baseline [95% CI], and the
per-seed values, all read from `summary.json` (Student t over seeds, as `forkrl sweep` computes them).
With `--rho-curve FIGURE` it also draws Acc@8 against ρ for the `top` cells, `all` at ρ = 1.0, each
with its interval, and the base model as a band, and prints the curve's points.
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


def rho_of(cell: dict) -> float | None:
    """ρ of a `top` cell (1.0 for `all`); None for any other cell or one with a further key."""
    values = dict(cell["assignments"])
    strategy = values.pop("selection.strategy", None)
    if strategy == "all" and not values:
        return 1.0
    if strategy == "top" and set(values) == {"selection.ratio"}:
        return float(values["selection.ratio"])
    return None


def rho_curve(s: dict, path: str, metric: str) -> None:
    """Acc@8 [CI] against ρ, with the base model's interval as a band; prints the points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sorted((rho, cell) for cell in s["cells"] if (rho := rho_of(cell)) is not None)
    if not points:
        raise SystemExit(f"{path}: no `top` or `all` cells in the summary")
    rhos = [rho for rho, _ in points]
    mean = [cell["acc_at_k"]["mean"] for _, cell in points]
    err = [
        [
            m - (cell["acc_at_k"]["low"] if cell["acc_at_k"]["low"] is not None else m)
            for m, (_, cell) in zip(mean, points)
        ],
        [
            (cell["acc_at_k"]["high"] if cell["acc_at_k"]["high"] is not None else m) - m
            for m, (_, cell) in zip(mean, points)
        ],
    ]
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    base = s.get("base_model")
    if base and base["acc_at_k"].get("low") is not None:
        ax.axhspan(base["acc_at_k"]["low"], base["acc_at_k"]["high"], color="gray", alpha=0.2, label="base model")
    ax.errorbar(rhos, mean, yerr=err, marker="o", capsize=4, label="`top` ρ (ρ = 1: all tokens)")
    for (_, cell), x in zip(points, rhos):
        for value in cell["acc_at_k"]["values"].values():
            ax.scatter([x], [value], s=10, color="C0", alpha=0.4)
    ax.set_xscale("log")
    ax.set_xticks(rhos, [f"{rho:g}" for rho in rhos])
    ax.minorticks_off()
    ax.set_xlabel("ρ, fraction of tokens in the gradient (highest entropy)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} against ρ: mean, {s['confidence']:.0%} t interval, seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=150)
    print()
    print(f"ρ curve ({path}): " + "; ".join(f"ρ {rho:g}: {interval(cell['acc_at_k'])}" for rho, cell in points))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("summary")
    parser.add_argument("--metric", default="Acc@8 (%)")
    parser.add_argument("--length", default="Len@8")
    parser.add_argument("--rho-curve", metavar="FIGURE", help="Also draw the metric against ρ into FIGURE (png).")
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
    if args.rho_curve:
        rho_curve(s, args.rho_curve, args.metric)


if __name__ == "__main__":
    main()
