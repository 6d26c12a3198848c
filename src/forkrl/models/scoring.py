"""Teacher-forced log-probs and entropies of given responses under a model, via the fused LM-head path.

The trainer calls this for the policy (with gradient) and the old/reference policy (without);
the analyses call it to score stored responses under another checkpoint. Only the hidden
states of real response tokens go through the LM head, and never as full `[N, V]` logits.
"""

from __future__ import annotations

import torch

from forkrl.models.loading import forward_hidden_states, get_lm_head, unwrap_peft
from forkrl.ops.logprobs import fused_linear_logprobs_and_entropy


def score_responses(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(o_t | q, o_<t) and entropy H_t of softmax(z_t / T) for every response token.

    Args:
        model: a causal LM (possibly peft-wrapped). To train under DDP, wrap a `ResponseScorer`
            instead, so that the scoring runs inside the wrapper's forward.
        prompt_ids: `[B, P]` left-padded prompt tokens; prompt_mask `[B, P]`.
        response_ids: `[B, R]` right-padded response tokens; response_mask `[B, R]`.
        temperature: T of Eq. 1 (use the sampling temperature so ratios compare like with like).

    Returns:
        logprobs `[B, R]` and entropy `[B, R]` in float32, 0 at padding; differentiable w.r.t.
        the model's parameters when grad is enabled.
    """
    prompt_len = prompt_ids.shape[1]
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)  # (B, P + R)
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
    hidden = forward_hidden_states(model, input_ids, attention_mask)  # (B, P + R, H)
    # Position P - 1 + t predicts response token t.
    hidden = hidden[:, prompt_len - 1 : -1]  # (B, R, H)
    valid = response_mask.bool()
    weight, bias = get_lm_head(unwrap_peft(model))
    logprobs_valid, entropy_valid = fused_linear_logprobs_and_entropy(
        hidden[valid].to(weight.dtype), weight, response_ids[valid], bias, temperature, chunk_size
    )  # (N_valid,) each
    zeros = torch.zeros(response_ids.shape, dtype=logprobs_valid.dtype, device=response_ids.device)
    logprobs = zeros.masked_scatter(valid, logprobs_valid)
    entropy = zeros.masked_scatter(valid, entropy_valid)
    return logprobs, entropy


class ResponseScorer(torch.nn.Module):
    """`score_responses` as a module, the unit the trainer wraps in DDP/FSDP.

    DDP's gradient synchronization is armed in its wrapper's `forward`; scoring goes through the
    decoder and then the LM-head weight directly (fused op), so the whole computation must live
    inside one module's forward for the wrapper to see it.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, prompt_ids, prompt_mask, response_ids, response_mask, temperature: float = 1.0):
        return score_responses(self.model, prompt_ids, prompt_mask, response_ids, response_mask, temperature)
