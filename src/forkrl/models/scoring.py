"""Teacher-forced log-probs and entropies of given responses under a model, via the fused LM-head path.

The trainer calls this for the policy (with gradient) and the old/reference policy (without);
the analyses call it to score stored responses under another checkpoint. Only the hidden
states of real response tokens go through the LM head, and never as full `[N, V]` logits.

In GRPO every prompt is repeated for its G responses, and the rows of one group are contiguous.
`score_responses` then runs the decoder over each distinct prompt once, keeps its per-layer keys and
values, and runs the responses against copies of them (the "shared-prefix" path): the prompt's
activations are computed, stored and backpropagated once per group instead of G times. The copies
are `index_select`s, so autograd sums the G responses' gradients into the one prompt computation.

Sharing is not free: the responses then attend to the prompt's keys through an explicit mask, so
attention computes the full `R x (P + R)` rectangle, where the plain path's causal forward (each
row's real tokens packed to the front, never masked: `_packed_hidden_states`) computes half of its
`(P + R)` square. With short prompts and long responses that costs more than it saves (the
tiny Qwen3 of `benchmarks/train_step.py`, 17-token prompts, 8 rows a group, forward + backward:
1.24x the plain path at 1,024 response tokens, 0.48x with 512-token prompts at 256). By default
(`share_prompt="auto"`) `score_responses` runs the plain path where `scoring_cost` estimates it
at least 10% cheaper (`PLAIN_MARGIN`), and shares elsewhere.
"""

from __future__ import annotations

import logging
from typing import Literal, NamedTuple

import torch

from forkrl import fast_paths
from forkrl.models import compat
from forkrl.models.loading import get_lm_head, unwrap_peft
from forkrl.ops.logprobs import fused_linear_logprobs_and_entropy

logger = logging.getLogger(__name__)

PLAIN_MARGIN = 0.9
"""`share_prompt="auto"` runs the plain path only where `scoring_cost` puts it at least 10% below the
shared one. The estimate is within about 10% of measured forward + backward times (tiny Qwen3: 1.33
estimated vs 1.24 measured at 16-token prompts and 1,024-token responses, 0.81 vs 0.78 at 128 and 256;
the demo's shapes, 12-token prompts and <= 256 tokens, 1.04-1.07 vs 1.00-1.03). Inside that band the
two paths take the same time, and sharing, the path used before the estimate existed, is kept."""


class ResponseScores(NamedTuple):
    """Per-token scores of responses under a model, `[B, R]` float32 each, 0 at padding."""

    logprobs: torch.Tensor
    """log π(o_t | q, o_<t) of the sampled tokens (differentiable when grad is enabled)."""
    entropy: torch.Tensor
    """H_t of softmax(z_t / T) (paper Eq. 1)."""
    grad_norm: torch.Tensor | None = None
    """‖∂ log π(o_t)/∂z_t‖₂ (no grad), only when asked for (`return_grad_norm`), else None."""

    def rows(self, s: slice) -> ResponseScores:
        """The scores of rows `s`."""
        return ResponseScores(*(None if t is None else t[s] for t in self))

    @staticmethod
    def cat(parts: list[ResponseScores]) -> ResponseScores:
        """Row blocks (e.g. micro-batches) concatenated along the rows."""
        return ResponseScores(*(None if ts[0] is None else torch.cat(ts) for ts in zip(*parts)))


def score_responses(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    share_prompt: bool | Literal["auto"] = "auto",
    return_grad_norm: bool = False,
) -> ResponseScores:
    """log π(o_t | q, o_<t) and entropy H_t of softmax(z_t / T) for every response token.

    Args:
        model: a causal LM (possibly peft-wrapped). To train under DDP, wrap a `ResponseScorer`
            instead, so that the scoring runs inside the wrapper's forward.
        prompt_ids: `[B, P]` left-padded prompt tokens; prompt_mask `[B, P]`.
        response_ids: `[B, R]` right-padded response tokens; response_mask `[B, R]`.
        temperature: T of Eq. 1 (use the sampling temperature so ratios compare like with like).
        share_prompt: run the decoder once per run of identical consecutive prompt rows and the
            responses against that prompt's keys/values (same values and gradients as one forward
            over prompt + response, up to float rounding). It is used only when some rows repeat
            and the model supports it (`shared_prefix_unsupported`); otherwise, or with False, the
            plain path runs one forward over prompt + response. A model that cannot take it is
            reported to `forkrl.fast_paths` (one warning per run), never skipped silently.
            "auto" (default): as True, except where `scoring_cost` estimates the plain path at
            least 10% cheaper for these shapes (`PLAIN_MARGIN`); there the plain path runs and
            nothing is reported (the fast path does not apply).
        return_grad_norm: also return ‖∂ log π(o_t)/∂z_t‖₂ `[B, R]` (no grad, 0 at padding), the
            ranking of the `gradient` selection strategy, from the same fused LM-head pass.

    Returns:
        `ResponseScores`: logprobs `[B, R]` and entropy `[B, R]` in float32, 0 at padding,
        differentiable w.r.t. the model's parameters when grad is enabled; `grad_norm` with
        `return_grad_norm`, else None.
    """
    hidden = None
    if share_prompt and response_ids.shape[1] > 0:
        hidden = _shared_prefix_hidden_states(
            model, prompt_ids, prompt_mask, response_ids, response_mask, only_if_cheaper=share_prompt == "auto"
        )
    if hidden is None:
        hidden = _packed_hidden_states(model, prompt_ids, prompt_mask, response_ids, response_mask)
    valid = response_mask.bool()
    weight, bias = get_lm_head(unwrap_peft(model))
    outputs = fused_linear_logprobs_and_entropy(
        hidden[valid].to(weight.dtype),
        weight,
        response_ids[valid],
        bias,
        temperature,
        chunk_size,
        return_grad_norm=return_grad_norm,
    )  # (N_valid,) each: logprobs, entropy[, grad_norm]
    zeros = torch.zeros(response_ids.shape, dtype=outputs[0].dtype, device=response_ids.device)
    return ResponseScores(*(zeros.masked_scatter(valid, values) for values in outputs))


def _packed_hidden_states(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
) -> torch.Tensor:
    """The plain path: final hidden states `[B, R, H]` predicting each response token, from one causal
    forward over prompt + response with every row's real tokens moved to the front.

    A left-padded prompt and a right-padded response need an attention mask, and with a mask SDPA
    computes the whole `L x L` square (on GPUs it also leaves the flash kernel, and transformers
    materializes a `[B, 1, L, L]` mask: 3.2 GB of bools for 8 rows of 20k tokens). Packed, each row is
    its real tokens followed by padding, so the causal rule alone keeps every real token from seeing
    a pad: the forward runs without a mask (`is_causal`, half the square). The positions are
    `0 .. L-1`, which for the real tokens are those of the padded layout (`cumsum(mask) - 1`, as in
    `generate`), so the real tokens' values are the same up to float rounding; the pads' outputs are
    never read.
    """
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)  # (B, P + R)
    real = torch.cat([prompt_mask, response_mask], dim=1).bool()
    B, L = input_ids.shape
    order = torch.argsort((~real).to(torch.int8), dim=1, stable=True)  # real tokens first, in order
    positions = torch.arange(L, device=input_ids.device).expand(B, L)
    decoder = unwrap_peft(model).get_decoder()
    hidden = decoder(
        input_ids=input_ids.gather(1, order), attention_mask=None, position_ids=positions, use_cache=False
    ).last_hidden_state  # (B, L, H)
    # Response token t (real) sits at index (real prompt tokens) + (real response tokens before it);
    # the hidden state one position earlier predicts it.
    before = prompt_mask.sum(1, keepdim=True) + response_mask.long().cumsum(1) - 2  # (B, R)
    index = before.clamp(0, L - 1).unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    return hidden.gather(1, index)  # (B, R, H)


def prompt_groups(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs of identical consecutive prompt rows (same ids and same mask).

    Returns:
        first_rows `[U]`: the first row of each run; row_to_group `[B]`: the run of each row, so
        `x[first_rows][row_to_group]` repeats a per-prompt `x` back to the rows.
    """
    same_as_previous = (prompt_ids[1:] == prompt_ids[:-1]).all(-1) & (prompt_mask[1:] == prompt_mask[:-1]).all(-1)
    starts = torch.cat([same_as_previous.new_ones(1), ~same_as_previous])  # (B,)
    return starts.nonzero().squeeze(1), starts.long().cumsum(0) - 1


def _shared_prefix_hidden_states(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    only_if_cheaper: bool = False,
) -> torch.Tensor | None:
    """Final hidden states `[B, R, H]` predicting each response token, or None to use the plain path
    (also when `only_if_cheaper` and `scoring_cost` says the plain path costs less).

    Pass 1 runs the U distinct prompts `[U, P]` and records every layer's keys/values. Pass 2 runs
    response tokens 0..R-2 of all B rows `[B, R - 1]` against the rows' copies of them; the hidden
    state predicting token 0 is the prompt's last one. Positions and masks are those of the plain
    path's single forward over `[B, P + R]`, so each response token sees the same keys, values and
    rotary positions.
    """
    first_rows, row_to_group = prompt_groups(prompt_ids, prompt_mask)
    if len(first_rows) == len(prompt_ids):  # all prompts distinct: nothing to share
        return None
    decoder = unwrap_peft(model).get_decoder()
    if only_if_cheaper:
        cost = scoring_cost(
            decoder.config,
            rows=len(prompt_ids),
            groups=len(first_rows),
            prompt_len=prompt_ids.shape[1],
            response_len=response_ids.shape[1],
            prompts_padded=not bool(prompt_mask[first_rows].all()),
        )
        if cost is not None and cost[0] < PLAIN_MARGIN * cost[1]:
            logger.debug("plain scoring: estimated %.3g multiply-adds vs %.3g shared", *cost)
            return None
    reason = shared_prefix_unsupported(decoder)
    if reason is not None:
        fast_paths.declined(fast_paths.SHARED_PREFIX_SCORING, reason)
        return None
    prompt_len = prompt_ids.shape[1]
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)  # (B, P + R)
    # cumsum(mask) - 1, as in `forward_hidden_states`: responses continue after the last real prompt token.
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    num_layers = decoder.config.num_hidden_layers

    with compat.cache_kept_under_checkpointing(decoder):
        recorder = compat.new_cache(_RecordingLayer)
        out = decoder(
            input_ids=prompt_ids[first_rows],
            attention_mask=prompt_mask[first_rows],
            position_ids=position_ids[first_rows, :prompt_len],
            use_cache=False,  # the cache is ours and passed explicitly; this only silences checkpointing's warning
            **compat.cache_kwargs(decoder, recorder),
        )
        recorded = compat.cache_layers(recorder)
        if len(recorded) != num_layers or not all(layer.is_initialized for layer in recorded):
            fast_paths.declined(
                fast_paths.SHARED_PREFIX_SCORING,
                f"{type(decoder).__name__} did not write its keys/values to the cache it was given",
            )
            return None
        last_prompt_hidden = out.last_hidden_state[:, -1][row_to_group]  # (B, H), predicts response token 0
        if response_ids.shape[1] == 1:
            fast_paths.used(fast_paths.SHARED_PREFIX_SCORING)
            return last_prompt_hidden.unsqueeze(1)
        prefix_layers = [_SharedPrefixLayer(layer.keys[row_to_group], layer.values[row_to_group]) for layer in recorded]
        # Token R - 1 predicts nothing, so it is not run.
        out = decoder(
            input_ids=response_ids[:, :-1],
            attention_mask=attention_mask[:, :-1],
            position_ids=position_ids[:, prompt_len:-1],
            use_cache=False,
            **compat.cache_kwargs(decoder, compat.cache_of_layers(prefix_layers)),
        )
        if not all(layer.was_read for layer in prefix_layers):
            reason = f"{type(decoder).__name__} did not read the prompt's cached keys/values"
            fast_paths.declined(fast_paths.SHARED_PREFIX_SCORING, reason)
            return None
    fast_paths.used(fast_paths.SHARED_PREFIX_SCORING)
    return torch.cat([last_prompt_hidden.unsqueeze(1), out.last_hidden_state], dim=1)  # (B, R, H)


def scoring_cost(
    config,
    *,
    rows: int,
    groups: int,
    prompt_len: int,
    response_len: int,
    prompts_padded: bool,
) -> tuple[float, float] | None:
    """Multiply-adds per decoder layer of one forward, `(plain, shared)`, or None where `config` lacks
    the sizes (then "auto" shares, as True does).

    A token costs its projections, `H·d·(2·heads + 2·kv_heads) + 3·H·F` (q, k, v, o and a gated
    MLP); a query-key pair costs `2·heads·d` (scores and values). Attention covers half the square
    of a causal forward without a mask (SDPA's `is_causal`) and all of it with a mask. Plain: B rows
    of `P + R` tokens, never masked (`_packed_hidden_states`). Shared: the U distinct prompts
    (`prompts_padded`: masked), then B rows of `R - 1` response tokens against `P + R - 1` keys,
    always masked. The LM head is the same in both and left out; the backward
    costs roughly twice the forward in both, so the forward decides.
    """
    H, F = getattr(config, "hidden_size", None), getattr(config, "intermediate_size", None)
    heads = getattr(config, "num_attention_heads", None)
    if not (isinstance(H, int) and isinstance(F, int) and isinstance(heads, int)):
        return None
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    d = getattr(config, "head_dim", None) or H // heads
    per_token = H * d * (2 * heads + 2 * kv_heads) + 3 * H * F
    per_pair = 2 * heads * d
    B, U, P, R = rows, groups, prompt_len, response_len
    full = P + R
    plain = B * full * per_token + B * full * full * 0.5 * per_pair
    shared = (U * P + B * (R - 1)) * per_token
    shared += (U * P * P * (1.0 if prompts_padded else 0.5) + B * (R - 1) * (full - 1)) * per_pair
    return float(plain), float(shared)


def shared_prefix_unsupported(decoder: torch.nn.Module) -> str | None:
    """Why the shared-prefix path (and the generation cache built on the same layers) cannot run
    `decoder`, or None when it can.

    It needs transformers' per-layer cache API, a decoder whose `forward` takes a cache, and only
    full-attention layers: sliding-window, linear-attention (SSM) and KV-sharing layers keep other
    state than `[B, heads, L, d]` keys/values, which the cache layers below do not model. A model
    that ignores the cache it is handed is caught after the fact (every layer must have written
    and read it).
    """
    missing = compat.cache_layers_missing()
    if missing is not None:
        return missing
    if compat.cache_argument(decoder) is None:
        names = " or ".join(compat.CACHE_ARGUMENTS)
        return f"{type(decoder).__name__}.forward takes no cache argument ({names})"
    config = decoder.config
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    other = sorted({t for t in layer_types if t != "full_attention"})
    if other:
        return f"the model has {', '.join(other)} layers (only full attention is supported)"
    if getattr(config, "kv_sharing_modes", None):
        return "the model shares keys/values across layers"
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return "the model uses sliding-window attention"
    # Under gradient checkpointing in training, transformers drops the cache unless the layer may
    # keep it (`_can_checkpoint_with_cache`, transformers >= 5.15).
    checkpointing = decoder.training and getattr(decoder, "gradient_checkpointing", False)
    if checkpointing and not compat.checkpointing_can_keep_cache():
        return "gradient checkpointing drops the cache in this transformers (5.15+ can keep it)"
    return None


if compat.DynamicLayer is not None:

    class _RecordingLayer(compat.DynamicLayer):
        """Pass 1 (prompts): keep this layer's keys/values `[U, kv_heads, P, d]`; attend over them only.

        `update` overwrites instead of appending, so a gradient-checkpointing recomputation leaves
        the recorded tensors as they were (the recomputed copies are equal)."""

        def update(self, key_states, value_states, *args, **kwargs):
            compat.fill_layer(self, key_states, value_states)
            return key_states, value_states

    class _SharedPrefixLayer(compat.DynamicLayer):
        """Pass 2 (responses): prepend the rows' prompt keys/values `[B, kv_heads, P, d]`, never grow.

        Read-only, so a gradient-checkpointing recomputation sees the same prefix."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor):
            super().__init__()
            compat.fill_layer(self, keys, values)
            self.was_read = False

        def update(self, key_states, value_states, *args, **kwargs):
            self.was_read = True
            return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


class ResponseScorer(torch.nn.Module):
    """`score_responses` as a module, the unit the trainer wraps in DDP/FSDP.

    DDP's gradient synchronization is armed in its wrapper's `forward`; scoring goes through the
    decoder and then the LM-head weight directly (fused op), so the whole computation must live
    inside one module's forward for the wrapper to see it.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(
        self, prompt_ids, prompt_mask, response_ids, response_mask, temperature: float = 1.0, return_grad_norm=False
    ):
        return score_responses(
            self.model,
            prompt_ids,
            prompt_mask,
            response_ids,
            response_mask,
            temperature,
            return_grad_norm=return_grad_norm,
        )
