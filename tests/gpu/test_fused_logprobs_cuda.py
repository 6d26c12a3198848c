"""The fused LM-head log-prob/entropy op on CUDA at Qwen3's vocabulary (V = 151,936) against a float64
naive reference on the same (already rounded) inputs: values, gradients and the gradient norm."""

from __future__ import annotations

import pytest
import torch

from forkrl.ops.logprobs import default_chunk_rows, fused_linear_logprobs_and_entropy, naive_logprobs_and_entropy

DEVICE = "cuda"
VOCAB = 151_936  # Qwen3's vocabulary: rows of the LM head
HIDDEN = 64
# 2.2 default CUDA chunks (216 rows at this V; `default_chunk_rows`): two full chunks, one partial.
TOKENS = 2 * default_chunk_rows(VOCAB, "cuda", fused=True) + 45
TEMPERATURE = 0.7

# Worst elementwise error of log p and H, and worst ‖Δg‖ / ‖g‖ of the gradient norm and the hidden and
# weight gradients, against float64 on the same inputs. float32: the matmul and the softmax statistics
# round at ~1e-7 relative, summed over H = 64 and V = 151,936 terms (H ≈ 11.5 nats, so 1e-5 absolute
# is 1e-6 relative). bfloat16: the matmul's output is rounded to bf16 (2^-9 relative), and so is every
# gradient the op returns. The same check on CPU measured, fp32: log p 1.6e-6, H 1.2e-5, gradients
# <= 9.5e-7; bf16: log p 1.1e-2, H 1.5e-3, gradients <= 2.5e-3. The bounds leave ~5-10x room for
# other accumulation orders and are still to be confirmed on a GPU.
TOLERANCES = {
    torch.float32: {"logprobs": 2e-5, "entropy": 1e-4, "grad": 1e-5},
    torch.bfloat16: {"logprobs": 6e-2, "entropy": 1.5e-2, "grad": 2.5e-2},
}


def _inputs(device: str, dtype: torch.dtype, seed: int = 0):
    """hidden `[N, H]`, weight `[V, H]` (in `dtype`, leaves), targets `[N]`, upstream coefficients `[N]` x 2."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(TOKENS, HIDDEN, generator=gen)
    # Scaled like an LM head: logits O(1), H ≈ 11.5 nats (at most log V = 11.9).
    weight = torch.randn(VOCAB, HIDDEN, generator=gen) * HIDDEN**-0.5
    targets = torch.randint(0, VOCAB, (TOKENS,), generator=gen)
    coef_logp, coef_ent = torch.randn(TOKENS, generator=gen), torch.randn(TOKENS, generator=gen)
    hidden = hidden.to(device, dtype).requires_grad_()
    weight = weight.to(device, dtype).requires_grad_()
    return hidden, weight, targets.to(device), coef_logp.to(device), coef_ent.to(device)


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected).norm() / expected.norm()).item()


def check_fused_matches_float64(device: str, dtype: torch.dtype) -> dict[str, float]:
    """Forward + backward of `(a · log p + b · H).sum()` through the fused op and through float64
    autograd on the same rounded inputs; asserts `TOLERANCES[dtype]` and returns the errors."""
    hidden, weight, targets, coef_logp, coef_ent = _inputs(device, dtype)
    logprobs, entropy, grad_norm = fused_linear_logprobs_and_entropy(
        hidden, weight, targets, temperature=TEMPERATURE, return_grad_norm=True
    )
    assert logprobs.dtype == entropy.dtype == torch.float32 and logprobs.device.type == device
    (logprobs * coef_logp + entropy * coef_ent).sum().backward()
    assert hidden.grad.dtype == weight.grad.dtype == dtype

    ref_hidden = hidden.detach().double().requires_grad_()
    ref_weight = weight.detach().double().requires_grad_()
    ref_logits = ref_hidden @ ref_weight.t()  # (N, V) float64
    ref_logprobs, ref_entropy = naive_logprobs_and_entropy(ref_logits, targets, TEMPERATURE)
    (ref_logprobs * coef_logp.double() + ref_entropy * coef_ent.double()).sum().backward()
    # ‖∂ log p_y/∂logits‖₂ = ‖onehot(y) - p‖₂ / T (module docstring of forkrl.ops.logprobs).
    with torch.no_grad():
        p = torch.softmax(ref_logits / TEMPERATURE, dim=-1)
        p[torch.arange(TOKENS, device=device), targets] -= 1.0
        ref_grad_norm = p.norm(dim=-1) / TEMPERATURE
    del ref_logits, p

    errors = {
        "logprobs": (logprobs.double() - ref_logprobs).abs().max().item(),
        "entropy": (entropy.double() - ref_entropy).abs().max().item(),
        "grad_norm": _relative_error(grad_norm, ref_grad_norm),
        "grad_hidden": _relative_error(hidden.grad, ref_hidden.grad),
        "grad_weight": _relative_error(weight.grad, ref_weight.grad),
    }
    tol = TOLERANCES[dtype]
    assert errors["logprobs"] <= tol["logprobs"], errors
    assert errors["entropy"] <= tol["entropy"], errors
    assert max(errors["grad_norm"], errors["grad_hidden"], errors["grad_weight"]) <= tol["grad"], errors
    return errors


def check_chunking_changes_nothing(device: str) -> None:
    """float32: one chunk per row, an odd chunk and the default give the same values (each row's
    math does not depend on the chunk it falls in, up to the matmul kernel picked per shape)."""
    hidden, weight, targets, _, _ = _inputs(device, torch.float32, seed=1)
    with torch.no_grad():
        default = fused_linear_logprobs_and_entropy(hidden, weight, targets)
        for chunk in (1, 37):
            rows = slice(0, 80)  # chunk 1 walks row by row: keep it short
            small = fused_linear_logprobs_and_entropy(hidden[rows], weight, targets[rows], chunk_size=chunk)
            for a, b in zip(small, default):
                torch.testing.assert_close(a, b[rows], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_matches_float64_reference(dtype):
    check_fused_matches_float64(DEVICE, dtype)


def test_chunking_changes_nothing():
    check_chunking_changes_nothing(DEVICE)
