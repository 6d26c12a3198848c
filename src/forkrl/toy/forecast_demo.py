"""`forkrl demo --task forecast`: calibrating an over-confident forecaster with outcome data alone.

1. measure the shipped base model (`forkrl toy build --task forecast`) on held-out games: one
   sampled forecast per game at T = 1; Brier score, log loss, ECE against the outcomes and against
   the true probabilities, and the Bayes-optimal Brier as the limit (`forkrl.analysis.calibration`);
2. train it with the empirical-win-rate reward (`forecast_winrate`; recipe `toy_forecast.yaml`)
   through the same `Trainer` a Qwen3 user runs;
3. measure again; write reliability diagrams and a sharpness histogram before/after, the held-out
   forecasts (`forecasts_before.jsonl`, `forecasts_after.jsonl`, readable by `forkrl analyze
   calibration`), `report.md` and `report.json`, and print a before/after table.

The recipe part (`forecast_config_dict`, `forecast_sweep_setup`) fills in what the YAML cannot
hold: the base model and the data files.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
import yaml

from forkrl.analysis.calibration import reliability_diagram, sharpness_histogram
from forkrl.config import config_from_dict
from forkrl.io import atomic_write_json, atomic_write_text, pyplot, save_figure, write_once
from forkrl.models.loading import load_policy
from forkrl.tasks.forecast import check_outcomes, generate_rows, write_rows_jsonl
from forkrl.toy.build import BUILD_INFO_FILE
from forkrl.toy.forecast_build import sample_forecasts

__all__ = [
    "FORECAST_RECIPE",
    "SHIPPED_FORECAST_MODEL",
    "forecast_config_dict",
    "forecast_sweep_setup",
    "run_forecast_demo",
]

FORECAST_RECIPE = Path(__file__).parent / "toy_forecast.yaml"
"""The recipe, shipped in the package."""
SHIPPED_FORECAST_MODEL = Path(__file__).parent / "forecast_model"
"""The over-confident toy forecaster shipped inside the package (`forkrl toy build --task forecast --seed 0`)."""
NUM_TRAIN_ROWS = 4096
"""Training games drawn per seed (the sampler cycles through them)."""
NUM_EVAL_ROWS = 2048
"""Held-out test-split games (`--eval-problems` default)."""
BINS = 10
"""Equal-width bins of the reported ECE and reliability diagrams (those of the reward)."""


def _build_settings(base: Path) -> dict[str, Any]:
    info = base / BUILD_INFO_FILE
    return json.loads(info.read_text())["config"] if info.is_file() else {}


def forecast_config_dict(
    seed: int,
    output_dir: str | os.PathLike,
    train_file: str | os.PathLike,
    base: str | os.PathLike = SHIPPED_FORECAST_MODEL,
) -> dict[str, Any]:
    """The recipe with `seed`, `output_dir`, the model and the training file set."""
    cfg = yaml.safe_load(FORECAST_RECIPE.read_text(encoding="utf-8"))
    cfg["seed"] = seed
    cfg["output_dir"] = str(output_dir)
    cfg["model"]["name"] = str(base)
    cfg["data"]["train_files"] = [str(train_file)]
    return cfg


def forecast_sweep_setup(data_dir: str | os.PathLike, seed: int) -> list[str]:
    """`forkrl sweep CONFIG --setup forkrl.toy.forecast_demo:forecast_sweep_setup`: the games of `seed`
    (those `forkrl demo --task forecast --seed S` trains on), the demo's held-out games (the same for
    every seed) and the shipped model, as overrides.

    Each file is written once; a file already there must hold exactly these games."""
    data_dir = Path(data_dir)
    train = _write_games_once(data_dir / f"forecast_train_seed_{seed}.jsonl", generate_rows(NUM_TRAIN_ROWS, seed))
    eval_seed = int(_build_settings(SHIPPED_FORECAST_MODEL).get("eval_seed", 1234))
    test = _write_games_once(data_dir / "forecast_test.jsonl", generate_rows(NUM_EVAL_ROWS, eval_seed, "test"))
    return [
        f"model.name={SHIPPED_FORECAST_MODEL}",
        f"data.train_files=[{train.resolve()}]",
        f"data.eval_files=[{test.resolve()}]",
    ]


def _write_games_once(path: Path, rows) -> Path:
    return write_once(path, lambda tmp: write_rows_jsonl(tmp, rows), "games than the forecast recipe draws now")


def _reward_plot(path: Path, run_dir: Path) -> str:
    """Mean training reward per step (the empirical-win-rate reward of the sampled forecasts)."""
    plt = pyplot()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]
    reward = np.asarray([r.get("reward", np.nan) for r in records], dtype=float)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(steps, reward, color="tab:blue", alpha=0.35, label="training batch")
    if len(reward) >= 5:
        ax.plot(steps[4:], np.convolve(reward, np.ones(5) / 5, mode="valid"), color="tab:blue", label="5-step mean")
    ax.set_xlabel("step")
    ax.set_ylabel("empirical-win-rate reward")
    ax.legend(fontsize=8)
    save_figure(fig, path)
    return path.name


_ROWS = (
    ("Brier score (outcomes)", "brier", "bayes_brier"),
    ("expected Brier score (given the truth)", "expected_brier", "bayes_brier"),
    ("log loss (outcomes)", "log_loss", "bayes_log_loss"),
    ("ECE vs outcomes", "ece", None),
    ("ECE vs true probabilities", "ece_true", None),
    ("mean squared error to the truth", "mse_to_true", None),
    ("invalid forecasts (%)", "invalid_fraction", None),
    ("reasoning correct (%)", "reasoning_correct", None),
    ("mean token entropy", "mean_entropy", None),
)


def _table(before: dict, after: dict, limits: dict) -> str:
    def fmt(key: str, value: float) -> str:
        return f"{100 * value:.1f}" if key in ("invalid_fraction", "reasoning_correct") else f"{value:.4f}"

    lines = ["| | base model | after RL | limit (the true probabilities) |", "|---|---|---|---|"]
    for label, key, limit in _ROWS:
        bound = fmt(key, limits[limit]) if limit else ("0" if key in ("ece_true", "mse_to_true") else "")
        lines.append(f"| {label} | {fmt(key, before[key])} | {fmt(key, after[key])} | {bound} |")
    return "\n".join(lines)


def run_forecast_demo(
    steps: int = 100,
    strategy: str | None = None,
    ratio: float | None = None,
    seed: int = 0,
    out: str | os.PathLike = "runs/demo_forecast",
    base_model: str | os.PathLike | None = None,
    eval_rows: int = NUM_EVAL_ROWS,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Run the forecasting demo; returns the before/after numbers (also in `OUT/report.json`).

    `strategy` / `ratio` None keep the recipe's (`all`). As `forkrl demo`: an earlier demo in `out`
    is moved aside to `OUT.old-<time>` once the config is known to be good, and `out` is locked
    while the demo runs.
    """
    from forkrl.train.run_dir import RunDirectory

    with RunDirectory(out, "overwrite") as run:
        return _run(steps, strategy, ratio, seed, Path(out), base_model, eval_rows, overrides, run.prepare)


def _run(steps, strategy, ratio, seed, out: Path, base_model, eval_rows, overrides, prepare_out) -> dict[str, Any]:
    started = time.perf_counter()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    base = Path(base_model) if base_model else SHIPPED_FORECAST_MODEL
    if not (base / "config.json").is_file():
        raise FileNotFoundError(
            f"no toy forecast model at {base}: build one with `forkrl toy build --task forecast --seed 0 --out {base}`"
        )
    build = _build_settings(base)
    test_rows = generate_rows(eval_rows, int(build.get("eval_seed", 1234)), "test")
    recipe = forecast_config_dict(seed, out / "run", out / "data" / "train.jsonl", base=base)
    if strategy is not None:
        recipe["selection"]["strategy"] = strategy
    if ratio is not None:
        recipe["selection"]["ratio"] = ratio
    recipe["trainer"]["total_steps"] = steps
    cfg = config_from_dict(recipe, overrides, check_files=False)  # the data file is written below
    max_new_tokens = cfg.rollout.max_new_tokens  # the measurements sample as the training does
    prepare_out()  # nothing is written into OUT before this point
    train_file = write_rows_jsonl(out / "data" / "train.jsonl", generate_rows(NUM_TRAIN_ROWS, seed))
    write_rows_jsonl(out / "data" / "test.jsonl", test_rows)
    check_outcomes(str(train_file), cfg.data.answer_key)  # every row's outcome, before any training
    questions = [r.matchup.question for r in test_rows]

    model, tokenizer = load_policy(base, dtype="float32", device="cpu")
    before = sample_forecasts(model, tokenizer, test_rows, max_new_tokens, seed=seed + 1)
    before.write_jsonl(out / "forecasts_before.jsonl", questions)
    b = before.summary(BINS)
    print(f"base model: Brier {b['brier']:.4f}, ECE vs truth {b['ece_true']:.3f}", flush=True)
    del model

    from forkrl.train.trainer import Trainer

    trainer = Trainer(cfg)
    trainer.train()
    after = sample_forecasts(trainer.model, tokenizer, test_rows, max_new_tokens, seed=seed + 1)
    after.write_jsonl(out / "forecasts_after.jsonl", questions)
    a = after.summary(BINS)

    q = np.asarray([r.matchup.true_probability for r in test_rows])
    limits = {
        "bayes_brier": float(np.mean(q * (1 - q))),
        "bayes_log_loss": float(-np.mean(q * np.log(q) + (1 - q) * np.log(1 - q))),
    }
    plots = [
        reliability_diagram(
            out / "reliability.png", {"base model": before.valid, f"after {steps} RL steps": after.valid}, BINS
        ).name,
        sharpness_histogram(out / "sharpness.png", {"base model": before.valid[0], "after RL": after.valid[0]}).name,
        _reward_plot(out / "reward.png", out / "run"),
    ]
    table = _table(b, a, limits)
    elapsed = time.perf_counter() - started
    summary = {
        "task": "forecast",
        "reward": cfg.reward.function,
        "strategy": cfg.selection.strategy,
        "ratio": cfg.selection.ratio,
        "seed": seed,
        "steps": steps,
        "seconds": elapsed,
        "eval_rows": eval_rows,
        "bins": BINS,
        "limits": limits,
        "before": {k: v for k, v in b.items() if k not in ("table", "table_true")},
        "after": {k: v for k, v in a.items() if k not in ("table", "table_true")},
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default (spin)"),
        "transformers": transformers.__version__,
    }
    atomic_write_json(out / "report.json", summary)
    atomic_write_text(out / "report.md", _report_md(summary, table, plots))
    print(table)
    print(f"report: {out / 'report.md'} ({elapsed:.0f} s)")
    return summary


def _report_md(s: dict, table: str, plots: list[str]) -> str:
    b, a = s["before"], s["after"]
    return (
        f"""# forkrl demo: calibrating a toy forecaster with the empirical-win-rate reward

Reward `{s["reward"]}`, selection `{s["strategy"]}` (ρ = {s["ratio"]}), {s["steps"]} steps, seed {s["seed"]},
{s["seconds"]:.0f} s on CPU ({s["threads"]} threads, OpenMP wait policy {s["omp_wait_policy"]}, transformers
{s["transformers"]}). Held-out set: {s["eval_rows"]} test-split games, one forecast sampled per game at T = 1;
ECE over {s["bins"]} equal-width bins.

{table}

The limit of the Brier score is the Bayes-optimal one: the expected Brier score of the true
probabilities, mean q(1 − q). The Brier score of a forecaster exceeds it, in expectation, by its mean
squared error to the truth. ECE against the true probabilities is the calibration this toy can
measure exactly (the "market").

Murphy decomposition of the binned Brier score (reliability − resolution + uncertainty):
base model {b["murphy"]["reliability"]:.4f} − {b["murphy"]["resolution"]:.4f} + {b["murphy"]["uncertainty"]:.4f};
after RL {a["murphy"]["reliability"]:.4f} − {a["murphy"]["resolution"]:.4f} + {a["murphy"]["uncertainty"]:.4f}.

## Plots

"""
        + "\n".join(f"![{p}]({p})" for p in plots)
        + """

Held-out forecasts: `forecasts_before.jsonl`, `forecasts_after.jsonl` (`forkrl analyze calibration FILE`);
training metrics, per step: `run/metrics.jsonl`; sampled completions: `run/samples.jsonl`; the resolved
config: `run/config.yaml`.
"""
    )
