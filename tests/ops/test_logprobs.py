"""Tests for forkrl.ops.logprobs: hand-computed entropies, dtypes, and chunked/fused == naive."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from forkrl.ops.logprobs import (
    default_chunk_rows,
    fused_linear_logprobs_and_entropy,
    naive_logprobs_and_entropy,
    token_logprobs_and_entropy,
)

LN2, LN3 = math.log(2.0), math.log(3.0)
F64 = torch.float64
# float64 agreement required between the chunked/fused Functions and the autograd reference.
TIGHT = {"atol": 1e-8, "rtol": 1e-8}


def _loss_grads(outputs, inputs, coef_logp, coef_ent):
    """Gradients of `(logp * a + H * b).sum()` w.r.t. `inputs` (upstream grads a, b per token)."""
    logprobs, entropy = outputs
    return torch.autograd.grad((logprobs * coef_logp + entropy * coef_ent).sum(), inputs)


class TestKnownDistributions:
    def test_uniform_entropy_is_log_vocab(self):
        # Equal logits give p_j = 1/V, so H = -Σ (1/V) log(1/V) = log V and every token has
        # log p = -log V, whatever the temperature.
        vocab = 1000
        logits = torch.zeros(3, vocab)
        targets = torch.tensor([0, 17, 999])
        for temperature in (1.0, 0.5):
            logprobs, entropy = token_logprobs_and_entropy(logits, targets, temperature, chunk_size=2)
            assert_close(entropy, torch.full((3,), math.log(vocab)))
            assert_close(logprobs, torch.full((3,), -math.log(vocab)))

    def test_two_point_distribution(self):
        # logits [0, ln 3] -> p = [1/4, 3/4]:
        #   log p = [-ln 4, ln 3 - ln 4],  H = (1/4) ln 4 + (3/4)(ln 4 - ln 3) = ln 4 - (3/4) ln 3 ≈ 0.5623.
        # Extra -inf (masked) entries have p = 0 and must not change anything.
        expected_entropy = 2 * LN2 - 0.75 * LN3
        for logits in ([0.0, LN3], [0.0, LN3, -math.inf, -math.inf]):
            z = torch.tensor([logits, logits], dtype=F64)
            logprobs, entropy = token_logprobs_and_entropy(z, torch.tensor([0, 1]))
            assert_close(logprobs, torch.tensor([-2 * LN2, LN3 - 2 * LN2], dtype=F64))
            assert_close(entropy, torch.full((2,), expected_entropy, dtype=F64))

    def test_two_point_gradients(self):
        # Same p = [1/4, 3/4], target y = 1:
        #   ∂ log p_1 / ∂z = onehot(1) - p = [-1/4, 1/4]
        #   ∂H/∂z_j = -p_j (log p_j + H), with H = ln 4 - (3/4) ln 3:
        #     j=0: -(1/4)(-ln 4 + ln 4 - (3/4) ln 3) = +(3/16) ln 3
        #     j=1: -(3/4)(ln 3 - ln 4 + ln 4 - (3/4) ln 3) = -(3/16) ln 3
        logits = torch.tensor([[0.0, LN3]], dtype=F64, requires_grad=True)
        logprobs, entropy = token_logprobs_and_entropy(logits, torch.tensor([1]))
        (grad_logp,) = torch.autograd.grad(logprobs.sum(), logits, retain_graph=True)
        (grad_ent,) = torch.autograd.grad(entropy.sum(), logits)
        assert_close(grad_logp, torch.tensor([[-0.25, 0.25]], dtype=F64))
        assert_close(grad_ent, torch.tensor([[3 / 16 * LN3, -3 / 16 * LN3]], dtype=F64))

    def test_temperature(self):
        # logits [0, 2 ln 2]:
        #   T = 1: p = [1/5, 4/5],  H = ln 5 - (4/5) ln 4 ≈ 0.5004
        #   T = 2: z = [0, ln 2], p = [1/3, 2/3],  H = ln 3 - (2/3) ln 2 ≈ 0.6365 (flatter, higher)
        # and at T = 2 the gradient w.r.t. the logits is ∂/∂z divided by 2:
        #   ∂ log p_0 / ∂logits = (onehot(0) - p) / 2 = [1/3, -1/3]
        logits = torch.tensor([[0.0, 2 * LN2]], dtype=F64, requires_grad=True)
        targets = torch.tensor([0])
        logprobs, entropy = token_logprobs_and_entropy(logits, targets, temperature=1.0)
        assert_close(entropy, torch.tensor([math.log(5) - 0.8 * 2 * LN2], dtype=F64))
        assert_close(logprobs, torch.tensor([-math.log(5)], dtype=F64))
        logprobs, entropy = token_logprobs_and_entropy(logits, targets, temperature=2.0)
        assert_close(entropy, torch.tensor([LN3 - 2 / 3 * LN2], dtype=F64))
        assert_close(logprobs, torch.tensor([-LN3], dtype=F64))
        (grad,) = torch.autograd.grad(logprobs.sum(), logits)
        assert_close(grad, torch.tensor([[1 / 3, -1 / 3]], dtype=F64))

    def test_fused_two_point(self):
        # hidden [1] through weight rows [0], [ln 3] gives logits [0, ln 3] (p = [1/4, 3/4]);
        # hidden [0] with bias [0, ln 3] gives the same. ∂ log p_1/∂W = (onehot(1) - p) ⊗ h.
        targets = torch.tensor([1])
        weight = torch.tensor([[0.0], [LN3]], dtype=F64, requires_grad=True)
        logprobs, entropy = fused_linear_logprobs_and_entropy(torch.ones(1, 1, dtype=F64), weight, targets)
        assert_close(logprobs, torch.tensor([LN3 - 2 * LN2], dtype=F64))
        assert_close(entropy, torch.tensor([2 * LN2 - 0.75 * LN3], dtype=F64))
        (grad_weight,) = torch.autograd.grad(logprobs.sum(), weight)
        assert_close(grad_weight, torch.tensor([[-0.25], [0.25]], dtype=F64))

        bias = torch.tensor([0.0, LN3], dtype=F64)
        _, entropy = fused_linear_logprobs_and_entropy(torch.zeros(1, 1, dtype=F64), weight, targets, bias)
        assert_close(entropy, torch.tensor([2 * LN2 - 0.75 * LN3], dtype=F64))


class TestDtypesAndExtremes:
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
    def test_low_precision_inputs_give_fp32_close_to_fp64(self, dtype):
        torch.manual_seed(0)
        logits = (torch.randn(4, 6, 50) * 3).to(dtype).requires_grad_()
        targets = torch.randint(0, 50, (4, 6))
        coef_logp, coef_ent = torch.randn(4, 6), torch.randn(4, 6)
        outputs = token_logprobs_and_entropy(logits, targets, temperature=0.8, chunk_size=5)
        assert all(out.dtype == torch.float32 for out in outputs)
        (grad,) = _loss_grads(outputs, logits, coef_logp, coef_ent)
        assert grad.dtype == dtype

        # Reference: the same (already rounded) logits, all math in float64. The softmax runs
        # in float32 whatever the input dtype, so values agree to float32 precision.
        ref_logits = logits.detach().double().requires_grad_()
        ref = naive_logprobs_and_entropy(ref_logits, targets, temperature=0.8)
        assert_close(outputs[0], ref[0].float(), atol=1e-5, rtol=1e-5)
        assert_close(outputs[1], ref[1].float(), atol=1e-5, rtol=1e-5)
        (ref_grad,) = _loss_grads(ref, ref_logits, coef_logp.double(), coef_ent.double())
        # The only low-precision step is the final cast of the gradient to `dtype`.
        assert_close(grad, ref_grad.to(dtype))

    def test_float64_stays_float64(self):
        logits = torch.randn(3, 7, dtype=F64)
        logprobs, entropy = token_logprobs_and_entropy(logits, torch.zeros(3, dtype=torch.long))
        assert logprobs.dtype == entropy.dtype == F64

    def test_extreme_logits_stay_finite(self):
        # Row 0: logits ±1e4 (bf16 rounds 1e4 to 9984). exp(-9984) underflows to 0, so p is
        # exactly onehot(0): H = 0, log p_0 = 0 and log p_1 = -2 · 9984 = -19968.
        # Row 1: half the vocabulary masked with -inf, the rest equal: H = log 4.
        logits = torch.zeros(3, 8)
        logits[:2, 0], logits[:2, 1] = 1e4, -1e4
        logits[2, 4:] = -math.inf
        logits = logits.to(torch.bfloat16).requires_grad_()
        targets = torch.tensor([0, 1, 3])
        logprobs, entropy = token_logprobs_and_entropy(logits, targets, chunk_size=1)
        assert_close(logprobs, torch.tensor([0.0, -19968.0, -2 * LN2]))
        assert_close(entropy, torch.tensor([0.0, 0.0, 2 * LN2]))
        (grad,) = torch.autograd.grad((logprobs + entropy).sum(), logits)
        assert torch.isfinite(grad).all()
        assert (grad[2, 4:] == 0).all()  # masked entries get no gradient

    def test_masked_logits_match_large_negative_reference(self):
        # In float64 exp(-1e4 - lse) is exactly 0, so replacing -inf by -1e4 defines the same
        # distribution; the naive reference (which gives nan on -inf) can then check both
        # outputs and their gradients on masked rows.
        torch.manual_seed(1)
        logits = torch.randn(6, 20, dtype=F64)
        targets = torch.randint(0, 20, (6,))
        mask = torch.rand(6, 20) < 0.5
        mask[torch.arange(6), targets] = False  # sampled tokens are never masked
        masked = logits.masked_fill(mask, -math.inf).requires_grad_()
        finite = logits.masked_fill(mask, -1e4).requires_grad_()
        coef_logp, coef_ent = torch.randn(6, dtype=F64), torch.randn(6, dtype=F64)
        outputs = token_logprobs_and_entropy(masked, targets, temperature=1.5, chunk_size=4)
        ref = naive_logprobs_and_entropy(finite, targets, temperature=1.5)
        assert_close(outputs, ref, **TIGHT)
        assert_close(
            _loss_grads(outputs, masked, coef_logp, coef_ent), _loss_grads(ref, finite, coef_logp, coef_ent), **TIGHT
        )


# Random float64 problems: shape, vocabulary, chunking, temperature and logit scale vary.
problem = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**16),
        "rows": st.integers(1, 24),
        "vocab": st.integers(2, 40),
        "chunk": st.integers(1, 30),
        "temperature": st.floats(0.25, 4.0),
        "scale": st.floats(0.1, 20.0),
    }
)


class TestChunkedMatchesNaive:
    @settings(max_examples=25, deadline=None)
    @given(problem)
    def test_values_and_gradients(self, p):
        gen = torch.Generator().manual_seed(p["seed"])
        logits = (torch.randn(p["rows"], p["vocab"], generator=gen, dtype=F64) * p["scale"]).requires_grad_()
        targets = torch.randint(0, p["vocab"], (p["rows"],), generator=gen)
        coef_logp = torch.randn(p["rows"], generator=gen, dtype=F64)
        coef_ent = torch.randn(p["rows"], generator=gen, dtype=F64)
        outputs = token_logprobs_and_entropy(logits, targets, p["temperature"], chunk_size=p["chunk"])
        ref = naive_logprobs_and_entropy(logits, targets, p["temperature"])
        assert_close(outputs, ref, **TIGHT)
        assert_close(
            _loss_grads(outputs, logits, coef_logp, coef_ent), _loss_grads(ref, logits, coef_logp, coef_ent), **TIGHT
        )

    @pytest.mark.parametrize("used", ["logprobs", "entropy"])
    def test_gradient_through_one_output(self, used):
        # The unused output's upstream gradient arrives as None; the result must equal
        # the reference with that output's coefficient set to zero.
        torch.manual_seed(2)
        logits = torch.randn(2, 5, 11, dtype=F64, requires_grad=True)
        targets = torch.randint(0, 11, (2, 5))
        index = 0 if used == "logprobs" else 1
        (grad,) = torch.autograd.grad(token_logprobs_and_entropy(logits, targets, 0.7, 3)[index].sum(), logits)
        (ref_grad,) = torch.autograd.grad(naive_logprobs_and_entropy(logits, targets, 0.7)[index].sum(), logits)
        assert_close(grad, ref_grad, **TIGHT)

    def test_no_grad_path_equals_autograd_path(self):
        torch.manual_seed(3)
        logits = torch.randn(9, 13)
        targets = torch.randint(0, 13, (9,))
        with torch.no_grad():
            fast = token_logprobs_and_entropy(logits, targets, 1.3, chunk_size=4)
        tracked = token_logprobs_and_entropy(logits.requires_grad_(), targets, 1.3, chunk_size=4)
        assert tracked[0].requires_grad
        assert_close(fast, tuple(t.detach() for t in tracked), atol=0, rtol=0)

    def test_empty_and_batched_shapes(self):
        logprobs, entropy = token_logprobs_and_entropy(torch.randn(0, 5), torch.zeros(0, dtype=torch.long))
        assert logprobs.shape == entropy.shape == (0,)
        logprobs, entropy = token_logprobs_and_entropy(torch.randn(2, 3, 4, 5), torch.zeros(2, 3, 4, dtype=torch.long))
        assert logprobs.shape == entropy.shape == (2, 3, 4)

    def test_gradcheck(self):
        torch.manual_seed(4)
        logits = torch.randn(5, 6, dtype=F64, requires_grad=True)
        targets = torch.randint(0, 6, (5,))
        assert torch.autograd.gradcheck(lambda z: token_logprobs_and_entropy(z, targets, 0.7, 2), (logits,))

    def test_rejects_bad_arguments(self):
        targets = torch.zeros(3, dtype=torch.long)
        with pytest.raises(ValueError, match="disagree"):
            token_logprobs_and_entropy(torch.randn(3, 5), torch.zeros(4, dtype=torch.long))
        with pytest.raises(ValueError, match="temperature"):
            token_logprobs_and_entropy(torch.randn(3, 5), targets, temperature=0.0)
        with pytest.raises(ValueError, match="chunk_size"):
            token_logprobs_and_entropy(torch.randn(3, 5), targets, chunk_size=-1)
        with pytest.raises(ValueError, match="dtypes"):
            fused_linear_logprobs_and_entropy(torch.randn(3, 4), torch.randn(5, 4, dtype=F64), targets)


class TestFusedMatchesNaive:
    @settings(max_examples=25, deadline=None)
    @given(problem, st.integers(1, 8), st.booleans())
    def test_values_and_gradients(self, p, hidden_size, with_bias):
        gen = torch.Generator().manual_seed(p["seed"])
        rows, vocab = p["rows"], p["vocab"]
        hidden = torch.randn(rows, hidden_size, generator=gen, dtype=F64).requires_grad_()
        weight = (torch.randn(vocab, hidden_size, generator=gen, dtype=F64) * p["scale"]).requires_grad_()
        bias = torch.randn(vocab, generator=gen, dtype=F64).requires_grad_() if with_bias else None
        targets = torch.randint(0, vocab, (rows,), generator=gen)
        coef_logp = torch.randn(rows, generator=gen, dtype=F64)
        coef_ent = torch.randn(rows, generator=gen, dtype=F64)
        params = (hidden, weight) + ((bias,) if with_bias else ())

        outputs = fused_linear_logprobs_and_entropy(hidden, weight, targets, bias, p["temperature"], p["chunk"])
        logits = hidden @ weight.t() + (bias if with_bias else 0.0)
        ref = naive_logprobs_and_entropy(logits, targets, p["temperature"])
        assert_close(outputs, ref, **TIGHT)
        assert_close(
            _loss_grads(outputs, params, coef_logp, coef_ent), _loss_grads(ref, params, coef_logp, coef_ent), **TIGHT
        )

    def test_frozen_weight_and_batched_hidden(self):
        # A frozen (e.g. tied, not trained) LM head: only the hidden states get a gradient.
        torch.manual_seed(5)
        hidden = torch.randn(2, 3, 4, dtype=F64, requires_grad=True)
        weight = torch.randn(9, 4, dtype=F64)
        targets = torch.randint(0, 9, (2, 3))
        logprobs, entropy = fused_linear_logprobs_and_entropy(hidden, weight, targets, chunk_size=4)
        assert logprobs.shape == (2, 3)
        (grad,) = torch.autograd.grad((logprobs - entropy).sum(), hidden)
        ref = naive_logprobs_and_entropy(hidden @ weight.t(), targets)
        (ref_grad,) = torch.autograd.grad((ref[0] - ref[1]).sum(), hidden)
        assert_close(grad, ref_grad, **TIGHT)

    def test_bfloat16_close_to_float64(self):
        # bf16 matmuls round logits to ~3 significant digits, so compare with loose tolerances;
        # the point is dtypes (fp32 outputs, bf16 grads) and no precision blow-up.
        torch.manual_seed(6)
        hidden = torch.randn(40, 16).to(torch.bfloat16).requires_grad_()
        weight = (torch.randn(64, 16) / 4).to(torch.bfloat16).requires_grad_()
        bias = (torch.randn(64) / 4).to(torch.bfloat16).requires_grad_()
        targets = torch.randint(0, 64, (40,))
        outputs = fused_linear_logprobs_and_entropy(hidden, weight, targets, bias, chunk_size=7)
        assert all(out.dtype == torch.float32 for out in outputs)
        grads = _loss_grads(outputs, (hidden, weight, bias), 1.0, 0.5)
        assert all(g.dtype == torch.bfloat16 for g in grads)

        params64 = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
        ref = naive_logprobs_and_entropy(params64[0] @ params64[1].t() + params64[2], targets)
        assert_close(outputs, tuple(r.float() for r in ref), atol=2e-2, rtol=2e-2)
        for grad, ref_grad in zip(grads, _loss_grads(ref, params64, 1.0, 0.5)):
            assert_close(grad.double(), ref_grad, atol=2e-2, rtol=5e-2)

    def test_gradcheck(self):
        torch.manual_seed(7)
        hidden = torch.randn(5, 3, dtype=F64, requires_grad=True)
        weight = torch.randn(4, 3, dtype=F64, requires_grad=True)
        bias = torch.randn(4, dtype=F64, requires_grad=True)
        targets = torch.randint(0, 4, (5,))
        assert torch.autograd.gradcheck(
            lambda h, w, b: fused_linear_logprobs_and_entropy(h, w, targets, b, 1.3, 2), (hidden, weight, bias)
        )


class TestDefaultChunkRows:
    def test_budgets(self):
        # CPU reductions use cache-sized tiles (2^22 elements -> 64 rows of a 65536 vocab);
        # fused matmul blocks and CUDA chunks use 2^25 elements -> 512 rows. Rows are rounded
        # down to a multiple of 8 (2^25 / 151936 = 220.8 -> 216) and never drop below 1.
        assert default_chunk_rows(65536) == 64
        assert default_chunk_rows(65536, fused=True) == 512
        assert default_chunk_rows(65536, "cuda") == 512
        assert default_chunk_rows(151936, fused=True) == 216
        assert default_chunk_rows(10**9) == 1
