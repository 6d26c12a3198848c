"""Policy losses (DAPO clip-higher, Clip-Cov, KL-Cov) and loss normalizers as registered functions.

A micro-batch's loss is Σ_t c_t · L_t: the policy loss gives the per-token term L_t and the
normalizer gives the per-token coefficient c_t. The coefficients divide by sums over the whole
optimizer-step batch (all micro-batches, all processes; `LossDenominators`), so summing the
micro-batch gradients — and DDP averaging across processes — gives exactly the full-batch
gradient, whatever the split.

Forking-token selection (paper Eq. 6) enters as `kept_mask`: unkept tokens get c_t = 0, and
the `kept-tokens` normalizer divides by the number of kept tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from forkrl.distributed import all_reduce_sum, world_size
from forkrl.metrics import MetricTerms
from forkrl.ops.covariance import rank_descending, token_covariance
from forkrl.registry import Registry


@dataclass
class LossConfig:
    """How the per-token policy loss is formed and normalized."""

    policy_loss: str = "clip"
    """Per-token policy loss: `clip` (PPO/DAPO clipped surrogate), `clip_cov` or `kl_cov`."""
    eps_low: float = 0.2
    """Lower clip range: the ratio is clipped below at 1 − eps_low (DAPO: 0.2)."""
    eps_high: float = 0.28
    """Upper clip range (clip-higher): the ratio is clipped above at 1 + eps_high (DAPO: 0.28)."""
    dual_clip: float | None = None
    """Dual-clip constant c > 1: for A < 0 the loss is capped at −c·A. None disables it."""
    normalizer: str = "kept-tokens"
    """Denominator of the loss: `kept-tokens` (paper Eq. 6), `all-tokens` (DAPO Eq. 4, TRL),
    `seq-mean-token-mean`, `seq-mean-token-sum`, `constant` (Dr.GRPO)."""
    normalizer_constant: float | None = None
    """For `constant`: tokens per sequence in the denominator (Dr.GRPO uses the max response length)."""
    clip_cov_ratio: float = 2e-4
    """Clip-Cov: fraction of response tokens whose gradient is stopped (at least one)."""
    clip_cov_lb: float = 1.0
    """Clip-Cov: lower covariance bound of the candidate band."""
    clip_cov_ub: float = 5.0
    """Clip-Cov: upper covariance bound of the candidate band."""
    kl_cov_ratio: float = 2e-3
    """KL-Cov: fraction of response tokens (largest covariance) that get the KL penalty (at least one)."""
    kl_cov_coef: float = 1.0
    """KL-Cov: coefficient β of the penalty β·|log π_θ − log π_old|."""
    ref_kl_coef: float = 0.0
    """Coefficient of the k3 KL to a reference policy (0 = off, the papers' setting)."""
    entropy_coef: float = 0.0
    """Coefficient of the entropy bonus (0 = off, the papers' setting)."""
    rollout_correction: str = "auto"
    """Correction for the sampler–trainer mismatch (an engine samples π_sampler, slightly off the
    trainer's π_old): `none`; `tis` (truncated importance sampling: each token's loss weighted by
    min(π_old/π_sampler, C), detached, as verl and TRL); `mis` (masked: tokens whose ratio lies
    outside [1/C, C] leave the loss and its normalizer); `auto`: the backend's default (`hf`: none,
    its sampler is the trainer's forward; `vllm`: tis)."""
    rollout_correction_threshold: float = 2.0
    """C of `tis` / `mis` (> 1)."""

    def __post_init__(self) -> None:
        POLICY_LOSSES.get(self.policy_loss)
        NORMALIZERS.get(self.normalizer)
        if self.normalizer == "constant" and not (self.normalizer_constant and self.normalizer_constant > 0):
            raise ValueError("normalizer 'constant' needs normalizer_constant > 0 (e.g. the max response length)")
        if self.eps_low < 0 or self.eps_high < 0:
            raise ValueError(f"eps_low and eps_high must be >= 0, got {self.eps_low} and {self.eps_high}")
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1 (or None), got {self.dual_clip}")
        if self.rollout_correction not in ROLLOUT_CORRECTIONS:
            raise ValueError(
                f"unknown rollout_correction {self.rollout_correction!r}; expected one of {sorted(ROLLOUT_CORRECTIONS)}"
            )
        if not self.rollout_correction_threshold > 1.0:
            raise ValueError(f"rollout_correction_threshold must be > 1, got {self.rollout_correction_threshold}")
        for name in ("clip_cov_ratio", "kl_cov_ratio"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")


@dataclass
class PolicyLossInput:
    """One micro-batch of response tokens. All tensors `[B, T]` unless noted."""

    logprobs: torch.Tensor
    """log π_θ of the sampled tokens under the policy being trained (carries gradient)."""
    old_logprobs: torch.Tensor
    """log π_θold of the sampled tokens (no gradient)."""
    advantages: torch.Tensor
    """`[B]` (one per response) or `[B, T]`."""
    response_mask: torch.Tensor
    """1 for response tokens, 0 for padding."""
    kept_mask: torch.Tensor | None = None
    """Tokens selected for the policy-gradient term (forking tokens); None keeps every token."""
    entropy: torch.Tensor | None = None
    """Token entropy under π_θ; needed for the entropy bonus and the entropy metrics."""
    ref_logprobs: torch.Tensor | None = None
    """log π_ref of the sampled tokens; needed when `ref_kl_coef > 0`."""
    sampler_logprobs: torch.Tensor | None = None
    """log π_sampler of the sampled tokens, as the generation backend drew them; gives the `tis`
    weights (None: no correction)."""


@dataclass
class LossDenominators:
    """Sums over the whole optimizer-step batch (all micro-batches on all processes)."""

    num_tokens: float
    """Valid response tokens."""
    num_kept: float
    """Tokens the selection keeps (known from the counts alone: exactly ⌈ρ·N⌉ per selection unit)."""
    num_sequences: float
    """Responses with at least one valid token."""
    dp_world_size: int = 1
    """Data-parallel processes. DDP/FSDP average gradients over ranks, so each rank's loss is
    multiplied by this to turn that average back into the sum the denominators assume."""


def loss_denominators(micro_batch_masks: Sequence[torch.Tensor], num_kept: float, group=None) -> LossDenominators:
    """Denominators for one optimizer step from the response masks of its micro-batches on this rank
    and the step's kept count over all processes (`forkrl.algo.selection.MiniBatchSelection.num_kept`)."""
    # One host copy for all micro-batches (this runs once per optimizer step, not per micro-batch).
    stats = torch.stack([torch.stack([m.sum(), (m.sum(dim=-1) > 0).sum()]) for m in micro_batch_masks])
    totals = stats.to(torch.float64).sum(dim=0)
    all_reduce_sum(totals, group)
    num_tokens, num_sequences = totals.tolist()
    return LossDenominators(
        num_tokens=num_tokens, num_kept=num_kept, num_sequences=num_sequences, dp_world_size=world_size(group)
    )


# ---------------------------------------------------------------------------------------------
# Normalizers: per-token coefficients c_t with loss = Σ_t c_t · L_t.
# `weights` is the float mask of tokens in the term (kept tokens for the policy term, all valid
# tokens for the regularizers); `n_weighted` is its whole-batch count.

NormalizerFn = Callable[[torch.Tensor, torch.Tensor, LossDenominators, float, LossConfig], torch.Tensor]
NORMALIZERS: Registry[NormalizerFn] = Registry("normalizer")


def register_normalizer(name: str) -> Callable[[NormalizerFn], NormalizerFn]:
    """Register `fn(weights, response_mask, denominators, n_weighted, cfg) -> c [B, T]` under `name`."""
    return NORMALIZERS.register(name)


@register_normalizer("kept-tokens")
def _kept_tokens(weights, response_mask, d, n_weighted, cfg):
    """Paper Eq. 6: average over the tokens that carry gradient."""
    return weights / max(n_weighted, 1.0)


@register_normalizer("all-tokens")
def _all_tokens(weights, response_mask, d, n_weighted, cfg):
    """DAPO Eq. 4 (and TRL's top-entropy choice): average over all response tokens."""
    return weights / max(d.num_tokens, 1.0)


@register_normalizer("seq-mean-token-mean")
def _seq_mean_token_mean(weights, response_mask, d, n_weighted, cfg):
    """GRPO's original: mean over each response's valid tokens, then mean over responses."""
    per_seq = response_mask.sum(dim=-1, keepdim=True).clamp_min(1.0)
    return weights / (per_seq * max(d.num_sequences, 1.0))


@register_normalizer("seq-mean-token-sum")
def _seq_mean_token_sum(weights, response_mask, d, n_weighted, cfg):
    """Sum over each response's tokens, mean over responses."""
    return weights / max(d.num_sequences, 1.0)


@register_normalizer("constant")
def _constant(weights, response_mask, d, n_weighted, cfg):
    """Dr.GRPO: sum over tokens divided by (responses × a constant length), no length bias."""
    return weights / (max(d.num_sequences, 1.0) * cfg.normalizer_constant)


def token_coefficients(
    cfg: LossConfig, response_mask: torch.Tensor, d: LossDenominators, kept_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """`[B, T]` coefficients c_t of the policy term (kept_mask given) or of a regularizer (None)."""
    mask = response_mask.to(torch.float32)
    if kept_mask is None:
        weights, n_weighted = mask, d.num_tokens
    else:
        weights, n_weighted = mask * kept_mask.to(torch.float32), d.num_kept
    return NORMALIZERS[cfg.normalizer](weights, mask, d, n_weighted, cfg) * d.dp_world_size


# ---------------------------------------------------------------------------------------------
# Policy losses: per-token loss L_t `[B, T]` (to be minimized) plus metric terms.


@dataclass
class TokenLoss:
    per_token: torch.Tensor
    """`[B, T]` loss of every token before normalization (garbage at padding; c_t = 0 there)."""
    metrics: MetricTerms


PolicyLossFn = Callable[[PolicyLossInput, torch.Tensor, LossConfig, "torch.Generator | None"], TokenLoss]
POLICY_LOSSES: Registry[PolicyLossFn] = Registry("policy_loss")


def register_policy_loss(name: str) -> Callable[[PolicyLossFn], PolicyLossFn]:
    """Register `fn(inputs, advantages [B, T], cfg, generator) -> TokenLoss` under `name`."""
    return POLICY_LOSSES.register(name)


def _clipped_surrogate(log_ratio: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, cfg: LossConfig):
    """−min(r·A, clip(r, 1−ε_low, 1+ε_high)·A), optionally dual-clipped.

    Returns (loss `[B, T]`, clip_active `[B, T]` bool: the ratio clip binds, metric terms).
    """
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
    loss = torch.maximum(unclipped, clipped)
    clip_active = (clipped > unclipped) & mask
    n = mask.sum()
    terms: MetricTerms = {
        "clip_frac_high": ((clip_active & (adv > 0)).sum(), n),
        "clip_frac_low": ((clip_active & (adv < 0)).sum(), n),
    }
    if cfg.dual_clip is not None:
        cap = -adv * cfg.dual_clip
        dual_active = (adv < 0) & (loss > cap)
        loss = torch.where(dual_active, cap, loss)
        terms["clip_frac_dual"] = ((dual_active & mask).sum(), n)
    return loss, clip_active, terms


def _pick_random(candidates: torch.Tensor, count: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """`count` (a tensor, no host sync) random elements of the boolean `candidates`, or all if fewer."""
    keys = torch.rand(candidates.shape, generator=generator, device=candidates.device)
    keys = torch.where(candidates, keys, torch.full_like(keys, -1.0))
    ranks = rank_descending(keys.reshape(-1)).view(candidates.shape)
    return candidates & (ranks < count)


@register_policy_loss("clip")
def clip_loss(inp: PolicyLossInput, adv, cfg, generator) -> TokenLoss:
    """DAPO token-level clipped surrogate with clip-higher (paper Eq. 4)."""
    mask = inp.response_mask.bool()
    loss, _, terms = _clipped_surrogate(inp.logprobs - inp.old_logprobs, adv, mask, cfg)
    return TokenLoss(loss, terms)


@register_policy_loss("clip_cov")
def clip_cov_loss(inp: PolicyLossInput, adv, cfg, generator) -> TokenLoss:
    """Clip-Cov: stop the gradient of a random few tokens whose covariance lies in (lb, ub).

    As in the authors' code: tokens already clipped by the ratio clip are not candidates, and
    max(1, ⌊ratio·N⌋) tokens are picked, N the micro-batch's response tokens. Candidates are
    restricted to kept (forking) tokens, since stopping an unkept token's gradient does nothing.
    """
    mask = inp.response_mask.bool()
    loss, clip_active, terms = _clipped_surrogate(inp.logprobs - inp.old_logprobs, adv, mask, cfg)
    cov = token_covariance(adv, inp.logprobs, mask)
    eligible = mask & ~clip_active & (cov > cfg.clip_cov_lb) & (cov < cfg.clip_cov_ub)
    if inp.kept_mask is not None:
        eligible &= inp.kept_mask.bool()
    count = torch.clamp(torch.floor(cfg.clip_cov_ratio * mask.sum()), min=1)
    stopped = _pick_random(eligible, count, generator)
    loss = torch.where(stopped, loss.detach() * 0.0, loss)
    terms["clip_cov_frac"] = (stopped.sum(), mask.sum())
    return TokenLoss(loss, terms)


@register_policy_loss("kl_cov")
def kl_cov_loss(inp: PolicyLossInput, adv, cfg, generator) -> TokenLoss:
    """KL-Cov: unclipped surrogate −r·A, plus β·|log π_θ − log π_old| on the top-k covariance tokens.

    k = max(1, ⌊ratio·N⌋) as in the authors' code; ranking is among kept tokens. With one
    fully on-policy update the penalty is 0 (log π_θ = log π_old) and this is plain −r·A.
    """
    mask = inp.response_mask.bool()
    log_ratio = inp.logprobs - inp.old_logprobs
    loss = -adv * torch.exp(log_ratio)
    eligible = mask if inp.kept_mask is None else mask & inp.kept_mask.bool()
    cov = token_covariance(adv, inp.logprobs, mask)
    cov = torch.where(eligible, cov, torch.full_like(cov, float("-inf")))
    count = torch.clamp(torch.floor(cfg.kl_cov_ratio * mask.sum()), min=1)
    penalized = eligible & (rank_descending(cov.reshape(-1)).view(cov.shape) < count)
    loss = loss + torch.where(penalized, cfg.kl_cov_coef * log_ratio.abs(), torch.zeros_like(loss))
    zero = torch.zeros((), device=loss.device)
    n = mask.sum()
    terms: MetricTerms = {
        "clip_frac_high": (zero, n),
        "clip_frac_low": (zero, n),
        "kl_cov_frac": (penalized.sum(), n),
    }
    return TokenLoss(loss, terms)


# ---------------------------------------------------------------------------------------------
# The sampler–trainer mismatch: δ_t = log π_old(o_t) − log π_sampler(o_t) per response token.

ROLLOUT_CORRECTIONS = ("auto", "none", "tis", "mis")


def resolve_rollout_correction(setting: str, backend_default: str) -> str:
    """`none`, `tis` or `mis`: the setting, or the backend's default for `auto`."""
    return backend_default if setting == "auto" else setting


def tis_weights(old_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, threshold: float) -> torch.Tensor:
    """`[B, T]` truncated importance weights min(π_old/π_sampler, C), detached (no gradient)."""
    return torch.exp(old_logprobs.detach() - sampler_logprobs).clamp(max=threshold)


def mis_keep(old_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, threshold: float) -> torch.Tensor:
    """`[B, T]` bool: tokens whose ratio π_old/π_sampler lies in [1/C, C] (the others are masked)."""
    delta = old_logprobs.detach() - sampler_logprobs
    bound = math.log(threshold)
    return (delta >= -bound) & (delta <= bound)


def mismatch_metrics(old_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, mask: torch.Tensor) -> MetricTerms:
    """Per-token means over `mask` of |δ|, the k3 estimate of KL(sampler ‖ old) = e^δ − 1 − δ, and the
    fraction of tokens with e^δ outside [1/2, 2]; `rollout_mismatch_abs_max` is a max (count None
    is not used: the caller reduces it with `MetricSums.add_max`)."""
    delta = (old_logprobs.detach() - sampler_logprobs).float()
    mask = mask.bool()
    n = mask.sum()
    zero = torch.zeros_like(delta)
    absolute = torch.where(mask, delta.abs(), zero)
    k3 = torch.where(mask, torch.exp(delta) - 1.0 - delta, zero)
    outside = mask & (delta.abs() > math.log(2.0))
    return {
        "rollout_mismatch_abs_mean": (absolute.sum(), n),
        "rollout_mismatch_kl_k3": (k3.sum(), n),
        "rollout_mismatch_ratio_out_frac": (outside.sum(), n),
    }


@dataclass
class LossOutput:
    loss: torch.Tensor
    """Scalar to call `.backward()` on; micro-batch losses of one step add up to the step's loss."""
    metrics: MetricTerms


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(π_θ ‖ π_ref): exp(δ) − δ − 1 with δ = log π_ref − log π_θ (≥ 0)."""
    delta = torch.clamp(ref_logprobs - logprobs, -20.0, 20.0)
    return torch.exp(delta) - delta - 1.0


def compute_policy_loss(
    inp: PolicyLossInput,
    cfg: LossConfig,
    denominators: LossDenominators,
    generator: torch.Generator | None = None,
) -> LossOutput:
    """Loss of one micro-batch: normalized policy term + optional reference KL and entropy bonus."""
    mask = inp.response_mask.bool()
    adv = inp.advantages.to(inp.logprobs.dtype)
    if adv.dim() == 1:
        adv = adv[:, None].expand_as(inp.logprobs)
    token_loss = POLICY_LOSSES[cfg.policy_loss](inp, adv, cfg, generator)
    coeff = token_coefficients(cfg, mask, denominators, inp.kept_mask)
    per_token = token_loss.per_token
    metrics = dict(token_loss.metrics)
    if inp.sampler_logprobs is not None:
        if cfg.rollout_correction == "tis":
            weights = tis_weights(inp.old_logprobs, inp.sampler_logprobs, cfg.rollout_correction_threshold)
            per_token = per_token * weights
            metrics["rollout_tis_weight_mean"] = ((weights * mask).sum(), mask.sum())
    loss = (coeff * per_token).sum()

    n = mask.sum()
    log_ratio = (inp.logprobs - inp.old_logprobs).detach()
    metrics["approx_kl_old"] = ((k3_kl(inp.old_logprobs.detach(), inp.logprobs.detach()) * mask).sum(), n)
    cov = token_covariance(adv, inp.logprobs, mask)
    metrics["cov_mean"] = (cov.sum(), n)
    metrics["cov_pos_frac"] = (((cov > 0) & mask).sum(), n)
    metrics["ratio_mean"] = ((torch.exp(log_ratio) * mask).sum(), n)
    kept = mask if inp.kept_mask is None else mask & inp.kept_mask.bool()
    metrics["kept_frac"] = (kept.sum(), n)

    if cfg.ref_kl_coef or cfg.entropy_coef:
        reg_coeff = token_coefficients(cfg, mask, denominators)
    if cfg.ref_kl_coef:
        if inp.ref_logprobs is None:
            raise ValueError("ref_kl_coef > 0 needs ref_logprobs in the loss input")
        kl = k3_kl(inp.logprobs, inp.ref_logprobs)
        loss = loss + cfg.ref_kl_coef * (reg_coeff * kl).sum()
        metrics["kl_ref"] = ((kl.detach() * mask).sum(), n)
    if inp.entropy is not None:
        ent = inp.entropy.to(torch.float32)
        metrics["entropy"] = ((ent.detach() * mask).sum(), n)
        metrics["entropy_kept"] = ((ent.detach() * kept).sum(), kept.sum())
        if cfg.entropy_coef:
            loss = loss - cfg.entropy_coef * (reg_coeff * ent).sum()
    elif cfg.entropy_coef:
        raise ValueError("entropy_coef > 0 needs entropy in the loss input")
    # Totals (count None): summed over micro-batches and processes, e.g. the step's loss value.
    metrics["loss"] = (loss.detach() / denominators.dp_world_size, None)
    return LossOutput(loss=loss, metrics=metrics)
