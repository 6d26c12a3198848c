"""The lean decode loop gives exactly the tokens, log-probs and entropies of the `generate` path it
replaces (bit for bit: same model calls, same ops on the scores), for every sampling option, with
and without shared prompts, decode phases, chunked batches, EOS mid-response and length limits."""

import pytest
import torch

from forkrl import fast_paths
from forkrl.models import build_tiny_model, build_tiny_tokenizer
from forkrl.rollout import HFGenerationBackend, Rollout, SamplingParams, decode
from forkrl.rollout.seeded_sampling import gumbel_from_bits, hash_bits

PROMPTS = ["1+1=", "User:\nWhat is 7*6?\n\nAssistant:\n", "9", "x = 3, y ="]
GROUPED = [p for p in PROMPTS for _ in range(3)]  # 12 rows in runs of 3: shared-prompt prefill applies
SEEDS = [5, -7, 2**40, 11, 12, 13, 0, 1, 2, 3, 99, 2**62]
H = 4.585  # splits the random tiny model's raw entropies (≈ ln V), so both temperatures occur

PARAMS = {
    "row_seeds": dict(row_seeds=SEEDS),
    "seed": dict(seed=3),
    "greedy": dict(temperature=0.0, seed=1),
    "unseeded": dict(),
    "temperature_top_k_top_p": dict(temperature=0.7, top_k=5, top_p=0.9, row_seeds=SEEDS),
    "entropy_temperature": dict(entropy_temperature=(0.5, 1.5, H), row_seeds=SEEDS),
    "entropy_temperature_seed_top_p": dict(entropy_temperature=(0.5, 1.5, H), top_p=0.8, seed=5),
    "min_new_tokens": dict(min_new_tokens=7, temperature=1.3, row_seeds=SEEDS),
}
LAYOUTS = {
    "shared, one phase, one batch": dict(share_prompt=True, decode_phase=0, batch_size=12),
    "shared, phases of 4, chunks of 5": dict(share_prompt=True, decode_phase=4, batch_size=5),
    "not shared, phases of 3, one batch": dict(share_prompt=False, decode_phase=3, batch_size=12),
}
FIELDS = ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "sampler_logprobs", "sampler_entropy")
FIELDS += ("finished", "response_lengths", "row_seeds")


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return build_tiny_model(tok, seed=0)


@pytest.fixture(scope="module")
def digit_eos(tok):
    """Every digit ends a response: EOS lands mid-response, at different steps in different rows."""
    return tok.convert_tokens_to_ids(list("0123456789"))


def both_paths(model, tok, prompts, params, **backend_kwargs) -> tuple[Rollout, Rollout]:
    """`(lean, reference)` rollouts from fresh backends; the global RNG is reseeded before each so
    that unseeded sampling draws the same numbers in both."""
    out = []
    for lean in (True, False):
        torch.manual_seed(1234)
        out.append(HFGenerationBackend(model, tok, lean_decode=lean, **backend_kwargs).generate(prompts, params))
    return out[0], out[1]


def assert_same_rollout(a: Rollout, b: Rollout) -> None:
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert torch.equal(x, y), name  # bit-identical, not just close


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("sampling", list(PARAMS))
def test_lean_loop_equals_generate_bit_for_bit(model, tok, digit_eos, layout, sampling):
    params = SamplingParams(max_new_tokens=16, **PARAMS[sampling])
    lean, reference = both_paths(model, tok, GROUPED, params, eos_token_ids=digit_eos, **LAYOUTS[layout])
    assert_same_rollout(lean, reference)
    # The case is the intended one: some rows end mid-response, others run into the limit.
    if sampling != "greedy":
        assert lean.finished.any() and not lean.finished.all(), lean.response_lengths
    if sampling == "min_new_tokens":
        assert lean.response_lengths.min() >= 7


@pytest.mark.parametrize("max_new_tokens", [1, 2, 5])
def test_short_limits_and_the_tokenizer_eos(model, tok, max_new_tokens):
    params = SamplingParams(max_new_tokens=max_new_tokens, row_seeds=SEEDS[:4])
    lean, reference = both_paths(model, tok, PROMPTS, params, decode_phase=2)
    assert_same_rollout(lean, reference)
    assert lean.response_ids.shape == (4, max_new_tokens)


def test_all_rows_ending_early_stops_the_loop_where_generate_stops(model, tok, digit_eos):
    # min_new_tokens = 0 and greedy: all rows end once each has drawn a digit, well before 200.
    params = SamplingParams(max_new_tokens=200, row_seeds=SEEDS, temperature=1.0)
    lean, reference = both_paths(model, tok, GROUPED, params, eos_token_ids=digit_eos)
    assert lean.finished.all() and lean.response_ids.shape[1] < 200
    assert_same_rollout(lean, reference)


def test_checking_for_the_end_every_few_steps_changes_nothing(model, tok, digit_eos, monkeypatch):
    # Accelerators read the "all ended" flag every STOP_CHECK_EVERY steps with row seeds; on CPU
    # force that cadence and check that the extra steps are trimmed away.
    params = SamplingParams(max_new_tokens=200, row_seeds=SEEDS)
    reference = HFGenerationBackend(model, tok, eos_token_ids=digit_eos, lean_decode=False).generate(GROUPED, params)
    monkeypatch.setattr(decode, "stop_check_every", lambda device, seeded: 16)
    lean = HFGenerationBackend(model, tok, eos_token_ids=digit_eos).generate(GROUPED, params)
    assert reference.response_ids.shape[1] % 16 != 0  # the loop did run past the last EOS
    assert_same_rollout(lean, reference)


def test_noise_made_in_chunks_is_the_noise_of_each_step(monkeypatch):
    # 3 rows x 7 tokens = 21 values per step; a budget of 50 makes chunks of 2 steps.
    monkeypatch.setattr(decode, "NOISE_CHUNK_ELEMENTS", 50)
    seeds = torch.tensor([1, -2, 2**50])
    noise = decode.SeededNoise(seeds, vocab_size=7, end_step=9)
    assert noise.chunk == 2
    for step in [3, 4, 5, 8, 0]:  # forwards, across chunk ends, the last step, then back
        expected = gumbel_from_bits(hash_bits(seeds, step, torch.arange(7)))
        assert torch.equal(noise.at(step), expected), step


def test_lean_loop_with_one_step_noise_chunks_equals_generate(model, tok, digit_eos, monkeypatch):
    # As with a 150k vocabulary, where a chunk is one step.
    monkeypatch.setattr(decode, "NOISE_CHUNK_ELEMENTS", 1)
    params = SamplingParams(max_new_tokens=12, row_seeds=SEEDS, top_k=9)
    lean, reference = both_paths(model, tok, GROUPED, params, eos_token_ids=digit_eos, decode_phase=5)
    assert_same_rollout(lean, reference)


def test_lean_loop_reports_its_fast_path_and_keeps_the_callers_rng(model, tok):
    rng = torch.random.get_rng_state()
    HFGenerationBackend(model, tok).generate(GROUPED, SamplingParams(max_new_tokens=4, row_seeds=SEEDS))
    HFGenerationBackend(model, tok).generate(GROUPED, SamplingParams(max_new_tokens=4, seed=0))
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert fast_paths.status()[fast_paths.LEAN_DECODE_LOOP] == "on"
    fast_paths.reset()
    HFGenerationBackend(model, tok, lean_decode=False).generate(GROUPED, SamplingParams(max_new_tokens=4, seed=0))
    assert fast_paths.status()[fast_paths.LEAN_DECODE_LOOP] == "not used"  # asked not to: not declined


def test_min_new_tokens_masks_eos_in_the_recorded_distribution(model, tok, digit_eos):
    params = SamplingParams(max_new_tokens=10, min_new_tokens=6, row_seeds=SEEDS)
    r = HFGenerationBackend(model, tok, eos_token_ids=digit_eos).generate(GROUPED, params)
    assert r.response_lengths.min() >= 6
    ids = torch.cat([r.prompt_ids, r.response_ids], 1)
    mask = torch.cat([r.prompt_mask, r.response_mask], 1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0)).logits
    P = r.prompt_ids.shape[1]
    logits = logits[:, P - 1 : P - 1 + r.response_ids.shape[1]].clone()
    logits[:, :6, digit_eos] = float("-inf")  # the first 6 steps could not end the response
    logp = torch.log_softmax(logits, -1)
    expected = logp.gather(-1, r.response_ids.unsqueeze(-1)).squeeze(-1)
    valid = r.response_mask.bool()
    torch.testing.assert_close(r.sampler_logprobs[valid], expected[valid], rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="min_new_tokens"):
        SamplingParams(max_new_tokens=4, min_new_tokens=5)
