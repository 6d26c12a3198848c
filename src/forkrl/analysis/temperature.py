"""Separate decoding temperatures for forking and other tokens (paper 1, Eq. 5 and Fig. 3).

Each token is sampled at T_high where the model's raw (T = 1) entropy H_t exceeds h and at
T_low elsewhere. Two sweeps, accuracy per setting: T_high over a list with T_low = 1, and T_low
over a list with T_high = 1. The paper (Qwen3-8B, AIME'24/'25, h = 0.672, the 80th percentile
of its token entropies): lowering T_high hurts far more than lowering T_low, and raising T_high
helps while raising T_low breaks the output — forking tokens want *more* randomness.

h defaults to the 80th percentile measured by `analyze entropy` on the same model (its
`entropy.json`), else to one measured here on a small calibration generation at T = 1 (the
temperature at which `EntropyAwareTemperature` measures H_t). Accuracy is Acc@k from
`forkrl.eval.accuracy.evaluate_model`, whose backend is wrapped so that every generation call
samples with Eq. 5. The setting (T_low, T_high) = (1, 1) belongs to both sweeps and is run once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from forkrl.analysis.entropy import entropy_percentiles
from forkrl.eval.accuracy import EvalReport, evaluate_model
from forkrl.io import atomic_write_json, pyplot, save_figure
from forkrl.rollout.base import GenerationBackend, Prompts, Rollout, SamplingParams
from forkrl.rollout.hf import HFGenerationBackend
from forkrl.tasks.data import load_prompts

__all__ = [
    "DEFAULT_TEMPERATURES",
    "EntropyTemperatureBackend",
    "measure_threshold",
    "run_temperature",
    "sweep_temperatures",
    "threshold_from_entropy_json",
]

logger = logging.getLogger(__name__)

DEFAULT_TEMPERATURES: tuple[float, ...] = (0.6, 0.8, 1.0, 1.2, 1.4)


class EntropyTemperatureBackend:
    """A `GenerationBackend` that samples every call with Eq. 5: `(t_low, t_high, threshold)`
    replaces whatever temperature the caller asked for (`evaluate_model` only knows one T)."""

    def __init__(self, inner: GenerationBackend, t_low: float, t_high: float, threshold: float):
        self.inner = inner
        self.setting = (float(t_low), float(t_high), float(threshold))

    def generate(self, prompts: Prompts, params: SamplingParams) -> Rollout:
        return self.inner.generate(prompts, dataclasses.replace(params, entropy_temperature=self.setting))

    def update_weights(self, model: torch.nn.Module) -> None:
        self.inner.update_weights(model)


def threshold_from_entropy_json(path: str | os.PathLike) -> tuple[float, dict[str, Any]]:
    """h = the `p80` of an `entropy.json` written by `analyze entropy`, and that file's contents.

    Warns when its entropies were not measured at T = 1: Eq. 5 compares h with raw entropies.
    """
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if "p80" not in data:
        raise ValueError(f"{path}: no 'p80' (expected an entropy.json written by `analyze entropy`)")
    temperature = data.get("temperature")
    if temperature is not None and float(temperature) != 1.0:
        logger.warning(
            "%s: entropies were measured at T = %g; Eq. 5 compares h with the T = 1 entropy", path, temperature
        )
    return float(data["p80"]), data


def measure_threshold(
    backend: GenerationBackend,
    prompts: Sequence[str],
    k: int = 4,
    max_new_tokens: int = 512,
    percentile: float = 80.0,
    seed: int = 0,
) -> tuple[float, int]:
    """The `percentile`-th percentile of token entropies of `k` responses per prompt sampled at
    T = 1 (inverted CDF, as `analyze entropy`); returns `(h, number of tokens)`."""
    owners = [p for p in prompts for _ in range(k)]
    rollout = backend.generate(owners, SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, seed=seed))
    entropy = rollout.sampler_entropy[rollout.response_mask.bool()].float().cpu().numpy()
    return entropy_percentiles(entropy, [percentile])[f"p{percentile:g}"], int(entropy.size)


def _setting_result(report: EvalReport, t_low: float, t_high: float) -> dict[str, Any]:
    """Accuracy of one setting: the mean over files (the paper averages AIME'24 and '25)."""
    results = report.results
    average = report.average()
    return {
        "t_low": t_low,
        "t_high": t_high,
        "acc": average["acc_at_k"] if average else results[0].acc_at_k,
        "std_err": average["std_err"] if average else results[0].std_err,
        "len": average["len_at_k"] if average else results[0].len_at_k,
        "per_file": {r.name: {"acc": r.acc_at_k, "std_err": r.std_err, "len": r.len_at_k} for r in results},
    }


def sweep_temperatures(
    backend: GenerationBackend,
    tokenizer,
    files: Sequence[str],
    threshold: float,
    t_high_values: Sequence[float] = DEFAULT_TEMPERATURES,
    t_low_values: Sequence[float] = DEFAULT_TEMPERATURES,
    **eval_kwargs: Any,
) -> dict[str, list[dict[str, Any]]]:
    """Acc@k for every (T_low = 1, T_high) and (T_low, T_high = 1). `eval_kwargs` go to
    `evaluate_model` (k, max_new_tokens, reward_fn, seed, limit, ...). Each distinct setting is
    evaluated once with the same seed, so the sweeps differ only in the temperatures."""
    cache: dict[tuple[float, float], dict[str, Any]] = {}

    def run(t_low: float, t_high: float) -> dict[str, Any]:
        key = (float(t_low), float(t_high))
        if key not in cache:
            wrapped = EntropyTemperatureBackend(backend, t_low, t_high, threshold)
            report = evaluate_model(None, tokenizer, list(files), backend=wrapped, **eval_kwargs)
            cache[key] = _setting_result(report, *key)
            logger.info("T_low %g, T_high %g: Acc %.2f", t_low, t_high, cache[key]["acc"])
        return cache[key]

    return {
        "t_high_sweep": [run(1.0, t) for t in t_high_values],
        "t_low_sweep": [run(t, 1.0) for t in t_low_values],
    }


def _plot(sweeps: dict[str, list[dict[str, Any]]], k: int, threshold: float, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    panels = (
        ("t_high_sweep", "t_high", "#c44e52", r"$T_{high}$ (forking tokens), $T_{low}$ = 1"),
        ("t_low_sweep", "t_low", "#4c72b0", r"$T_{low}$ (other tokens), $T_{high}$ = 1"),
    )
    for ax, (key, x_key, colour, label) in zip(axes, panels):
        rows = sorted(sweeps[key], key=lambda r: r[x_key])
        x = [r[x_key] for r in rows]
        y = [r["acc"] for r in rows]
        err = [r["std_err"] or 0.0 for r in rows]
        ax.errorbar(x, y, yerr=err, color=colour, marker="o", capsize=3)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"Acc@{k} (%)")
    fig.suptitle(f"Entropy-aware decoding (Eq. 5), h = {threshold:.3g}")
    save_figure(fig, path)


def run_temperature(
    model: str,
    data: str | Sequence[str],
    out_dir: str | os.PathLike,
    t_high_values: Sequence[float] = DEFAULT_TEMPERATURES,
    t_low_values: Sequence[float] = DEFAULT_TEMPERATURES,
    threshold: float | None = None,
    entropy_json: str | None = None,
    k: int = 16,
    max_new_tokens: int = 2048,
    batch_size: int = 32,
    seed: int = 0,
    reward: Any = "math",
    question_key: str = "question",
    answer_key: str = "answer",
    template: str = "paper",
    split: str = "test",
    limit: int | None = None,
    calibration_questions: int = 16,
    calibration_k: int = 4,
    dtype: str = "auto",
    device: str | None = None,
) -> dict[str, Any]:
    """Paper 1 Fig. 3 for `model` on benchmark `data`; writes `temperature.json` and `temperature.png`.

    Args:
        t_high_values: T_high values swept with T_low = 1.
        t_low_values: T_low values swept with T_high = 1.
        threshold: h; default the `p80` of `entropy_json`, else measured here from
            `calibration_k` responses to each of the first `calibration_questions` questions of
            the first file, sampled at T = 1 with `max_new_tokens`.
        k, max_new_tokens, batch_size, seed, reward, question_key, answer_key, template, split,
            limit: as for `forkrl eval` (paper: k = 16, 28672 tokens).

    Returns `temperature.json`'s contents.
    """
    from forkrl.models.loading import load_policy

    files = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    policy, tokenizer = load_policy(model, dtype=dtype, device=device)
    backend = HFGenerationBackend(policy, tokenizer, batch_size=batch_size)

    calibration: dict[str, Any] = {}
    if threshold is not None:
        source = "given"
    elif entropy_json is not None:
        threshold, entropy_data = threshold_from_entropy_json(entropy_json)
        source = "entropy.json"
        calibration = {"path": str(entropy_json), "num_tokens": entropy_data.get("num_tokens")}
    else:
        questions = load_prompts(
            files[0],
            question_key,
            answer_key,
            split=split,
            limit=calibration_questions,
            template=template,
            tokenizer=tokenizer,
        )
        threshold, num_tokens = measure_threshold(
            backend, [q.prompt for q in questions], calibration_k, max_new_tokens, seed=seed
        )
        source = "measured"
        calibration = {"questions": len(questions), "k": calibration_k, "num_tokens": num_tokens}
    logger.info("forking-token threshold h = %.4g (%s)", threshold, source)

    sweeps = sweep_temperatures(
        backend,
        tokenizer,
        files,
        threshold,
        t_high_values,
        t_low_values,
        k=k,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        seed=seed,
        reward_fn=reward,
        question_key=question_key,
        answer_key=answer_key,
        template=template,
        split=split,
        limit=limit,
    )
    result = {
        "model": model,
        "files": [os.fspath(f) for f in files],
        "threshold": float(threshold),
        "threshold_source": source,
        "calibration": calibration,
        "k": k,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "limit": limit,
        **sweeps,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "temperature.json", result)
    _plot(sweeps, k, float(threshold), out / "temperature.png")
    return result
