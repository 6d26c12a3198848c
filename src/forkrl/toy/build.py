"""`forkrl toy build`: the tiny Countdown base model, trained from scratch on noisy-solver traces.

Recipe, top to bottom in `build_toy_model`:

1. draw `num_traces` train-split Countdown problems and one noisy-solver trace for each
   (`forkrl.tasks.countdown`), tokenized with the toy tokenizer (one token per keyword/number);
2. build a randomly initialised Qwen3-shaped model (`forkrl.models.tiny.build_tiny_model`);
3. supervised next-token training on prompt + trace + EOS, loss on the trace tokens only
   (AdamW, linear warm-up then cosine decay, length-bucketed batches);
4. measure it: Acc@k at T = 1 on held-out test-split problems, and the model's teacher-forced
   entropy on held-out solver traces at the solver's choice tokens versus the determined ones;
5. write an ordinary Hugging Face model directory (config.json, model.safetensors,
   tokenizer.json, ...) plus `toy_build.json` with the settings and measurements, atomically.

Everything depends only on the seed and the settings: problems and traces come from seeded
`random.Random` streams, the initial weights from `build_tiny_model(seed=...)`, the batch order
from a seeded `torch.Generator`, so a rebuild with the same seed and thread count gives the same
weights (CPU float arithmetic can differ with the number of threads).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from forkrl.io import atomic_dir
from forkrl.models.tiny import build_tiny_model, build_tiny_tokenizer
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

__all__ = ["TOY_CHAT_TEMPLATE", "ToyBuildConfig", "build_toy_model", "build_toy_tokenizer", "toy_build_command"]

logger = logging.getLogger(__name__)

TOY_CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}\n{% endfor %}"
"""Renders a user message exactly as the ``countdown`` prompt template does (question + newline),
so ``template="chat"`` and ``template="countdown"`` give the model the same prompt."""

BUILD_INFO_FILE = "toy_build.json"


@dataclass
class ToyBuildConfig:
    """Settings of `build_toy_model`; every field is recorded in `toy_build.json`."""

    seed: int = 0
    """Seeds the problems, the traces, the initial weights, the batch order and the evaluation sampling."""
    # --- data
    num_traces: int = 60_000
    """Training traces, one per problem drawn i.i.d. from the train split (problems may repeat)."""
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
    # --- model (Qwen3-shaped)
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 512
    """With the sizes above: about 1.0 M parameters (0.03 M of them the tied embedding)."""
    max_position_embeddings: int = 512
    # --- optimisation
    steps: int = 1600
    """Optimizer steps (batches of `batch_size` traces; the data is cycled in seeded epochs). About
    0.7 s each at the default sizes on 2 CPU cores with bf16, so ~19 min; the whole build ~22 min."""
    batch_size: int = 128
    lr: float = 4e-3
    """Peak learning rate, reached after `warmup_steps`, then cosine decay to `min_lr_ratio` of it."""
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    bf16: bool = True
    """Run the training forward pass under bfloat16 autocast (weights and optimizer stay float32):
    about 2x faster on CPUs with bf16 instructions (AVX512-BF16/AMX); slower on CPUs without them."""
    threads: int = 2
    """torch CPU threads during the build (restored afterwards)."""
    log_every: int = 100
    """Log the mean training loss every this many steps (0: never)."""
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


# ---------------------------------------------------------------------------- data


@dataclass
class _Sequence:
    ids: list[int]
    """prompt + response + EOS token ids."""
    prompt_len: int
    choice: list[bool]
    """Per response token (EOS included, which is never a choice)."""


def _encode(tokenizer, problems, traces) -> list[_Sequence]:
    examples = problems_to_examples(problems)
    out = []
    for ex, trace in zip(examples, traces):
        prompt = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
        response, choice = trace_token_choice_mask(trace, tokenizer)
        out.append(_Sequence(prompt + response + [tokenizer.eos_token_id], len(prompt), choice + [False]))
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


def _collate(seqs: list[_Sequence], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` and `labels` (-100 on prompt and padding), each (B, T)."""
    T = max(len(s.ids) for s in seqs)
    input_ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), T), dtype=torch.long)
    labels = torch.full((len(seqs), T), -100, dtype=torch.long)
    for row, s in enumerate(seqs):
        n = len(s.ids)
        input_ids[row, :n] = torch.tensor(s.ids)
        attention_mask[row, :n] = 1
        labels[row, s.prompt_len : n] = input_ids[row, s.prompt_len : n]
    return input_ids, attention_mask, labels


def _batches(seqs: list[_Sequence], batch_size: int, generator: torch.Generator):
    """Endless length-bucketed batches: each epoch a seeded permutation, cut into groups of 32
    batches, each group sorted by length (less padding), batch order shuffled again."""
    n = len(seqs)
    while True:
        order = torch.randperm(n, generator=generator).tolist()
        batches = []
        group = 32 * batch_size
        for start in range(0, n, group):
            chunk = sorted(order[start : start + group], key=lambda i: len(seqs[i].ids))
            batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        for b in torch.randperm(len(batches), generator=generator).tolist():
            yield [seqs[i] for i in batches[b]]


def _lr_factor(step: int, config: ToyBuildConfig) -> float:
    """Linear warm-up to 1, then cosine decay to `min_lr_ratio` at the last step."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------- training


def _train(model: PreTrainedModel, seqs: list[_Sequence], pad_id: int, config: ToyBuildConfig) -> list[dict]:
    """Supervised next-token training; returns the logged loss curve."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]  # norms: no weight decay
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=(0.9, 0.98),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, config))
    batches = _batches(seqs, config.batch_size, torch.Generator().manual_seed(config.seed))
    model.train()
    curve, window, start = [], [], time.perf_counter()
    for step in range(config.steps):
        input_ids, attention_mask, labels = _collate(next(batches), pad_id)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)
        # Position t predicts token t + 1; mean over the response tokens of the batch.
        loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        window.append(loss.item())
        last = step + 1 == config.steps
        if (config.log_every and (step + 1) % config.log_every == 0) or last:
            point = {"step": step + 1, "loss": sum(window) / len(window), "seconds": time.perf_counter() - start}
            curve.append(point)
            window = []
            logger.info(
                "toy build: step %d/%d loss %.4f (%.0f s)", step + 1, config.steps, point["loss"], point["seconds"]
            )
    model.eval()
    return curve


# ---------------------------------------------------------------------------- measurement


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
def _choice_entropy(model, seqs: list[_Sequence], pad_id: int, batch_size: int = 128) -> dict[str, float]:
    """Teacher-forced entropy of the model on held-out solver traces, split by the solver's labels.

    `top20_choice_share` is the share of the top-20% highest-entropy response tokens that are choice
    tokens: 1.0 would mean the model's forks are exactly the solver's.
    """
    entropies, choices = [], []
    for start in range(0, len(seqs), batch_size):
        batch = seqs[start : start + batch_size]
        input_ids, attention_mask, _ = _collate(batch, pad_id)
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


# ---------------------------------------------------------------------------- entry points


def build_toy_model(
    out_dir: str | os.PathLike, config: ToyBuildConfig | None = None, overwrite: bool = False, **overrides: Any
) -> Path:
    """Train the toy base model and write it to `out_dir` (module docstring); returns the path.

    Settings come from `config` with keyword `overrides` applied (e.g. ``seed=1, steps=20``).
    The directory is assembled in a temporary sibling and renamed into place; an existing
    `out_dir` raises FileExistsError unless `overwrite`.
    """
    config = ToyBuildConfig(**{**asdict(config or ToyBuildConfig()), **overrides})
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (pass overwrite=True to replace it)")
    started = time.perf_counter()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        tokenizer = build_toy_tokenizer(config.max_value)
        problems, traces = _make_traces(config, config.num_traces, "train", config.seed)
        seqs = _encode(tokenizer, problems, traces)
        stats = trace_stats(traces, tokenizer)
        logger.info(
            "toy build: %d traces, solver success %.3f, %.1f tokens/trace, choice tokens %.3f",
            stats.num_traces, stats.success_rate, stats.mean_tokens, stats.choice_fraction,
        )  # fmt: skip
        model = build_tiny_model(
            tokenizer,
            hidden_size=config.hidden_size,
            num_layers=config.num_layers,
            num_heads=config.num_heads,
            num_kv_heads=config.num_kv_heads,
            intermediate_size=config.intermediate_size,
            max_position_embeddings=config.max_position_embeddings,
            seed=config.seed,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)  # nothing in training draws from it today; pinned for safety
            curve = _train(model, seqs, tokenizer.pad_token_id, config)
        train_seconds = curve[-1]["seconds"] if curve else 0.0

        info: dict[str, Any] = {
            "config": asdict(config),
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "traces": asdict(stats),
            "final_loss": curve[-1]["loss"] if curve else None,
            "loss_curve": curve,
            "train_seconds": train_seconds,
            "torch_version": torch.__version__,
        }
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
        info["total_seconds"] = time.perf_counter() - started
        write_model_dir(out, model, tokenizer, info)
    finally:
        torch.set_num_threads(previous_threads)
    return out


def write_model_dir(out: Path, model, tokenizer, info: dict) -> None:
    """The model directory, atomically: `save_pretrained` files plus `toy_build.json` (`info`)."""
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)  # safetensors
        tokenizer.save_pretrained(tmp)
        (tmp / BUILD_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")


def toy_build_command(seed: int, out: str | os.PathLike, overwrite: bool = False, **overrides: Any) -> Path:
    """What ``forkrl toy build --seed S --out DIR`` runs: build, then print the headline numbers."""
    path = build_toy_model(out, seed=seed, overwrite=overwrite, **overrides)
    info = json.loads((path / BUILD_INFO_FILE).read_text())
    line = f"toy model written to {path}: final loss {info['final_loss']:.4f}"
    if "eval" in info:
        ev = info["eval"]
        line += f", Acc@{ev['k']} {ev['acc_at_k']:.1f}% on {ev['num_problems']} held-out problems"
    print(line + f" ({info['total_seconds']:.0f} s)")
    return path
