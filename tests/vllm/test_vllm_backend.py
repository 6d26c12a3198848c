"""`VLLMGenerationBackend` on vLLM's CPU build against a teacher-forced Hugging Face forward.

One engine (module fixture) on the tiny Qwen3 of the tests, float32. Tolerances: the engine's
kernels are not the HF model's, so log-probs agree to float32 rounding of two different
computations; measured max |Δ| ~2e-5 at these sizes, asserted 2e-4.
"""

import copy
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from forkrl.rollout.base import SamplingParams
from forkrl.rollout.entropy_temperature import EntropyAwareTemperature
from forkrl.rollout.vllm import VLLMGenerationBackend, check_engine_options

TOL = 2e-4
ENGINE = {"kv_cache_memory_bytes": 64 * 2**20, "max_model_len": 256}


@pytest.fixture(scope="module")
def policy(vllm_model_dir):
    model = AutoModelForCausalLM.from_pretrained(vllm_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(vllm_model_dir)


@pytest.fixture(scope="module")
def engine(policy):
    model, tokenizer = policy
    backend = VLLMGenerationBackend(
        model.config, lambda: model.state_dict().items(), tokenizer, engine_options=dict(ENGINE)
    )
    yield backend
    backend.close()


def teacher_forced(model, prompt, response, temperature=1.0, top_k=0, min_new_tokens=0, eos=(0,), eq5=None):
    """`[R]` log-probs of `response` after `prompt` under the processed distribution forkrl samples:
    EOS masked for the first `min_new_tokens` steps, then temperature (or Eq. 5), then top-k."""
    ids = torch.tensor([list(prompt) + list(response)])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
    logits[:min_new_tokens, list(eos)] = float("-inf")
    if eq5 is not None:
        logits = EntropyAwareTemperature(*eq5)(None, logits)
    else:
        logits = logits / temperature
    if top_k:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits.log_softmax(-1).gather(1, torch.tensor(response)[:, None]).squeeze(1)


PROMPTS = ["what is 2 plus 3?", "count: a b c", "hello"]


def _rows(rollout):
    for i in range(rollout.batch_size):
        p = rollout.prompt_ids[i][rollout.prompt_mask[i].bool()].tolist()
        n = int(rollout.response_lengths[i])
        yield p, rollout.response_ids[i, :n].tolist(), rollout.sampler_logprobs[i, :n]


@pytest.mark.parametrize(
    "options",
    [{"temperature": 1.0}, {"temperature": 0.7, "top_k": 20}, {"temperature": 1.3, "min_new_tokens": 8}],
)
def test_sampler_logprobs_equal_a_teacher_forced_forward(engine, policy, options):
    model, _ = policy
    params = SamplingParams(max_new_tokens=16, row_seeds=[11, 12, 13], **options)
    rollout = engine.generate(PROMPTS, params)
    assert rollout.sampler_entropy is None
    for prompt, response, logprobs in _rows(rollout):
        assert len(response) >= options.get("min_new_tokens", 1)
        ref = teacher_forced(
            model,
            prompt,
            response,
            options["temperature"],
            options.get("top_k", 0),
            options.get("min_new_tokens", 0),
            eos=engine.eos_token_ids,
        )
        torch.testing.assert_close(logprobs, ref, rtol=0, atol=TOL)


def test_response_mask_finished_and_padding(engine):
    rollout = engine.generate(PROMPTS * 2, SamplingParams(max_new_tokens=6, row_seeds=list(range(6))))
    mask = rollout.response_mask.bool()
    assert torch.equal(rollout.response_lengths, mask.sum(-1))
    assert (rollout.response_ids[~mask] == engine.pad_token_id).all()
    assert (rollout.sampler_logprobs[~mask] == 0).all()
    for i in range(rollout.batch_size):
        n = int(rollout.response_lengths[i])
        ends_with_eos = rollout.response_ids[i, n - 1].item() in engine.eos_token_ids
        assert bool(rollout.finished[i]) == ends_with_eos
        assert n == 6 or ends_with_eos


def test_row_seeds_reproducible_batch_independent_and_distinct(engine):
    group = [PROMPTS[0]] * 8
    seeds = [1000 + j for j in range(8)]
    params = SamplingParams(max_new_tokens=16, row_seeds=seeds)
    a = engine.generate(group, params)
    b = engine.generate(group, params)
    assert torch.equal(a.response_ids, b.response_ids)  # reproducible
    assert len({tuple(r) for _, r, _ in _rows(a)}) > 4  # the G responses of a prompt differ
    # A row alone, or among other prompts in another order, gives the same tokens.
    alone = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=16, row_seeds=[seeds[3]]))
    mixed = engine.generate(
        [PROMPTS[2], PROMPTS[0], PROMPTS[1]], SamplingParams(max_new_tokens=16, row_seeds=[7, seeds[3], 9])
    )
    row = list(_rows(a))[3][1]
    assert list(_rows(alone))[0][1] == row
    assert list(_rows(mixed))[1][1] == row


def test_entropy_aware_temperature_matches_the_hf_processor(engine, policy):
    model, _ = policy
    eq5 = (0.6, 1.5, 1.0)
    rollout = engine.generate(PROMPTS, SamplingParams(max_new_tokens=16, entropy_temperature=eq5, row_seeds=[1, 2, 3]))
    plain = engine.generate(PROMPTS, SamplingParams(max_new_tokens=16, row_seeds=[1, 2, 3]))
    assert not torch.equal(rollout.sampler_logprobs, plain.sampler_logprobs)
    for prompt, response, logprobs in _rows(rollout):
        ref = teacher_forced(model, prompt, response, eq5=eq5, eos=engine.eos_token_ids)
        torch.testing.assert_close(logprobs, ref, rtol=0, atol=TOL)


def test_greedy_logprobs_are_zero_and_tokens_the_argmax(engine, policy):
    model, _ = policy
    rollout = engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, temperature=0.0, seed=0))
    assert (rollout.sampler_logprobs == 0).all()
    for prompt, response, _ in _rows(rollout):
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1 : -1]
        assert logits.argmax(-1).tolist() == response


def test_weight_push_moves_the_sampler_and_resets_the_prefix_cache(engine, policy):
    model, _ = policy
    trained = copy.deepcopy(model)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for p in trained.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    params = SamplingParams(max_new_tokens=12, row_seeds=[5, 6, 7])
    engine.generate(PROMPTS, params)  # the prompts are now in the prefix cache
    engine.weights = lambda: trained.state_dict().items()
    try:
        engine.update_weights(trained)
        rollout = engine.generate(PROMPTS, params)
        for prompt, response, logprobs in _rows(rollout):
            new = teacher_forced(trained, prompt, response, eos=engine.eos_token_ids)
            old = teacher_forced(model, prompt, response, eos=engine.eos_token_ids)
            torch.testing.assert_close(logprobs, new, rtol=0, atol=TOL)
            assert (logprobs - old).abs().max() > 100 * TOL  # the push mattered
    finally:
        engine.weights = lambda: model.state_dict().items()
        engine.update_weights(model)


def test_engine_options_are_checked():
    assert check_engine_options({"kv_cache_memory_bytes": 2**20, "dtype": "bfloat16", "enforce_eager": True}) == []
    assert "not an option of the vllm backend" in check_engine_options({"tensor_parallel": 2})[0]
    assert "expected > 0" in check_engine_options({"max_num_seqs": 0})[0]
    assert "expected one of auto" in check_engine_options({"dtype": "fp8"})[0]
    assert "expected bool" in check_engine_options({"enforce_eager": "yes"})[0]


def test_engine_start_and_shutdown_leave_the_process_as_they_found_it(vllm_model_dir, tmp_path):
    """Thread count and `torch.set_num_threads`, the global RNGs, the environment a reward worker
    inherits, the GC and the trainer's default process group: unchanged by an engine's life. In a
    fresh process (the module's engine already holds a process group here)."""
    probe = subprocess.run(
        [sys.executable, "-m", "tests.vllm.process_state_probe", vllm_model_dir, str(tmp_path / "pg")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
    )
    assert probe.returncode == 0, probe.stdout[-2000:] + probe.stderr[-3000:]
    assert "process state unchanged" in probe.stdout
