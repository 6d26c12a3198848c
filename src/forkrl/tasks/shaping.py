"""Reward shaping: what the advantages are computed from (the task score plus DAPO's overlong
penalty) and a score's accuracy. Re-exported by `forkrl.tasks.rewards`."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["accuracy_of", "overlong_penalty", "shape_rewards"]


def overlong_penalty(
    response_lengths: torch.Tensor | Sequence[int],
    max_len: int,
    cache_len: int,
    penalty_factor: float = 1.0,
) -> torch.Tensor:
    """DAPO's overlong reward shaping, to be *added* to the task reward.

    With L the response length in tokens (generated tokens, EOS included) and
    `soft = max_len - cache_len`:

        0                                        if L <= soft
        -(L - soft) / cache_len * penalty_factor if soft < L < max_len
        -penalty_factor                          if L >= max_len

    i.e. a linear ramp over the last `cache_len` tokens. Paper 1: max 20480, cache 4096.

    Args:
        response_lengths: (B,) lengths, any numeric dtype or a list.
    Returns:
        (B,) fp32 penalties (<= 0), on the device of `response_lengths`.
    """
    if not 0 < cache_len <= max_len:
        raise ValueError(f"need 0 < cache_len <= max_len, got cache_len={cache_len}, max_len={max_len}")
    lengths = torch.as_tensor(response_lengths, dtype=torch.float32)
    soft = max_len - cache_len
    return -((lengths - soft) / cache_len).clamp(0.0, 1.0) * penalty_factor


def shape_rewards(task_scores: torch.Tensor, lengths: torch.Tensor, max_new_tokens: int, reward_cfg) -> torch.Tensor:
    """The reward the advantages are computed from: the task score plus, with
    `reward.overlong_shaping`, DAPO's overlong penalty (`overlong_penalty`). A new tensor."""
    shaped = task_scores.clone()
    if reward_cfg.overlong_shaping:
        shaped += overlong_penalty(lengths, max_new_tokens, reward_cfg.overlong_cache, reward_cfg.overlong_penalty)
    return shaped


def accuracy_of(task_scores: torch.Tensor) -> torch.Tensor:
    """Per-response accuracy from task scores: the score clamped to [0, 1] (exactly the 0/1
    verdict of a verifier; a graded reward counts as partial credit)."""
    return task_scores.clamp(0, 1)
