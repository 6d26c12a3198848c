"""`GrowingLayer`: in-place appends give exactly the tensors of transformers' concatenating cache,
through capacity growth and after batch selection / crop; generation with it is unchanged."""

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from forkrl import fast_paths
from forkrl.models import build_tiny_model, build_tiny_tokenizer
from forkrl.rollout import HFGenerationBackend, SamplingParams
from forkrl.rollout import hf as hf_module
from forkrl.rollout.kv_cache import MIN_CAPACITY, GrowingLayer


def _chunks(gen, batch, lengths):
    return [(torch.randn(batch, 2, n, 8, generator=gen), torch.randn(batch, 2, n, 8, generator=gen)) for n in lengths]


def test_appends_equal_concatenation_through_growth():
    gen = torch.Generator().manual_seed(0)
    lengths = [5] + [1] * (2 * MIN_CAPACITY) + [3, 1]  # a prefill, then decoding past two doublings
    grow, ref = GrowingLayer(), DynamicLayer()
    capacities = set()
    for k, v in _chunks(gen, 3, lengths):
        gk, gv = grow.update(k, v)
        rk, rv = ref.update(k, v)
        assert torch.equal(gk, rk) and torch.equal(gv, rv)
        capacities.add(grow._key_buffer.shape[-2])
    assert grow.get_seq_length() == sum(lengths)
    # amortized growth: a handful of buffers, not one per step
    assert capacities == {MIN_CAPACITY, 2 * MIN_CAPACITY, 4 * MIN_CAPACITY}


def test_batch_select_and_crop_then_append():
    gen = torch.Generator().manual_seed(1)
    grow, ref = GrowingLayer(), DynamicLayer()
    chunks = _chunks(gen, 4, [6, 1, 1, 1, 1])
    for k, v in chunks[:3]:
        grow.update(k, v)
        ref.update(k, v)
    index = torch.tensor([2, 0, 0, 3, 1])  # reorder and repeat rows: B 4 -> 5
    grow.batch_select_indices(index)
    ref.batch_select_indices(index)
    for k, v in chunks[3:]:
        gk, gv = grow.update(k[index], v[index])
        rk, rv = ref.update(k[index], v[index])
        assert torch.equal(gk, rk) and torch.equal(gv, rv)
    grow.crop(-3)
    ref.crop(-3)
    k, v = _chunks(gen, 5, [2])[0]
    gk, gv = grow.update(k, v)
    rk, rv = ref.update(k, v)
    assert gk.shape == (5, 2, 9, 8) and torch.equal(gk, rk) and torch.equal(gv, rv)


def test_earlier_returned_views_are_not_overwritten():
    gen = torch.Generator().manual_seed(2)
    grow = GrowingLayer()
    (k1, v1), (k2, v2) = _chunks(gen, 2, [4, 1])
    first, _ = grow.update(k1, v1)
    snapshot = first.clone()
    grow.update(k2, v2)
    assert torch.equal(first, snapshot)


@pytest.mark.declines_fast_paths  # the reference run turns the in-place cache off on purpose
@pytest.mark.parametrize("share_prompt", [True, False])
def test_generation_equals_the_default_cache(share_prompt, monkeypatch):
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, seed=0)
    prompts = ["1+1=", "1+1=", "1+1=", "x = 3, y =", "9", "9"]
    params = SamplingParams(max_new_tokens=MIN_CAPACITY + 20, row_seeds=list(range(len(prompts))))
    ours = HFGenerationBackend(model, tok, share_prompt=share_prompt).generate(prompts, params)
    assert fast_paths.status()[fast_paths.INPLACE_KV_CACHE] == "on"
    monkeypatch.setattr(hf_module, "growing_cache", lambda: None)  # generate's own DynamicCache
    fast_paths.reset()
    theirs = HFGenerationBackend(model, tok, share_prompt=False).generate(prompts, params)
    assert fast_paths.status()[fast_paths.INPLACE_KV_CACHE].startswith("off")  # the reference really is another path
    assert ours.response_ids.shape[1] > MIN_CAPACITY  # decoding ran past the first buffer
    assert torch.equal(ours.response_ids, theirs.response_ids)
    torch.testing.assert_close(ours.sampler_logprobs, theirs.sampler_logprobs, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.sampler_entropy, theirs.sampler_entropy, rtol=0, atol=1e-5)


@pytest.mark.parametrize("share_prompt", [True, False])
def test_decode_phases_give_the_tokens_of_one_call(share_prompt):
    """Phases of 7 tokens, continuing only unfinished rows, equal one `generate` call."""
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, seed=1)
    with torch.no_grad():  # make EOS likely enough that rows end at many different steps
        model.get_output_embeddings().weight[tok.eos_token_id] *= 4
    prompts = ["1+1=", "1+1=", "1+1=", "x = 3, y =", "9", "9", "ab", "ab", "q", "q", "q", "zz"]
    params = SamplingParams(max_new_tokens=40, row_seeds=list(range(100, 100 + len(prompts))))
    one = HFGenerationBackend(model, tok, share_prompt=share_prompt).generate(prompts, params)
    phased = HFGenerationBackend(model, tok, share_prompt=share_prompt, decode_phase=7).generate(prompts, params)
    assert fast_paths.status()[fast_paths.DECODE_PHASES] == "on"
    assert fast_paths.status()[fast_paths.SHARED_PROMPT_PREFILL] == ("on" if share_prompt else "not used")
    lengths = one.response_lengths.tolist()
    # The case is a real one: rows end in several different phases, and some run to the limit.
    assert len({min(n - 1, 39) // 7 for n in lengths}) >= 3 and max(lengths) == 40, lengths
    assert torch.equal(phased.response_ids, one.response_ids)
    assert torch.equal(phased.response_mask, one.response_mask)
    torch.testing.assert_close(phased.sampler_logprobs, one.sampler_logprobs, rtol=0, atol=1e-5)
    torch.testing.assert_close(phased.sampler_entropy, one.sampler_entropy, rtol=0, atol=1e-5)
