import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from forkrl.algo.losses import (
    LossConfig,
    LossDenominators,
    PolicyLossInput,
    compute_policy_loss,
    loss_denominators,
)
from forkrl.algo.selection import TokenSelector
from forkrl.metrics import MetricSums
from forkrl.ops.token_ranking import select_tokens
from tests.dist_utils import run_distributed


def two_sequence_batch():
    """Two responses, T = 3; the second has one padding token.

    old log-probs are 0, so the ratios r = exp(logp) are the numbers below.
      seq 0, A = +1: r = 1.0 -> L = −1; r = 1.5 -> clipped at 1.28, L = −1.28; r = 0.5 -> L = −0.5
      seq 1, A = −1: r = 0.5 -> clipped at 0.8, L = +0.8; r = 2.0 -> L = +2.0; (padding)
    Kept (forking) tokens: (0,0), (0,1), (1,1), so kept L = −1, −1.28, +2.0 (sum −0.28).
    """
    ratios = torch.tensor([[1.0, 1.5, 0.5], [0.5, 2.0, 1.0]], dtype=torch.float64)
    logprobs = ratios.log().requires_grad_(True)
    return PolicyLossInput(
        logprobs=logprobs,
        old_logprobs=torch.zeros(2, 3, dtype=torch.float64),
        advantages=torch.tensor([1.0, -1.0]),
        response_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]),
        kept_mask=torch.tensor([[True, True, False], [False, True, False]]),
    )


DENOMS = LossDenominators(num_tokens=5, num_kept=3, num_sequences=2)


class TestNormalizers:
    @pytest.mark.parametrize(
        "normalizer, expected",
        [
            ("kept-tokens", -0.28 / 3),  # paper Eq. 6: divide by the 3 kept tokens
            ("all-tokens", -0.28 / 5),  # DAPO / TRL: divide by all 5 response tokens
            # per sequence: (−1 − 1.28)/3 valid tokens = −0.76 and 2.0/2 = 1.0; mean over 2
            ("seq-mean-token-mean", (-0.76 + 1.0) / 2),
            ("seq-mean-token-sum", (-2.28 + 2.0) / 2),
            ("constant", -0.28 / (2 * 4)),  # Dr.GRPO with a constant length of 4
        ],
    )
    def test_two_sequence_loss(self, normalizer, expected):
        cfg = LossConfig(normalizer=normalizer, normalizer_constant=4.0)
        out = compute_policy_loss(two_sequence_batch(), cfg, DENOMS)
        assert_close(out.loss.double(), torch.tensor(expected, dtype=torch.float64))

    def test_all_tokens_without_selection(self):
        # No kept mask: all five L summed (0.02) over the five tokens.
        inp = two_sequence_batch()
        inp.kept_mask = None
        cfg = LossConfig(normalizer="all-tokens")
        out = compute_policy_loss(inp, cfg, LossDenominators(5, 5, 2))
        assert_close(out.loss.double(), torch.tensor(0.02 / 5, dtype=torch.float64))

    def test_gradient_only_on_kept_unclipped_tokens(self):
        # d(−A·r)/dlogp = −A·r. Kept unclipped tokens: (0,0): −1·1 = −1; (1,1): +1·2 = 2.
        # (0,1) is clipped (no gradient); the rest are not kept. Kept-token normalizer: /3.
        inp = two_sequence_batch()
        compute_policy_loss(inp, LossConfig(), DENOMS).loss.backward()
        expected = torch.tensor([[-1 / 3, 0.0, 0.0], [0.0, 2 / 3, 0.0]], dtype=torch.float64)
        assert_close(inp.logprobs.grad, expected)

    def test_clip_metrics(self):
        # One clip-high token (0,1) and one clip-low token (1,0) among 5 valid tokens.
        sums = MetricSums()
        sums.update(compute_policy_loss(two_sequence_batch(), LossConfig(), DENOMS).metrics)
        m = sums.compute()
        assert m["clip_frac_high"] == pytest.approx(0.2)
        assert m["clip_frac_low"] == pytest.approx(0.2)
        assert m["kept_frac"] == pytest.approx(0.6)
        assert m["loss"] == pytest.approx(-0.28 / 3)

    def test_dual_clip(self):
        # Dual clip c = 1.5 caps token (1,1) (A = −1, r = 2): L = min(2.0, 1.5) = 1.5.
        cfg = LossConfig(dual_clip=1.5)
        out = compute_policy_loss(two_sequence_batch(), cfg, DENOMS)
        assert_close(out.loss.double(), torch.tensor((-1 - 1.28 + 1.5) / 3, dtype=torch.float64))

    def test_entropy_bonus_and_ref_kl(self):
        inp = two_sequence_batch()
        inp.kept_mask = None
        inp.entropy = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 99.0]])
        # ref = logp − log 2 per token: δ = −log 2, k3 = exp(δ) − δ − 1 = 0.5 + log 2 − 1
        inp.ref_logprobs = inp.logprobs.detach() - math.log(2.0)
        cfg = LossConfig(normalizer="all-tokens", entropy_coef=0.1, ref_kl_coef=0.5)
        out = compute_policy_loss(inp, cfg, LossDenominators(5, 5, 2))
        k3 = 0.5 + math.log(2.0) - 1.0
        expected = 0.02 / 5 - 0.1 * (15.0 / 5) + 0.5 * k3
        assert_close(out.loss.double(), torch.tensor(expected, dtype=torch.float64))

    def test_config_validation(self):
        with pytest.raises(ValueError, match="unknown normalizer 'tokens'"):
            LossConfig(normalizer="tokens")
        with pytest.raises(ValueError, match="normalizer_constant"):
            LossConfig(normalizer="constant")
        with pytest.raises(ValueError, match="dual_clip must be > 1"):
            LossConfig(dual_clip=0.5)
        with pytest.raises(ValueError, match="unknown policy_loss"):
            LossConfig(policy_loss="ppo2")


def cov_batch(old_shift: float = 0.0):
    """B = 2, T = 2, all valid. A = [2, −2] per sequence: centered A = [2, 2, −2, −2].

    logp = [[−0.5, −3], [−4, −0.5]], mean −2: centered [1.5, −1, −2, 1.5].
    cov = centered A · centered logp = [[3, −2], [4, −3]].
    """
    logprobs = torch.tensor([[-0.5, -3.0], [-4.0, -0.5]], requires_grad=True)
    return PolicyLossInput(
        logprobs=logprobs,
        old_logprobs=logprobs.detach() - old_shift,
        advantages=torch.tensor([2.0, -2.0]),
        response_mask=torch.ones(2, 2),
    )


class TestCovarianceLosses:
    denoms = LossDenominators(num_tokens=4, num_kept=4, num_sequences=2)

    def test_clip_cov_stops_band_tokens(self):
        # Band (1, 5) holds cov 3 at (0,0) and cov 4 at (1,0); ratio 1 -> count 4 covers both.
        inp = cov_batch()
        cfg = LossConfig(policy_loss="clip_cov", normalizer="all-tokens", clip_cov_ratio=1.0)
        out = compute_policy_loss(inp, cfg, self.denoms)
        out.loss.backward()
        # On-policy r = 1: the gradient −A/4 survives only at (0,1) (A = 2) and (1,1) (A = −2).
        assert_close(inp.logprobs.grad, torch.tensor([[0.0, -0.5], [0.0, 0.5]]))
        sums = MetricSums()
        sums.update(out.metrics)
        assert sums.compute()["clip_cov_frac"] == pytest.approx(0.5)

    def test_clip_cov_band_bounds(self):
        # ub = 3.5 leaves only (0,0) in the band.
        inp = cov_batch()
        cfg = LossConfig(policy_loss="clip_cov", normalizer="all-tokens", clip_cov_ratio=1.0, clip_cov_ub=3.5)
        compute_policy_loss(inp, cfg, self.denoms).loss.backward()
        assert_close(inp.logprobs.grad, torch.tensor([[0.0, -0.5], [0.5, 0.5]]))

    def test_clip_cov_random_pick_count(self):
        # ratio 0.25 of 4 tokens -> exactly one of the two band tokens, chosen by the generator.
        picked = set()
        for seed in range(8):
            inp = cov_batch()
            cfg = LossConfig(policy_loss="clip_cov", normalizer="all-tokens", clip_cov_ratio=0.25)
            g = torch.Generator().manual_seed(seed)
            compute_policy_loss(inp, cfg, self.denoms, generator=g).loss.backward()
            zero = (inp.logprobs.grad == 0).nonzero().tolist()
            assert len(zero) == 1 and zero[0] in ([0, 0], [1, 0])
            picked.add(tuple(zero[0]))
        assert picked == {(0, 0), (1, 0)}

    @pytest.mark.parametrize("ratio, penalized", [(0.25, [(1, 0)]), (0.5, [(1, 0), (0, 0)])])
    def test_kl_cov_penalizes_top_covariance(self, ratio, penalized):
        # old = logp − 0.1: r = e^0.1 everywhere, |logp − old| = 0.1. Σ −A·r over tokens = 0,
        # so the loss is the penalty alone: β · 0.1 · k / 4.
        inp = cov_batch(old_shift=0.1)
        cfg = LossConfig(policy_loss="kl_cov", normalizer="all-tokens", kl_cov_ratio=ratio, kl_cov_coef=1.0)
        out = compute_policy_loss(inp, cfg, self.denoms)
        assert_close(out.loss, torch.tensor(0.1 * len(penalized) / 4))
        out.loss.backward()
        r = math.exp(0.1)
        adv = torch.tensor([[2.0, 2.0], [-2.0, -2.0]])
        expected = -adv * r
        for i, j in penalized:
            expected[i, j] += 1.0  # d|logp − old|/dlogp = +1
        assert_close(inp.logprobs.grad, expected / 4)

    def test_kl_cov_on_policy_has_no_penalty(self):
        inp = cov_batch(old_shift=0.0)
        cfg = LossConfig(policy_loss="kl_cov", normalizer="all-tokens")
        out = compute_policy_loss(inp, cfg, self.denoms)
        assert_close(out.loss, torch.tensor(0.0))

    def test_kl_cov_respects_kept_mask(self):
        # Selection keeps (0,0) and (0,1) only: the top covariance among them is (0,0) (cov 3).
        inp = cov_batch(old_shift=0.1)
        inp.kept_mask = torch.tensor([[True, True], [False, False]])
        cfg = LossConfig(policy_loss="kl_cov", normalizer="kept-tokens", kl_cov_ratio=0.25)
        out = compute_policy_loss(inp, cfg, LossDenominators(4, 2, 2))
        out.loss.backward()
        r = math.exp(0.1)
        assert_close(inp.logprobs.grad, torch.tensor([[(-2 * r + 1) / 2, -2 * r / 2], [0.0, 0.0]]))


def _random_batch(seed: int, batch: int, length: int):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    return {
        "logprobs": -torch.rand(batch, length, generator=g, dtype=torch.float64) * 3,
        "old": -torch.rand(batch, length, generator=g, dtype=torch.float64) * 3,
        "adv": torch.randn(batch, generator=g, dtype=torch.float64),
        "entropy": torch.rand(batch, length, generator=g, dtype=torch.float64) * 2,
        "mask": mask,
    }


def _grad_over_micro_batches(data, cfg, sizes, strategy, ratio):
    """Gradient of the step loss w.r.t. all log-probs, accumulated over micro-batches of `sizes`,
    with one batch-scope selection over the whole step."""
    logprobs = data["logprobs"].clone().requires_grad_(True)
    bounds = torch.tensor([0, *sizes]).cumsum(0).tolist()
    slices = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    masks = [data["mask"][s] for s in slices]
    denoms = loss_denominators(masks, TokenSelector(strategy, ratio, "batch", "current").num_kept(masks))
    kept = select_tokens(data["entropy"], data["mask"], strategy, ratio).mask
    for s in slices:
        inp = PolicyLossInput(logprobs[s], data["old"][s], data["adv"][s], data["mask"][s], kept_mask=kept[s])
        compute_policy_loss(inp, cfg, denoms).loss.backward()
    return logprobs.grad


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    batch=st.integers(2, 8),
    normalizer=st.sampled_from(["kept-tokens", "all-tokens", "seq-mean-token-mean", "seq-mean-token-sum", "constant"]),
    strategy=st.sampled_from(["top", "all", "bottom"]),
    data=st.data(),
)
def test_gradient_invariant_to_micro_batch_split(seed, batch, normalizer, strategy, data):
    """With batch-scope selection the gradient does not depend on how the step is split."""
    cfg = LossConfig(normalizer=normalizer, normalizer_constant=6.0)
    d = _random_batch(seed, batch, 6)
    cut = data.draw(st.integers(1, batch - 1))
    whole = _grad_over_micro_batches(d, cfg, [batch], strategy, 0.3)
    split = _grad_over_micro_batches(d, cfg, [cut, batch - cut], strategy, 0.3)
    assert_close(split, whole, rtol=1e-10, atol=1e-12)


def test_microbatch_scope_counts_kept_per_micro_batch():
    # Two micro-batches of 3 and 7 valid tokens at ρ = 0.2: ⌈0.6⌉ + ⌈1.4⌉ = 1 + 2 = 3 kept,
    # while one batch-scope selection over 10 tokens keeps ⌈2.0⌉ = 2.
    masks = [torch.tensor([[1, 1, 1, 0]]), torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])]
    assert TokenSelector("top", 0.2, "microbatch", "current").num_kept(masks) == 3
    d = loss_denominators(masks, TokenSelector("top", 0.2, "batch", "current").num_kept(masks))
    assert (d.num_kept, d.num_tokens, d.num_sequences) == (2, 10, 3)
    with pytest.raises(ValueError, match="unknown selection scope 'device'; registered: "):
        TokenSelector("top", 0.2, "device", "current")


def _policy_grad_on_rank(rank, world_size, data, normalizer, scope):
    """Simulate data parallelism: a context-free policy θ (logits over 5 token ids) is shared;
    each rank holds half the sequences, computes its loss, and gradients are averaged as DDP does."""
    torch.manual_seed(0)
    theta = torch.linspace(-1.0, 1.0, 5, dtype=torch.float64).requires_grad_(True)
    rows = slice(rank * data["ids"].shape[0] // world_size, (rank + 1) * data["ids"].shape[0] // world_size)
    ids, mask, ent = data["ids"][rows], data["mask"][rows], data["entropy"][rows]
    group = torch.distributed.group.WORLD if world_size > 1 else None
    logprobs = torch.log_softmax(theta, dim=0)[ids]
    kept = select_tokens(ent, mask, "top", 0.3, group=group if scope == "global" else None).mask
    cfg = LossConfig(normalizer=normalizer, normalizer_constant=6.0)
    denoms = loss_denominators([mask], TokenSelector("top", 0.3, scope, "current", group).num_kept([mask]), group)
    inp = PolicyLossInput(logprobs, logprobs.detach() + 0.05, data["adv"][rows], mask, kept_mask=kept)
    compute_policy_loss(inp, cfg, denoms).loss.backward()
    grad = theta.grad.clone()
    if world_size > 1:
        torch.distributed.all_reduce(grad)
        grad /= world_size  # what DDP does
    return grad


@pytest.mark.parametrize("normalizer", ["kept-tokens", "all-tokens", "seq-mean-token-mean", "constant"])
def test_normalizer_across_two_processes(normalizer):
    g = torch.Generator().manual_seed(3)
    lengths = torch.tensor([6, 2, 5, 1, 4, 6])
    data = {
        "ids": torch.randint(0, 5, (6, 6), generator=g),
        "mask": (torch.arange(6)[None, :] < lengths[:, None]).long(),
        "entropy": torch.rand(6, 6, generator=g),
        "adv": torch.randn(6, generator=g, dtype=torch.float64),
    }
    single = _policy_grad_on_rank(0, 1, data, normalizer, "batch")
    two = run_distributed(_policy_grad_on_rank, 2, data, normalizer, "global")
    for grad in two:
        assert_close(grad, single, rtol=1e-10, atol=1e-12)
