"""The sampler–trainer mismatch: its metrics, truncated (TIS) and masked (MIS) importance sampling.

Hand values use four tokens whose ratios π_old/π_sampler are 1.5, 0.6, 3.0 and 0.4 (δ = log ratio):
- TIS with C = 2 weights them min(ratio, 2) = 1.5, 0.6, 2.0, 0.4;
- MIS with C = 2 keeps ratios in [1/2, 2]: the first two;
- |δ| = 0.405465, 0.510826, 1.098612, 0.916291 (mean 0.732799);
- k3 = e^δ − 1 − δ = 0.094535, 0.110826, 0.901388, 0.316291 (mean 0.355760);
- outside [1/2, 2]: 3.0 and 0.4, a fraction of 0.5.
"""

import math

import pytest
import torch
from torch.testing import assert_close

from forkrl.algo.losses import (
    LossConfig,
    LossDenominators,
    PolicyLossInput,
    compute_policy_loss,
    mis_keep,
    mismatch_metrics,
    resolve_rollout_correction,
    tis_weights,
)

RATIOS = torch.tensor([[1.5, 0.6, 3.0, 0.4]])
SAMPLER = torch.log(torch.tensor([[0.2, 0.5, 0.1, 0.5]]))
OLD = SAMPLER + torch.log(RATIOS)
MASK = torch.ones(1, 4, dtype=torch.long)


def test_tis_weights_are_truncated_ratios_without_gradient():
    old = OLD.clone().requires_grad_(True)
    weights = tis_weights(old, SAMPLER, threshold=2.0)
    assert_close(weights, torch.tensor([[1.5, 0.6, 2.0, 0.4]]))
    assert not weights.requires_grad


def test_mis_keeps_ratios_within_the_band():
    assert mis_keep(OLD, SAMPLER, 2.0).tolist() == [[True, True, False, False]]
    assert mis_keep(OLD, SAMPLER, 3.5).tolist() == [[True, True, True, True]]


def test_mismatch_metrics_by_hand():
    metrics = mismatch_metrics(OLD, SAMPLER, MASK)
    value = {k: (s / c).item() for k, (s, c) in metrics.items()}
    assert value["rollout_mismatch_abs_mean"] == pytest.approx(0.732799, abs=1e-5)
    assert value["rollout_mismatch_kl_k3"] == pytest.approx(0.355760, abs=1e-5)
    assert value["rollout_mismatch_ratio_out_frac"] == pytest.approx(0.5)


def test_mismatch_metrics_ignore_padding():
    mask = torch.tensor([[1, 1, 0, 0]])
    metrics = mismatch_metrics(OLD, SAMPLER, mask)
    s, c = metrics["rollout_mismatch_abs_mean"]
    assert c.item() == 2
    assert s.item() == pytest.approx(0.405465 + 0.510826, abs=1e-5)
    assert metrics["rollout_mismatch_ratio_out_frac"][0].item() == 0


def _loss(correction: str):
    # On-policy (π_old = π_θ, ratio 1): the clipped surrogate of each token is −A = −1, all tokens kept,
    # kept-tokens normalizer over N = 4 tokens.
    logp = OLD.clone().requires_grad_(True)
    inp = PolicyLossInput(
        logprobs=logp,
        old_logprobs=logp.detach(),
        advantages=torch.ones(1),
        response_mask=MASK,
        sampler_logprobs=SAMPLER,
    )
    cfg = LossConfig(rollout_correction=correction, rollout_correction_threshold=2.0)
    out = compute_policy_loss(inp, cfg, LossDenominators(num_tokens=4, num_kept=4, num_sequences=1))
    out.loss.backward()
    return out, logp.grad


def test_tis_weights_each_token_of_the_loss():
    out, grad = _loss("tis")
    # loss = −(1.5 + 0.6 + 2.0 + 0.4) / 4; d loss / d log π_t = −w_t / 4.
    assert out.loss.item() == pytest.approx(-1.125, abs=1e-6)
    assert_close(grad, torch.tensor([[-0.375, -0.15, -0.5, -0.1]]))
    s, c = out.metrics["rollout_tis_weight_mean"]
    assert (s / c).item() == pytest.approx(1.125, abs=1e-6)


def test_no_correction_leaves_the_loss():
    out, grad = _loss("none")
    assert out.loss.item() == pytest.approx(-1.0, abs=1e-6)
    assert_close(grad, torch.full((1, 4), -0.25))
    assert "rollout_tis_weight_mean" not in out.metrics


def test_auto_resolves_to_the_backends_default():
    assert resolve_rollout_correction("auto", "tis") == "tis"
    assert resolve_rollout_correction("auto", "none") == "none"
    assert resolve_rollout_correction("mis", "tis") == "mis"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rollout_correction": "is"}, "unknown rollout_correction 'is'"),
        ({"rollout_correction_threshold": 1.0}, "rollout_correction_threshold must be > 1"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LossConfig(**kwargs)


def test_log_two_band_matches_the_metric():
    # A ratio just inside 2 is kept by MIS with C = 2 and not counted outside [1/2, 2].
    old = SAMPLER + math.log(1.999)
    assert mis_keep(old, SAMPLER, 2.0).all()
    assert mismatch_metrics(old, SAMPLER, MASK)["rollout_mismatch_ratio_out_frac"][0].item() == 0
