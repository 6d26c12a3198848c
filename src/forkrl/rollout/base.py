"""What a generation backend takes (`SamplingParams`) and returns (`Rollout`), and its interface."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Protocol, runtime_checkable

import torch


@dataclass
class SamplingParams:
    """How to sample responses.

    Decoding applies, in order: the EOS mask of `min_new_tokens`, temperature (or entropy-aware
    temperature), top-k, top-p.
    """

    max_new_tokens: int
    """Maximum number of response tokens; responses that hit it without EOS are unfinished."""
    temperature: float = 1.0
    """Softmax temperature T. 0 means greedy decoding (argmax; log-prob 0 and entropy 0)."""
    top_p: float = 1.0
    """Nucleus sampling mass; 1.0 disables it."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 disables it."""
    entropy_temperature: tuple[float, float, float] | None = None
    """`(T_low, T_high, h)`: sample with T_high where the raw (T = 1) entropy H_t > h and with T_low
    elsewhere (paper Eq. 5; paper value h = 0.672). Replaces `temperature` when set."""
    min_new_tokens: int = 0
    """EOS tokens are masked out (-inf, before temperature) for the first `min_new_tokens` steps, so
    every response runs at least that long; for benchmarks at a fixed response length. The masked
    distribution is the one sampled, and the recorded log-probs and entropies are its own."""
    seed: int | None = None
    """Seed for sampling; the same seed, inputs and batch size give the same tokens. None: use the
    global torch RNG as it is. Ignored when `row_seeds` is set."""
    row_seeds: list[int] | None = None
    """One int64 seed per prompt (same length as the prompts): batch-invariant sampling. A row's
    tokens then depend only on its prompt and its seed, not on the other rows, their order or
    padding, the backend's batch size, or how prompts are split across data-parallel ranks (up to
    logits that differ by batch composition, e.g. GPU kernels chosen by batch size). Each token is
    Gumbel-max over the final scores with noise hashed from (row seed, step, token id), which is
    an exact draw from the same distribution. None: sample with the torch RNG (see `seed`)."""

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError("min_new_tokens must be in [0, max_new_tokens]")
        if self.entropy_temperature is not None:
            t_low, t_high, _ = self.entropy_temperature
            if t_low <= 0 or t_high <= 0:
                raise ValueError("entropy_temperature temperatures must be > 0")
        if self.row_seeds is not None:
            self.row_seeds = [operator.index(s) for s in self.row_seeds]
            if any(not -(2**63) <= s < 2**63 for s in self.row_seeds):
                raise ValueError("row_seeds must fit in int64")


@dataclass
class Rollout:
    """A batch of sampled responses with the sampler's per-token statistics.

    B = number of sequences, P = padded prompt length, R = padded response length (<= max_new_tokens).
    Positions after the first EOS (or past `response_lengths`) hold the pad id and zeros.
    """

    prompt_ids: torch.Tensor
    """`[B, P]` long, left-padded prompt tokens."""
    prompt_mask: torch.Tensor
    """`[B, P]` long, 1 on real prompt tokens."""
    response_ids: torch.Tensor
    """`[B, R]` long, generated tokens, right-padded with the pad id after EOS."""
    response_mask: torch.Tensor
    """`[B, R]` long, 1 up to and including the first EOS, 0 after."""
    sampler_logprobs: torch.Tensor
    """`[B, R]` float32, log-prob of each sampled token under the distribution it was actually
    sampled from (after temperature, top-k and top-p). 0 where `response_mask` is 0."""
    sampler_entropy: torch.Tensor | None
    """`[B, R]` float32, entropy of softmax(z / T) before top-k/top-p truncation (SPEC Eq. 1), with
    T the temperature used for that token. 0 where `response_mask` is 0. None from a backend that
    cannot compute it (an inference engine returns top log-probs, not the full distribution);
    the trainer then takes the entropy percentiles from its old-policy scoring pass."""
    finished: torch.Tensor
    """`[B]` bool, whether the response ended with EOS (False: truncated at max_new_tokens)."""
    response_lengths: torch.Tensor
    """`[B]` long, number of response tokens including the EOS (= response_mask.sum(-1))."""
    row_seeds: torch.Tensor | None = None
    """`[B]` int64, the `SamplingParams.row_seeds` each row was sampled with; None without them."""

    @property
    def batch_size(self) -> int:
        return self.prompt_ids.shape[0]

    def to(self, device: str | torch.device) -> Rollout:
        """A copy with every tensor moved to `device`."""
        return Rollout(**{f.name: _to(getattr(self, f.name), device) for f in fields(self)})

    @staticmethod
    def cat(rollouts: Sequence[Rollout], pad_token_id: int) -> Rollout:
        """Concatenate along the batch, re-padding prompts on the left and responses on the right.
        `row_seeds` must be set on all of the rollouts or on none."""
        prompt_len = max(r.prompt_ids.shape[1] for r in rollouts)
        response_len = max(r.response_ids.shape[1] for r in rollouts)

        def pad(t, length, value, left):
            gap = length - t.shape[1]
            return torch.nn.functional.pad(t, (gap, 0) if left else (0, gap), value=value)

        return Rollout(
            prompt_ids=torch.cat([pad(r.prompt_ids, prompt_len, pad_token_id, True) for r in rollouts]),
            prompt_mask=torch.cat([pad(r.prompt_mask, prompt_len, 0, True) for r in rollouts]),
            response_ids=torch.cat([pad(r.response_ids, response_len, pad_token_id, False) for r in rollouts]),
            response_mask=torch.cat([pad(r.response_mask, response_len, 0, False) for r in rollouts]),
            sampler_logprobs=torch.cat([pad(r.sampler_logprobs, response_len, 0.0, False) for r in rollouts]),
            sampler_entropy=None
            if any(r.sampler_entropy is None for r in rollouts)
            else torch.cat([pad(r.sampler_entropy, response_len, 0.0, False) for r in rollouts]),
            finished=torch.cat([r.finished for r in rollouts]),
            response_lengths=torch.cat([r.response_lengths for r in rollouts]),
            row_seeds=_cat_row_seeds([r.row_seeds for r in rollouts]),
        )


def pad_rows(
    rows: Sequence[Sequence[int]], pad_id: int, left: bool, min_len: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """`[B, L]` long ids and their 0/1 mask from token lists of different lengths, padded with
    `pad_id` on the left (prompts, flush against the response) or on the right (responses);
    L = max(longest row, `min_len`)."""
    width = max([min_len, *(len(r) for r in rows)])
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r) == 0:
            continue
        cols = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, cols] = torch.as_tensor(r, dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


def _to(t: torch.Tensor | None, device: str | torch.device) -> torch.Tensor | None:
    return None if t is None else t.to(device)


def _cat_row_seeds(seeds: list[torch.Tensor | None]) -> torch.Tensor | None:
    if all(s is None for s in seeds):
        return None
    if any(s is None for s in seeds):
        raise ValueError("cannot concatenate rollouts with and without row_seeds")
    return torch.cat(seeds)


Prompts = Sequence[str] | Sequence[Sequence[int]]
"""Prompts as text (tokenized by the backend, no special tokens added) or as lists of token ids."""


def prompt_token_ids(tokenizer, prompts: Prompts) -> list[list[int]]:
    """Token ids of each prompt: text through `tokenizer`, id lists as ints; an empty prompt is refused."""
    if isinstance(prompts[0], str):
        ids = tokenizer(list(prompts))["input_ids"]
    else:
        ids = [list(map(int, p)) for p in prompts]
    if any(len(p) == 0 for p in ids):
        raise ValueError("empty prompt")
    return ids


@runtime_checkable
class GenerationBackend(Protocol):
    """Something that samples responses from the current policy."""

    def generate(self, prompts: Prompts, params: SamplingParams) -> Rollout:
        """Sample one response per prompt (repeat prompts for G responses per prompt)."""
        ...

    def update_weights(self, model: torch.nn.Module) -> None:
        """Make the backend sample from `model`'s current weights (no-op for in-process backends
        that share the training model; an inference server would reload weights here)."""
        ...
