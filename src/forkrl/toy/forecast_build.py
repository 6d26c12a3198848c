"""`forkrl toy build --task forecast`: a tiny, over-confident forecaster trained from scratch.

The forecast toy's part of the build (`forkrl.toy.task.build_base_model` runs it, as for Countdown):

1. draw `num_traces` train-split games (`forkrl.tasks.forecast.matchups`) and one deliberately
   over-confident trace for each (``p = σ(confidence · true log-odds + noise)``);
2. (the skeleton: a randomly initialised Qwen3-shaped model of the Countdown toy's sizes,
   supervised training on the traces);
3. measure it: sample one forecast per held-out test-split game at T = 1 and report its
   calibration (`forkrl.analysis.calibration`) against the outcomes and the true probabilities.

Same seed and thread count, same weights. The demo's half of the toy is `forkrl.toy.forecast_demo`.
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerFast

from forkrl.analysis.calibration import calibration_summary
from forkrl.models.tiny import build_tiny_tokenizer
from forkrl.rollout.base import SamplingParams
from forkrl.rollout.hf import HFGenerationBackend
from forkrl.tasks.forecast import (
    ForecastRow,
    TraceSettings,
    forecast_trace,
    forecast_vocab,
    generate_rows,
    parse_forecast,
    rows_to_examples,
    trace_is_correct,
)
from forkrl.toy.supervised import ToyBuildSettings, ToyTraceData, TraceSequence
from forkrl.toy.task import TOY_CHAT_TEMPLATE, ToyTask, build_base_model, build_command

__all__ = [
    "ForecastBuild",
    "ForecastBuildConfig",
    "SampledForecasts",
    "build_forecast_model",
    "build_forecast_tokenizer",
    "forecast_build_command",
    "sample_forecasts",
]

logger = logging.getLogger(__name__)


SHIPPED_FORECAST_MODEL = Path(__file__).parent / "forecast_model"
"""The over-confident toy forecaster shipped inside the package (`forkrl toy build --task forecast --seed 0`)."""


@dataclass
class ForecastTraceData(ToyTraceData):
    """How over-confident the training traces are."""

    confidence: float = 2.0
    """Over-confidence of the traces: their log-odds are this multiple of the true log-odds."""
    noise: float = 0.5
    """Standard deviation of the traces' log-odds noise (the spread of the base model's forecasts)."""


@dataclass
class ForecastBuildConfig(ToyBuildSettings, ForecastTraceData):
    """Settings of `build_forecast_model`; every field is recorded in ``toy_build.json``.

    The model has the Countdown toy's sizes (about 1.0 M parameters) with a shorter context.
    """

    max_position_embeddings: int = 128
    steps: int = 2000
    """Optimizer steps of `batch_size` traces: the trace's arithmetic needs them (96% of held-out
    traces right after 2000)."""
    warmup_steps: int = 50
    threads: int = 1
    """torch CPU threads during the build (restored afterwards). One: the matrices are too small for a
    second thread to pay, and the shipped model was built so (float sums depend on the thread count)."""
    log_every: int = 200
    # --- evaluation
    eval_rows: int = 2048
    """Held-out (test-split) games, one sampled forecast each; 0 skips the evaluation."""
    eval_seed: int = 1234
    """Seed of the held-out games: fixed, so builds and the demo are compared on the same games."""
    eval_max_new_tokens: int = 24
    """Response length limit (a trace is at most 16 tokens and EOS)."""
    eval_batch_size: int = 1024

    def traces(self) -> TraceSettings:
        return TraceSettings(confidence=self.confidence, noise=self.noise)


def build_forecast_tokenizer() -> PreTrainedTokenizerFast:
    """Specials, the task's keywords and symbols, one token per integer 0..100 and per probability 0.00..1.00."""
    return build_tiny_tokenizer(forecast_vocab(), chat_template=TOY_CHAT_TEMPLATE, model_max_length=128)


def _encode(tokenizer, rows: list[ForecastRow], rng: random.Random, settings: TraceSettings) -> list[TraceSequence]:
    """prompt + trace + EOS per game; `choice` marks the forecast token (the one the trace draws)."""
    out = []
    for ex, row in zip(rows_to_examples(rows), rows):
        text, _ = forecast_trace(row.matchup, rng, settings)
        prompt = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
        response = tokenizer(text, add_special_tokens=False)["input_ids"]
        choice = [False] * (len(response) - 1) + [True, False]  # the last trace token is the forecast
        out.append(TraceSequence(prompt + response + [tokenizer.eos_token_id], len(prompt), choice))
    return out


@dataclass
class SampledForecasts:
    """One sampled response per game, its parsed forecast, and the game's outcome and true probability."""

    texts: list[str]
    forecasts: list[float | None]
    """None: no valid forecast in the response."""
    outcomes: list[int]
    true_p: list[float]
    mean_entropy: float
    """Mean sampling entropy over all response tokens."""
    reasoning_correct: float
    """Share of responses whose trace states the match-up's true difference, home advantage and edge."""

    @property
    def valid(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(p, y, q) of the responses with a valid forecast."""
        keep = [i for i, p in enumerate(self.forecasts) if p is not None]
        return tuple(
            np.asarray([seq[i] for i in keep], dtype=float) for seq in (self.forecasts, self.outcomes, self.true_p)
        )

    def summary(self, bins: int = 10) -> dict[str, Any]:
        """`calibration_summary` of the valid forecasts, plus the invalid share and the mean entropy."""
        p, y, q = self.valid
        out = calibration_summary(p, y, q, bins) if len(p) else {"n": 0}
        out["invalid_fraction"] = 1.0 - len(p) / len(self.forecasts)
        out["mean_entropy"] = self.mean_entropy
        out["reasoning_correct"] = self.reasoning_correct
        return out

    def write_jsonl(self, path: str | os.PathLike, questions: list[str]) -> Path:
        """The `forkrl analyze calibration` schema: question, completion, p (absent if invalid), outcome, true_p."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            for row in zip(questions, self.texts, self.forecasts, self.outcomes, self.true_p):
                keys = ("question", "completion", "p", "outcome", "true_p")
                record = dict(zip(keys, row))
                if record["p"] is None:
                    del record["p"]  # the analysis then parses the completion (and counts it invalid)
                f.write(json.dumps(record) + "\n")
        return path


@torch.no_grad()
def sample_forecasts(
    model, tokenizer, rows: list[ForecastRow], max_new_tokens: int, seed: int, batch_size: int = 1024
) -> SampledForecasts:
    """Sample one response per game at T = 1 (per-row seeds: the same rows and seed give the same samples)."""
    examples = rows_to_examples(rows)
    backend = HFGenerationBackend(model, tokenizer, batch_size=batch_size)
    seeds = [seed * 1_000_003 + i for i in range(len(rows))]
    rollout = backend.generate([ex.prompt for ex in examples], SamplingParams(max_new_tokens, row_seeds=seeds))
    texts = tokenizer.batch_decode(rollout.response_ids, skip_special_tokens=True)
    entropy = rollout.sampler_entropy[rollout.response_mask.bool()]
    return SampledForecasts(
        texts=texts,
        forecasts=[parse_forecast(t).p for t in texts],
        outcomes=[r.outcome for r in rows],
        true_p=[r.matchup.true_probability for r in rows],
        mean_entropy=float(entropy.float().mean()),
        reasoning_correct=sum(trace_is_correct(t, r.matchup) for t, r in zip(texts, rows)) / len(rows),
    )


class ForecastBuild(ToyTask):
    """The forecast toy's build hooks (its demo hooks: `forkrl.toy.forecast_demo.ForecastTask`)."""

    name = "forecast"
    config_class = ForecastBuildConfig
    shipped_model = SHIPPED_FORECAST_MODEL
    label = "toy forecast model"
    missing_label = "toy forecast model"

    def tokenizer(self, config: ForecastBuildConfig) -> PreTrainedTokenizerFast:
        return build_forecast_tokenizer()

    def training_traces(self, config: ForecastBuildConfig, tokenizer) -> tuple[list[TraceSequence], dict[str, Any]]:
        rows = generate_rows(config.num_traces, config.seed, "train")
        return _encode(tokenizer, rows, random.Random(f"forecast-traces:{config.seed}"), config.traces()), {}

    def evaluate(self, model, tokenizer, config: ForecastBuildConfig) -> dict[str, Any]:
        if config.eval_rows <= 0:
            return {}
        test = generate_rows(config.eval_rows, config.eval_seed, "test")
        sampled = sample_forecasts(
            model, tokenizer, test, config.eval_max_new_tokens, config.seed, config.eval_batch_size
        )
        ev = {k: v for k, v in sampled.summary().items() if k not in ("table", "table_true")}
        ev["sample"] = sampled.texts[0]
        logger.info("toy forecast build: held-out Brier %.4f, ECE vs truth %.3f", ev["brier"], ev["ece_true"])
        return {"eval": ev}

    def headline(self, info: dict[str, Any]) -> str:
        if "eval" not in info:
            return ""
        ev = info["eval"]
        return (
            f"; held-out Brier {ev['brier']:.4f} (Bayes {ev['bayes_brier']:.4f}), ECE {ev['ece']:.3f}, "
            f"ECE vs truth {ev['ece_true']:.3f}, invalid {100 * ev['invalid_fraction']:.1f}%"
        )


def build_forecast_model(
    out_dir: str | os.PathLike, config: ForecastBuildConfig | None = None, overwrite: bool = False, **overrides: Any
) -> Path:
    """Train the over-confident toy forecaster and write it to `out_dir` (`forkrl.toy.task.build_base_model`).

    An existing `out_dir` raises FileExistsError unless `overwrite`.
    """
    return build_base_model(ForecastBuild(), out_dir, config, overwrite, **overrides)


def forecast_build_command(seed: int, out: str | os.PathLike, overwrite: bool = False, **overrides: Any) -> Path:
    """What ``forkrl toy build --task forecast`` runs: build, then print the headline numbers."""
    return build_command(ForecastBuild(), seed, out, overwrite, **overrides)
