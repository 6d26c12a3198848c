"""EntropyAwareTemperature divides each row by T_high or T_low according to its raw entropy."""

import math

import torch
from transformers import TemperatureLogitsWarper

from forkrl.rollout import EntropyAwareTemperature, entropy_of_logits


def test_entropy_of_logits_hand_values():
    # Uniform over 4 tokens: H = ln 4. A -inf entry is a zero-probability token and must add 0,
    # so [0, 0, -inf] has the entropy of a fair coin, ln 2.
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, float("-inf"), float("-inf")]])
    torch.testing.assert_close(entropy_of_logits(logits), torch.tensor([math.log(4), math.log(2)]))


def test_rows_above_threshold_use_t_high_and_below_use_t_low():
    # Row 0 is uniform over 4 tokens: H = ln 4 ≈ 1.386 > h = 0.672 -> divided by T_high = 2.
    # Row 1 puts almost all mass on one token: p = softmax([8, 0, 0, 0]) has H ≈ 0.0036 < h
    # -> divided by T_low = 0.5 (i.e. multiplied by 2).
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0], [8.0, 0.0, 0.0, 0.0]])
    proc = EntropyAwareTemperature(t_low=0.5, t_high=2.0, threshold=0.672)
    out = proc(torch.zeros(2, 1, dtype=torch.long), logits)
    expected = torch.tensor([[0.5, 0.5, 0.5, 0.5], [16.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(proc.temperatures(logits), torch.tensor([2.0, 0.5]))


def test_equal_temperatures_match_plain_temperature():
    logits = torch.randn(3, 11, generator=torch.Generator().manual_seed(0))
    ids = torch.zeros(3, 1, dtype=torch.long)
    out = EntropyAwareTemperature(t_low=0.7, t_high=0.7, threshold=1.0)(ids, logits)
    torch.testing.assert_close(out, TemperatureLogitsWarper(0.7)(ids, logits.clone()))
