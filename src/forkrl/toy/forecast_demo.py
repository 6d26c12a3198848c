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
hold: the base model and the data files. `ForecastTask` is the forecast toy (`--task forecast`):
the build's hooks (`forkrl.toy.forecast_build`) and the demo's below; `forkrl.toy.task.run_toy_demo`
runs the steps above.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from forkrl.analysis.calibration import reliability_diagram, sharpness_histogram
from forkrl.io import pyplot, save_figure, write_once
from forkrl.tasks.forecast import ForecastRow, check_outcomes, generate_rows, write_rows_jsonl
from forkrl.toy.forecast_build import SHIPPED_FORECAST_MODEL, ForecastBuild, SampledForecasts, sample_forecasts
from forkrl.toy.task import DemoReport, DemoRun, build_settings

__all__ = [
    "FORECAST_RECIPE",
    "SHIPPED_FORECAST_MODEL",
    "ForecastTask",
    "forecast_config_dict",
    "forecast_sweep_setup",
]

FORECAST_RECIPE = Path(__file__).parent / "toy_forecast.yaml"
"""The recipe, shipped in the package."""
NUM_TRAIN_ROWS = 4096
"""Training games drawn per seed (the sampler cycles through them)."""
NUM_EVAL_ROWS = 2048
"""Held-out test-split games (`--eval-problems` default)."""
BINS = 10
"""Equal-width bins of the reported ECE and reliability diagrams (those of the reward)."""


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
    eval_seed = int(build_settings(SHIPPED_FORECAST_MODEL).get("eval_seed", 1234))
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


@dataclass
class ForecastDemoData:
    """The demo's games: training (drawn with the demo's seed) and held-out (the build's evaluation games)."""

    train: list[ForecastRow]
    test: list[ForecastRow]


class ForecastTask(ForecastBuild):
    """The forecast toy: the build's hooks (`ForecastBuild`) and the demo's."""

    demo_steps = 100
    demo_out = "runs/demo_forecast"
    demo_eval = NUM_EVAL_ROWS

    def demo_data(self, seed: int, base: Path, num_eval: int) -> ForecastDemoData:
        test = generate_rows(num_eval, int(build_settings(base).get("eval_seed", 1234)), "test")
        return ForecastDemoData(generate_rows(NUM_TRAIN_ROWS, seed), test)

    def demo_recipe(self, seed: int, output_dir: Path, train_file: Path, base: Path) -> dict[str, Any]:
        return forecast_config_dict(seed, output_dir, train_file, base=base)

    def write_demo_data(self, data_dir: Path, data: ForecastDemoData, cfg) -> None:
        train_file = write_rows_jsonl(data_dir / "train.jsonl", data.train)
        write_rows_jsonl(data_dir / "test.jsonl", data.test)
        check_outcomes(str(train_file), cfg.data.answer_key)  # every row's outcome, before any training

    def measure(self, model, tokenizer, data: ForecastDemoData, cfg, seed: int, out: Path, when: str):
        # The measurements sample as the training does (its response length limit).
        sampled = sample_forecasts(model, tokenizer, data.test, cfg.rollout.max_new_tokens, seed=seed)
        sampled.write_jsonl(out / f"forecasts_{when}.jsonl", [r.matchup.question for r in data.test])
        return sampled

    def measurement_line(self, measured: SampledForecasts) -> str:
        b = measured.summary(BINS)
        return f"Brier {b['brier']:.4f}, ECE vs truth {b['ece_true']:.3f}"

    def report(self, run: DemoRun, before: SampledForecasts, after: SampledForecasts) -> DemoReport:
        b, a = before.summary(BINS), after.summary(BINS)
        test_q = np.asarray(before.true_p)
        limits = {
            "bayes_brier": float(np.mean(test_q * (1 - test_q))),
            "bayes_log_loss": float(-np.mean(test_q * np.log(test_q) + (1 - test_q) * np.log(1 - test_q))),
        }
        out = run.out
        plots = [
            reliability_diagram(
                out / "reliability.png", {"base model": before.valid, f"after {run.steps} RL steps": after.valid}, BINS
            ).name,
            sharpness_histogram(
                out / "sharpness.png", {"base model": before.valid[0], "after RL": after.valid[0]}
            ).name,
            _reward_plot(out / "reward.png", out / "run"),
        ]
        table = _table(b, a, limits)
        summary = {
            "task": "forecast",
            "reward": run.cfg.reward.function,
            "strategy": run.cfg.selection.strategy,
            "ratio": run.cfg.selection.ratio,
            "seed": run.seed,
            "steps": run.steps,
            "seconds": run.seconds(),
            "eval_rows": run.num_eval,
            "bins": BINS,
            "limits": limits,
            "before": {k: v for k, v in b.items() if k not in ("table", "table_true")},
            "after": {k: v for k, v in a.items() if k not in ("table", "table_true")},
            **run.environment(with_fast_paths=False),
        }
        return DemoReport(summary, _report_md(summary, table, plots), table)


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
