"""Group-relative advantage estimators (GRPO, Dr.GRPO, RLOO) as small registered functions.

Every estimator maps the outcome rewards of G responses per prompt to one advantage per
response; the trainer broadcasts it over the response's tokens (paper Eq. 3).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from forkrl.registry import Registry

AdvantageFn = Callable[[torch.Tensor, float], torch.Tensor]
ADVANTAGE_ESTIMATORS: Registry[AdvantageFn] = Registry("advantage estimator")


def register_advantage(name: str) -> Callable[[AdvantageFn], AdvantageFn]:
    """Register `fn(rewards [num_groups, G], std_eps) -> advantages [num_groups, G]` under `name`."""
    return ADVANTAGE_ESTIMATORS.register(name)


@register_advantage("grpo")
def grpo_advantages(rewards: torch.Tensor, std_eps: float) -> torch.Tensor:
    """(R_i − mean(R)) / (std(R) + eps), with the unbiased std over the group (as verl and TRL)."""
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True)
    return (rewards - mean) / (std + std_eps)


@register_advantage("dr_grpo")
def dr_grpo_advantages(rewards: torch.Tensor, std_eps: float) -> torch.Tensor:
    """R_i − mean(R): Dr.GRPO drops the std division, which up-weights easy and hard prompts."""
    return rewards - rewards.mean(dim=1, keepdim=True)


@register_advantage("rloo")
def rloo_advantages(rewards: torch.Tensor, std_eps: float) -> torch.Tensor:
    """R_i − mean of the other G−1 rewards (leave-one-out baseline) = G/(G−1) · (R_i − mean(R))."""
    g = rewards.shape[1]
    return (rewards - rewards.mean(dim=1, keepdim=True)) * (g / (g - 1))


@dataclass
class GroupAdvantages:
    """Advantages for a batch of prompt groups."""

    advantages: torch.Tensor
    """`[num_groups * G]` float32, one per response, in the order of the input rewards."""
    zero_variance: torch.Tensor
    """`[num_groups]` bool: groups whose rewards are all equal (all right or all wrong).

    Their advantages are exactly 0, so they carry no policy gradient; dynamic sampling drops them.
    """


def compute_advantages(
    rewards: torch.Tensor, group_size: int, estimator: str = "grpo", std_eps: float = 1e-6
) -> GroupAdvantages:
    """Group-relative advantages of `rewards` `[num_groups * G]` laid out group by group.

    Responses of one prompt must be contiguous: rewards[i*G:(i+1)*G] belong to prompt i.
    """
    estimate = ADVANTAGE_ESTIMATORS.get(estimator)
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 for group-relative advantages, got {group_size}")
    if rewards.dim() != 1 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"rewards must be a 1-D tensor whose length is a multiple of group_size={group_size}, "
            f"got shape {tuple(rewards.shape)}"
        )
    grouped = rewards.to(torch.float32).view(-1, group_size)
    zero_variance = (grouped == grouped[:, :1]).all(dim=1)
    advantages = estimate(grouped, std_eps)
    # Exactly zero (not ~1e-9 from rounding) so the "no signal" groups are unambiguous.
    advantages = advantages.masked_fill(zero_variance[:, None], 0.0)
    return GroupAdvantages(advantages=advantages.reshape(-1), zero_variance=zero_variance)
