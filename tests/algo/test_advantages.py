import math

import pytest
import torch
from torch.testing import assert_close

from forkrl.algo.advantages import compute_advantages


class TestGroupAdvantages:
    # Two groups of G = 4. Group 0 has rewards [1, 0, 0, 1]: mean 0.5, unbiased variance
    # (4 · 0.25) / 3 = 1/3, so std = 1/√3. Group 1 is all correct: zero variance.
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])

    def test_grpo(self):
        out = compute_advantages(self.rewards, group_size=4, estimator="grpo", std_eps=0.0)
        a = 0.5 * math.sqrt(3.0)  # 0.5 / (1/√3) = 0.866…
        assert_close(out.advantages, torch.tensor([a, -a, -a, a, 0.0, 0.0, 0.0, 0.0]))
        assert out.zero_variance.tolist() == [False, True]

    def test_grpo_std_eps(self):
        # eps is added to the std: 0.5 / (1/√3 + 0.1)
        out = compute_advantages(self.rewards[:4], group_size=4, estimator="grpo", std_eps=0.1)
        assert_close(out.advantages[0], torch.tensor(0.5 / (1 / math.sqrt(3.0) + 0.1)))

    def test_dr_grpo_has_no_std(self):
        out = compute_advantages(self.rewards, group_size=4, estimator="dr_grpo")
        assert_close(out.advantages, torch.tensor([0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0]))

    def test_rloo_is_leave_one_out(self):
        # A correct answer: 1 − mean(0, 0, 1) = 2/3; a wrong one: 0 − mean(1, 0, 1) = −2/3.
        out = compute_advantages(self.rewards, group_size=4, estimator="rloo")
        t = 2.0 / 3.0
        assert_close(out.advantages, torch.tensor([t, -t, -t, t, 0.0, 0.0, 0.0, 0.0]))

    def test_zero_variance_groups_are_exactly_zero(self):
        rewards = torch.tensor([0.3, 0.3, 0.3, -1.0, 2.0, 5.0])
        out = compute_advantages(rewards, group_size=3, estimator="grpo")
        assert out.zero_variance.tolist() == [True, False]
        assert out.advantages[:3].tolist() == [0.0, 0.0, 0.0]

    def test_bad_inputs(self):
        with pytest.raises(ValueError, match="unknown advantage estimator 'ppo'"):
            compute_advantages(self.rewards, 4, estimator="ppo")
        with pytest.raises(ValueError, match="group_size must be >= 2"):
            compute_advantages(self.rewards, 1)
        with pytest.raises(ValueError, match="multiple of group_size=3"):
            compute_advantages(self.rewards, 3)
