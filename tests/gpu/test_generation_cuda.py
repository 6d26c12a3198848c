"""Seeded generation on CUDA (`HFGenerationBackend`, per-row seeds): a row's response follows from its
prompt and its seed alone, on the device, in float32 and under the trainer's bf16 autocast."""

from __future__ import annotations

import torch

from forkrl.models import build_tiny_model, build_tiny_tokenizer, precision
from forkrl.rollout import HFGenerationBackend, Rollout, SamplingParams

DEVICE = "cuda"
PROMPTS = ["1+1=", "User:\nWhat is 7*6?\n\nAssistant:\n", "9", "x = 3, y ="]
SEEDS = [11, 22, -33, 2**40]
MAX_NEW_TOKENS = 16


def _tokens(r: Rollout, row: int) -> list[int]:
    return r.response_ids[row, : int(r.response_lengths[row])].tolist()


def _backend(device: str, **kwargs) -> HFGenerationBackend:
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, seed=0).to(device)
    return HFGenerationBackend(model, tok, **kwargs)


def check_row_seeds_reproduce_on_device(device: str) -> None:
    """Twice the same call gives the same tokens and statistics; one prompt at a time, and the prompts
    reversed, give each row the same tokens (float32: batch-shape-dependent kernels change logits by
    ~1e-7, far below what flips a Gumbel-max draw in 64 tokens); the rollout lives on the device."""
    params = SamplingParams(max_new_tokens=MAX_NEW_TOKENS, row_seeds=SEEDS)
    whole_backend = _backend(device)
    whole = whole_backend.generate(PROMPTS, params)
    again = whole_backend.generate(PROMPTS, params)
    for name in ("response_ids", "response_mask", "sampler_logprobs", "sampler_entropy"):
        tensor = getattr(whole, name)
        assert tensor.device.type == device, name
        assert torch.equal(tensor, getattr(again, name)), name
    assert whole.row_seeds.tolist() == SEEDS

    one_by_one = _backend(device, batch_size=1).generate(PROMPTS, params)
    reversed_params = SamplingParams(max_new_tokens=MAX_NEW_TOKENS, row_seeds=SEEDS[::-1])
    reversed_ = whole_backend.generate(PROMPTS[::-1], reversed_params)
    for i in range(len(PROMPTS)):
        tokens, n = _tokens(whole, i), int(whole.response_lengths[i])
        assert _tokens(one_by_one, i) == tokens, i
        assert _tokens(reversed_, len(PROMPTS) - 1 - i) == tokens, i
        torch.testing.assert_close(one_by_one.sampler_logprobs[i, :n], whole.sampler_logprobs[i, :n])
    # Different seeds, different samples.
    other = whole_backend.generate(PROMPTS, SamplingParams(max_new_tokens=MAX_NEW_TOKENS, row_seeds=[1, 2, 3, 4]))
    assert not torch.equal(other.response_ids, whole.response_ids)


def check_bf16_autocast_is_reproducible(device: str) -> None:
    """Under the trainer's autocast (`model.dtype=auto` on CUDA: bf16) the same seeds give the same
    rollout twice, and `min_new_tokens` holds every response to the full length (EOS masked)."""
    backend = _backend(device, around=lambda: precision.autocast("auto", device))
    params = SamplingParams(
        max_new_tokens=MAX_NEW_TOKENS, min_new_tokens=MAX_NEW_TOKENS, temperature=0.9, row_seeds=SEEDS
    )
    a, b = backend.generate(PROMPTS, params), backend.generate(PROMPTS, params)
    assert torch.equal(a.response_ids, b.response_ids)
    assert torch.equal(a.sampler_logprobs, b.sampler_logprobs)
    assert a.response_lengths.tolist() == [MAX_NEW_TOKENS] * len(PROMPTS)
    valid = a.response_mask.bool()
    assert torch.isfinite(a.sampler_logprobs[valid]).all() and (a.sampler_logprobs[valid] <= 0).all()
    assert torch.isfinite(a.sampler_entropy[valid]).all() and (a.sampler_entropy[valid] >= 0).all()


def test_row_seeds_reproduce_on_cuda():
    check_row_seeds_reproduce_on_device(DEVICE)


def test_bf16_autocast_generation_is_reproducible():
    check_bf16_autocast_is_reproducible(DEVICE)
