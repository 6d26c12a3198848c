"""Batch-invariant sampling: Gumbel-max with noise hashed from (row seed, step, token id).

`torch.multinomial` draws from one global generator, so the token a row gets depends on how many
rows were sampled before it in the same call. Here the noise of row b at step s (0-based index of
the generated token) for token j is a pure function `u = hash(r_b, s, j)` of the row's seed r_b, so
a row samples the same tokens alone, in a batch of 64, chunked, or on another data-parallel rank.

Sampling is Gumbel-max: `argmax_j(scores_j + G_j)` with `G_j = -log(-log(u_j))` is an exact draw
from `softmax(scores)`, so the log-probs recorded from `scores` stay the sampler's log-probs.

The hash is 32-bit arithmetic carried in int64 tensors (no unsigned types, no overflow: every
multiplier is < 2^31, so products of 32-bit values stay < 2^63, and right shifts only ever see
non-negative values). The per-row key has two independent 32-bit lanes, so two different
(seed, step) pairs share a noise vector with probability ~2^-64, not 2^-32.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

_MASK32 = 0xFFFFFFFF
_LANE_A, _LANE_B = 0x9E3779B9, 0x85EBCA6B  # arbitrary distinct starting states for the two key lanes


def _mix32_(x: torch.Tensor) -> torch.Tensor:
    """In place: Wellons' `lowbias32` (constants 0x21f0aaad, 0x735a2d97), a bijection on [0, 2^32).

    `x` is int64 holding values in [0, 2^32); both multipliers are < 2^31, so no product overflows.
    """
    x.bitwise_xor_(x >> 16)
    x.mul_(0x21F0AAAD).bitwise_and_(_MASK32)
    x.bitwise_xor_(x >> 15)
    x.mul_(0x735A2D97).bitwise_and_(_MASK32)
    return x.bitwise_xor_(x >> 15)


def _row_keys(row_seeds: torch.Tensor, step: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two 32-bit keys `[B]` per (row seed, step); `row_seeds` is `[B]` int64 (any int64 value), `step`
    an int or a `[B]` int64 tensor of per-row steps (>= 0)."""
    lo, hi = row_seeds & _MASK32, (row_seeds >> 32) & _MASK32  # two's-complement words of the seed
    keys = []
    for start in (_LANE_A, _LANE_B):
        k = _mix32_(lo ^ start)
        k = _mix32_(k ^ hi)
        keys.append(_mix32_(k ^ (step & _MASK32)))
    return keys[0], keys[1]


def hash_bits(row_seeds: torch.Tensor, step: int | torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Uniform 32-bit hashes `[B, V]` (int64 in [0, 2^32)) of (row seed `[B]`, step, token id `[V]`).

    Entry (b, j) depends only on `row_seeds[b]`, `step` (or `step[b]`, a `[B]` tensor) and
    `token_ids[j]`, never on b itself: integer arithmetic, so hashing many steps as one batch of rows
    gives the bits of each step alone (the lean decode loop makes its noise that way).
    """
    key_a, key_b = _row_keys(row_seeds, step)
    h = (key_a.unsqueeze(1) + token_ids.unsqueeze(0)).bitwise_and_(_MASK32)  # [B, V]
    _mix32_(h).bitwise_xor_(key_b.unsqueeze(1))
    return _mix32_(h)


def gumbel_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise `-log(-log(u))` (float32, same shape) for `u = (bits + 0.5) / 2^32`.

    float32 cannot hold u near 1 (it would round to 1 and give +inf), so the exponential variate
    `E = -log(u)` is computed from whichever of u and 1 - u is small: `-log(u)` for u < 1/2 and
    `-log1p(-(1 - u))` above. The noise then spans [-3.13, 22.9], like float64 would.
    """
    low_half = bits < 2**31
    tail = torch.minimum(bits, _MASK32 - bits).float().add_(0.5).mul_(2.0**-32)  # min(u, 1 - u)
    exponential = torch.where(low_half, tail.log().neg_(), tail.neg().log1p_().neg_())
    return exponential.log_().neg_()


def gumbel_max_sample(
    scores: torch.Tensor, row_seeds: torch.Tensor, step: int, token_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Sampled token ids `[B]`: one exact draw per row from `softmax(scores)` (`scores` `[B, V]`,
    -inf = excluded), with noise fixed by (`row_seeds` `[B]` int64, `step`, token id).

    `token_ids` is `arange(V)` on the scores' device; pass it to reuse one across steps.
    """
    if token_ids is None:
        token_ids = torch.arange(scores.shape[1], device=scores.device)
    noise = gumbel_from_bits(hash_bits(row_seeds, step, token_ids))
    return noise.add_(scores.float()).argmax(-1)


class SeededGumbelSampler(LogitsProcessor):
    """Last processor of the chain: picks each row's token by `gumbel_max_sample` and returns scores
    that are 0 on it and -inf elsewhere, so `generate`'s multinomial draw takes it with probability 1.

    Args:
        row_seeds: `[B]` int64 seed per row, on the model's device.
        prompt_len: padded prompt length P; step s = `input_ids.shape[1] - P`.

    Cost per step: a `[B, V]` int64 hash (23 element-wise integer ops, mostly in place) and ~14
    float32 ops (three of them logs) to turn it into noise, all unfused. For B = 64, V = 152k that
    is ~1.3 s on 2 CPU cores (measured) and, memory-bound at ~5 GB of traffic, an estimated ~2 ms on
    an H100 (not measured), next to a decode step of tens of ms. Fusing it (torch.compile or one
    kernel) or hashing only the top-k candidates would make it negligible.
    """

    def __init__(self, row_seeds: torch.Tensor, prompt_len: int):
        self.row_seeds = row_seeds
        self.prompt_len = prompt_len
        self._token_ids: torch.Tensor | None = None  # arange(V), built on the first step

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        if self._token_ids is None or self._token_ids.shape[0] != scores.shape[1]:
            self._token_ids = torch.arange(scores.shape[1], device=scores.device)
        step = input_ids.shape[1] - self.prompt_len
        chosen = gumbel_max_sample(scores, self.row_seeds, step, self._token_ids)
        return torch.full_like(scores, float("-inf")).scatter_(1, chosen.unsqueeze(1), 0.0)
