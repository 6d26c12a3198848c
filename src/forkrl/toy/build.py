"""`forkrl toy build`: the tiny Countdown base model, trained from scratch on noisy-solver traces.

The Countdown toy's part of the build (`forkrl.toy.task.build_base_model` runs it):

1. draw `num_traces` train-split Countdown problems and one noisy-solver trace for each
   (`forkrl.tasks.countdown`), tokenized with the toy tokenizer (one token per keyword/number);
2. (the skeleton: a randomly initialised Qwen3-shaped model, supervised training on the traces);
3. measure it: Acc@k at T = 1 on held-out test-split problems, and the model's teacher-forced
   entropy on held-out solver traces at the solver's choice tokens versus the determined ones.

Problems and traces come from seeded `random.Random` streams, so the same seed gives the same data.
The demo's half of the toy is `forkrl.toy.demo`.
"""

from __future__ import annotations

import logging
import math
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerFast

from forkrl.models.tiny import build_tiny_tokenizer
from forkrl.rollout.base import SamplingParams
from forkrl.rollout.entropy_temperature import entropy_of_logits
from forkrl.rollout.hf import HFGenerationBackend
from forkrl.tasks.countdown import (
    CountdownProblem,
    SolverSettings,
    countdown_vocab,
    generate_problems,
    noisy_solver_trace,
    problems_to_examples,
    score_countdown,
    trace_stats,
    trace_token_choice_mask,
)
from forkrl.toy.supervised import ToyBuildSettings, ToyTraceData, TraceSequence, collate_sequences
from forkrl.toy.task import TOY_CHAT_TEMPLATE, ToyTask, build_base_model, build_command

__all__ = ["CountdownBuild", "ToyBuildConfig", "build_toy_model", "build_toy_tokenizer", "toy_build_command"]

logger = logging.getLogger(__name__)

SHIPPED_MODEL = Path(__file__).parent / "base_model"
"""The toy base model shipped inside the package (built by `forkrl toy build --seed 0`)."""


@dataclass
class CountdownTraceData(ToyTraceData):
    """The Countdown problems and the noisy solver that writes the traces."""

    num_numbers: int = 3
    """Numbers per problem."""
    max_number: int = 15
    """Given numbers are drawn from 1..max_number."""
    max_target: int = 100
    """Targets are drawn from the reachable values in 1..max_target."""
    max_value: int = 200
    """Largest intermediate result; also the largest single number token of the vocabulary."""
    solver_max_leaves: int = 5
    """Noisy solver: complete attempts before it gives up with a wrong answer."""
    solver_p_good: float = 0.3
    """Noisy solver: probability of picking among the moves that keep the problem solvable."""
    solver_p_stay: float = 0.5
    """Noisy solver: probability of another move from the same numbers after a failure (else ``back``)."""


@dataclass
class ToyBuildConfig(ToyBuildSettings, CountdownTraceData):
    """Settings of `build_toy_model`; every field is recorded in `toy_build.json`.

    At the default sizes a step takes about 0.7 s on 2 CPU cores with bf16, so the 1600 steps
    take ~19 min and the whole build ~22 min.
    """

    # --- evaluation
    eval_problems: int = 256
    """Held-out (test-split) problems for Acc@k; 0 skips the evaluation."""
    eval_k: int = 8
    """Samples per held-out problem (Acc@k at T = 1)."""
    eval_seed: int = 1234
    """Seed of the held-out problem list: fixed, so builds with different seeds are compared on the same problems."""
    eval_max_new_tokens: int = 256
    """Response length limit when sampling; a response cut there scores 0."""
    eval_batch_size: int = 256
    entropy_traces: int = 256
    """Held-out solver traces scored teacher-forced for the choice/determined entropy split (0: skip)."""

    def solver(self) -> SolverSettings:
        return SolverSettings(
            max_leaves=self.solver_max_leaves,
            p_good=self.solver_p_good,
            p_stay=self.solver_p_stay,
            max_value=self.max_value,
        )


def build_toy_tokenizer(max_value: int = 200) -> PreTrainedTokenizerFast:
    """The toy tokenizer: specials, Countdown keywords and symbols, one token per integer 0..max_value."""
    return build_tiny_tokenizer(countdown_vocab(max_value), chat_template=TOY_CHAT_TEMPLATE, model_max_length=512)


def _encode(tokenizer, problems, traces) -> list[TraceSequence]:
    examples = problems_to_examples(problems)
    out = []
    for ex, trace in zip(examples, traces):
        prompt = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
        response, choice = trace_token_choice_mask(trace, tokenizer)
        out.append(TraceSequence(prompt + response + [tokenizer.eos_token_id], len(prompt), choice + [False]))
    return out


def _make_traces(config: ToyBuildConfig, n: int, split: str, seed: int):
    problems = generate_problems(
        n,
        seed,
        split,
        num_numbers=config.num_numbers,
        max_number=config.max_number,
        max_target=config.max_target,
        max_value=config.max_value,
        unique=split == "test",
    )
    rng = random.Random(f"toy-traces:{seed}:{split}")
    return problems, [noisy_solver_trace(p, rng, config.solver()) for p in problems]


@torch.no_grad()
def _sampled_accuracy(model, tokenizer, problems: list[CountdownProblem], config: ToyBuildConfig) -> dict[str, Any]:
    """Acc@k at T = 1 (percent of correct samples), pass@k, mean length and truncation share."""
    examples = problems_to_examples(problems)
    owners = [ex for ex in examples for _ in range(config.eval_k)]  # question-major, k consecutive
    backend = HFGenerationBackend(model, tokenizer, batch_size=config.eval_batch_size)
    params = SamplingParams(max_new_tokens=config.eval_max_new_tokens, temperature=1.0, seed=config.seed)
    rollout = backend.generate([ex.prompt for ex in owners], params)
    lengths = rollout.response_lengths.tolist()
    ids = rollout.response_ids.tolist()
    texts = tokenizer.batch_decode([row[:n] for row, n in zip(ids, lengths)], skip_special_tokens=True)
    scores = [score_countdown(t, ex) for t, ex in zip(texts, owners)]
    k = config.eval_k
    per_problem = [scores[i * k : (i + 1) * k] for i in range(len(problems))]
    entropy = rollout.sampler_entropy[rollout.response_mask.bool()]
    return {
        "acc_at_k": 100.0 * sum(scores) / len(scores),
        "pass_at_k": 100.0 * sum(max(s) for s in per_problem) / len(per_problem),
        "k": k,
        "num_problems": len(problems),
        "mean_length": sum(lengths) / len(lengths),
        "truncated_fraction": 1.0 - rollout.finished.float().mean().item(),
        "mean_sampled_entropy": entropy.mean().item(),
        "sample": texts[0],
    }


@torch.no_grad()
def _choice_entropy(model, seqs: list[TraceSequence], pad_id: int, batch_size: int = 128) -> dict[str, float]:
    """Teacher-forced entropy of the model on held-out solver traces, split by the solver's labels.

    `top20_choice_share` is the share of the top-20% highest-entropy response tokens that are choice
    tokens: 1.0 would mean the model's forks are exactly the solver's.
    """
    entropies, choices = [], []
    for start in range(0, len(seqs), batch_size):
        batch = seqs[start : start + batch_size]
        input_ids, attention_mask, _ = collate_sequences(batch, pad_id)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)
        ent = entropy_of_logits(logits[:, :-1])  # (B, T-1): entropy of the distribution over token t+1
        for row, s in enumerate(batch):
            n = len(s.ids)
            entropies.append(ent[row, s.prompt_len - 1 : n - 1])
            choices.append(torch.tensor(s.choice))
    H, C = torch.cat(entropies), torch.cat(choices)
    k = max(1, math.ceil(0.2 * H.numel()))
    top = torch.topk(H, k).indices
    return {
        "num_tokens": H.numel(),
        "choice_fraction": C.float().mean().item(),
        "mean_entropy_choice": H[C].mean().item(),
        "mean_entropy_determined": H[~C].mean().item(),
        "determined_below_0.01": (H[~C] < 0.01).float().mean().item(),
        "top20_choice_share": C[top].float().mean().item(),
    }


class CountdownBuild(ToyTask):
    """The Countdown toy's build hooks (its demo hooks: `forkrl.toy.demo.CountdownTask`)."""

    name = "countdown"
    config_class = ToyBuildConfig
    shipped_model = SHIPPED_MODEL
    missing_label = "toy base model"
    records_task_name = False  # the shipped model's toy_build.json has no "task": builds stay comparable

    def tokenizer(self, config: ToyBuildConfig) -> PreTrainedTokenizerFast:
        return build_toy_tokenizer(config.max_value)

    def training_traces(self, config: ToyBuildConfig, tokenizer) -> tuple[list[TraceSequence], dict[str, Any]]:
        problems, traces = _make_traces(config, config.num_traces, "train", config.seed)
        seqs = _encode(tokenizer, problems, traces)
        stats = trace_stats(traces, tokenizer)
        logger.info(
            "toy build: %d traces, solver success %.3f, %.1f tokens/trace, choice tokens %.3f",
            stats.num_traces, stats.success_rate, stats.mean_tokens, stats.choice_fraction,
        )  # fmt: skip
        return seqs, {"traces": asdict(stats)}

    def evaluate(self, model, tokenizer, config: ToyBuildConfig) -> dict[str, Any]:
        info: dict[str, Any] = {}
        if config.eval_problems > 0 or config.entropy_traces > 0:
            n = max(config.eval_problems, config.entropy_traces)
            test_problems, test_traces = _make_traces(config, n, "test", config.eval_seed)
            if config.eval_problems > 0:
                info["eval"] = _sampled_accuracy(model, tokenizer, test_problems[: config.eval_problems], config)
                logger.info("toy build: Acc@%d %.2f%% on %d held-out problems",
                            config.eval_k, info["eval"]["acc_at_k"], config.eval_problems)  # fmt: skip
            if config.entropy_traces > 0:
                held_out = _encode(tokenizer, test_problems, test_traces)[: config.entropy_traces]
                info["entropy"] = _choice_entropy(model, held_out, tokenizer.pad_token_id)
        return info

    def headline(self, info: dict[str, Any]) -> str:
        if "eval" not in info:
            return ""
        ev = info["eval"]
        return f", Acc@{ev['k']} {ev['acc_at_k']:.1f}% on {ev['num_problems']} held-out problems"


def build_toy_model(
    out_dir: str | os.PathLike, config: ToyBuildConfig | None = None, overwrite: bool = False, **overrides: Any
) -> Path:
    """Train the toy base model and write it to `out_dir` (`forkrl.toy.task.build_base_model`); returns the path.

    Settings come from `config` with keyword `overrides` applied (e.g. ``seed=1, steps=20``); an
    existing `out_dir` raises FileExistsError unless `overwrite`.
    """
    return build_base_model(CountdownBuild(), out_dir, config, overwrite, **overrides)


def toy_build_command(seed: int, out: str | os.PathLike, overwrite: bool = False, **overrides: Any) -> Path:
    """What ``forkrl toy build --seed S --out DIR`` runs: build, then print the headline numbers."""
    return build_command(CountdownBuild(), seed, out, overwrite, **overrides)
