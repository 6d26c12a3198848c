"""Per-token covariance between log-probability and advantage (Entropy Mechanism paper, arXiv 2505.22617).

Entropy change under a policy-gradient step is driven by Cov(log π(o), A); the per-token
centered product below is what Clip-Cov and KL-Cov rank tokens by.
"""

from __future__ import annotations

import torch


def token_covariance(advantages: torch.Tensor, logprobs: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """cov_i = (A_i − mean(A)) · (log π(o_i) − mean(log π)) over the valid tokens given.

    Args:
        advantages: `[B, T]` per-token advantages.
        logprobs: `[B, T]` log-probs of the sampled tokens (detached here: the covariance
            only ranks tokens, it never carries gradient).
        response_mask: `[B, T]`, 1 for response tokens; means are taken over these only.

    Returns:
        `[B, T]` float32 covariance, 0 at padding. The means are over the tensor passed in
        (the authors' code passes one micro-batch).
    """
    mask = response_mask.to(torch.float32)
    n = mask.sum().clamp_min(1.0)
    adv = advantages.detach().to(torch.float32)
    logp = logprobs.detach().to(torch.float32)
    adv_centered = adv - (adv * mask).sum() / n
    logp_centered = logp - (logp * mask).sum() / n
    return adv_centered * logp_centered * mask


def rank_descending(values: torch.Tensor) -> torch.Tensor:
    """Rank of every element of a flat tensor in descending order (0 = largest).

    Ties keep index order (stable sort), so the ranking is deterministic. Ranking instead of
    `topk` lets callers compare against a count held in a tensor, with no host sync.
    """
    order = torch.argsort(values, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(values.numel(), device=values.device)
    return ranks
