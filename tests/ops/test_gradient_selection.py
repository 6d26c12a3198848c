"""The `gradient` selection strategy: ‖∂ log π(o_t)/∂z_t‖₂ from the fused op, against autograd, and the
tokens it keeps, against a brute-force top-k of autograd's norms."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from forkrl.models import build_tiny_model, build_tiny_tokenizer
from forkrl.models.loading import forward_hidden_states
from forkrl.models.scoring import score_responses
from forkrl.ops.logprobs import fused_linear_logprobs_and_entropy, token_logprobs_and_entropy
from forkrl.ops.token_ranking import num_selected, select_tokens

F64 = torch.float64


def autograd_grad_norms(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """‖∂ log softmax(z/T)[y] / ∂z‖₂ of every row, one autograd call per row (the reference)."""
    flat, flat_targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    norms = []
    for row, target in zip(flat, flat_targets):
        z = row.detach().to(F64).requires_grad_()
        (grad,) = torch.autograd.grad(torch.log_softmax(z / temperature, -1)[target], z)
        norms.append(grad.norm())
    return torch.stack(norms).view(targets.shape)


class TestGradNormFormula:
    def test_hand_derived_two_way_tie(self):
        # V = 2, logits (0, 0), T = 1: p = (1/2, 1/2); e_0 − p = (1/2, −1/2), norm √(1/2) = 0.70710678.
        # At T = 2 the same p, and the gradient w.r.t. the raw logits is halved: 0.35355339.
        logits, targets = torch.zeros(1, 2, dtype=F64), torch.tensor([0])
        assert_close(token_logprobs_and_entropy(logits, targets, 1.0, return_grad_norm=True)[2].item(), 0.5**0.5)
        assert_close(token_logprobs_and_entropy(logits, targets, 2.0, return_grad_norm=True)[2].item(), 0.5**1.5)

    def test_hand_derived_certain_token_keeps_its_digits_in_float32(self):
        # logits (20, 0, 0), target 0: with e = e^-20, p = (1, e, e) / (1 + 2e), so
        # 1 − p_0 = 2e / (1 + 2e) and Σ_{j≠0} p_j² = 2e² / (1 + 2e)²; norm = √6 · e / (1 + 2e) ≈ 5.0494e-9.
        # The textbook 1 − 2p + Σp² in float32 cancels to 0 (or noise) at this scale.
        e = math.exp(-20.0)
        expected = math.sqrt(6.0) * e / (1 + 2 * e)
        logits = torch.tensor([[20.0, 0.0, 0.0]])
        _, _, grad_norm = token_logprobs_and_entropy(logits, torch.tensor([0]), return_grad_norm=True)
        assert_close(grad_norm.item(), expected, rtol=1e-5, atol=0.0)

    @pytest.mark.parametrize("temperature", [1.0, 0.7])
    def test_chunked_and_fused_match_autograd(self, temperature):
        gen = torch.Generator().manual_seed(0)
        hidden = torch.randn(2, 9, 6, generator=gen, dtype=F64)
        weight = torch.randn(11, 6, generator=gen, dtype=F64) * 2
        bias = torch.randn(11, generator=gen, dtype=F64)
        targets = torch.randint(0, 11, (2, 9), generator=gen)
        logits = hidden @ weight.t() + bias
        expected = autograd_grad_norms(logits, targets, temperature)
        chunked = token_logprobs_and_entropy(logits, targets, temperature, chunk_size=4, return_grad_norm=True)
        fused = fused_linear_logprobs_and_entropy(
            hidden.requires_grad_(), weight, targets, bias, temperature, chunk_size=5, return_grad_norm=True
        )
        for outputs in (chunked, fused):
            assert_close(outputs[2], expected, rtol=1e-12, atol=1e-12)
            assert not outputs[2].requires_grad
        # the other two outputs are unchanged by asking for the third, and still differentiable
        lp, ent = fused_linear_logprobs_and_entropy(hidden, weight, targets, bias, temperature, chunk_size=5)
        assert_close(fused[0], lp, rtol=0, atol=0)
        assert_close(fused[1], ent, rtol=0, atol=0)
        (fused[0].sum() + fused[1].sum()).backward()
        assert hidden.grad is not None and hidden.grad.abs().sum() > 0

    def test_float32_fused_matches_float64_autograd(self):
        gen = torch.Generator().manual_seed(1)
        hidden, weight = torch.randn(40, 8, generator=gen), torch.randn(50, 8, generator=gen) * 3
        targets = torch.randint(0, 50, (40,), generator=gen)
        _, _, grad_norm = fused_linear_logprobs_and_entropy(hidden, weight, targets, return_grad_norm=True)
        expected = autograd_grad_norms((hidden @ weight.t()).to(F64), targets, 1.0)
        assert_close(grad_norm.to(F64), expected, rtol=1e-5, atol=1e-7)


def brute_force_gradient_mask(grad_norm: torch.Tensor, mask: torch.Tensor, ratio: float) -> torch.Tensor:
    """Exactly ⌈ρN⌉ valid tokens with the largest norms, ties to the earlier token (stable sort)."""
    flat, idx = grad_norm.flatten(), mask.bool().flatten().nonzero().squeeze(1)
    k = num_selected(idx.numel(), ratio, "gradient")
    order = torch.sort(flat[idx], descending=True, stable=True).indices
    out = torch.zeros_like(flat, dtype=torch.bool)
    out[idx[order[:k]]] = True
    return out.view(grad_norm.shape)


class TestGradientSelection:
    def test_hand_worked_example_with_ties(self):
        # N = 7 valid tokens, ρ = 0.3 -> k = ⌈2.1⌉ = 3: the 0.9, then the first two of the three 0.5s
        # (flat indices 1 and 4); padding (index 3, 8, 9) holds 5.0 and is never kept.
        grad_norm = torch.tensor([[0.1, 0.5, 0.9, 5.0, 0.5], [0.5, 0.2, 0.0, 5.0, 5.0]])
        mask = torch.tensor([[1, 1, 1, 0, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
        entropy = torch.rand(2, 5)
        sel = select_tokens(entropy, mask, "gradient", 0.3, grad_norm=grad_norm)
        expected = torch.tensor([[0, 1, 1, 0, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
        assert torch.equal(sel.mask, expected)
        assert sel.num_kept.item() == 3 and math.isnan(sel.threshold.item())
        # entropy statistics stay entropy statistics
        assert_close(sel.mean_entropy_kept.item(), entropy[expected].double().mean().item())

    def test_needs_grad_norm(self):
        with pytest.raises(ValueError, match="needs grad_norm"):
            select_tokens(torch.rand(2, 3), torch.ones(2, 3, dtype=torch.bool), "gradient", 0.2)

    def test_tiny_model_tokens_match_brute_force_autograd(self):
        """score_responses' norms equal autograd's on the model's full logits, and the kept tokens are
        the brute-force top-⌈ρN⌉ of autograd's norms — per micro-batch and over a whole batch."""
        tok = build_tiny_tokenizer()
        model = build_tiny_model(tok, seed=0).to(F64)
        gen = torch.Generator().manual_seed(0)
        prompt_ids = torch.randint(3, 90, (6, 4), generator=gen)
        prompt_mask = torch.ones_like(prompt_ids)
        response_mask = (torch.arange(7) < torch.tensor([7, 5, 6, 3, 7, 4])[:, None]).long()
        response_ids = torch.randint(3, 90, (6, 7), generator=gen).masked_fill(response_mask == 0, tok.pad_token_id)
        T = 0.8
        _, entropy, grad_norm = score_responses(
            model, prompt_ids, prompt_mask, response_ids, response_mask, T, return_grad_norm=True
        )
        with torch.no_grad():
            hidden = forward_hidden_states(
                model, torch.cat([prompt_ids, response_ids], 1), torch.cat([prompt_mask, response_mask], 1)
            )
            logits = model.lm_head(hidden[:, 3:-1])  # position P - 1 + t predicts response token t
        expected = autograd_grad_norms(logits, response_ids, T) * response_mask  # 0 at padding
        assert_close(grad_norm, expected, rtol=1e-9, atol=1e-12)
        for rows in (slice(0, 3), slice(3, 6), slice(0, 6)):  # two micro-batches, then the whole batch
            sel = select_tokens(entropy[rows], response_mask[rows], "gradient", 0.2, grad_norm=grad_norm[rows])
            reference = brute_force_gradient_mask(expected[rows], response_mask[rows], 0.2)
            assert torch.equal(sel.mask, reference)
