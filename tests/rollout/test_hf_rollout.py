"""HF generation backend: shapes, padding, EOS masking, seeding, and sampler statistics that match a
teacher-forced recomputation of the same tokens; batch-invariant sampling with row seeds."""

import pytest
import torch

from forkrl.models import build_tiny_model, build_tiny_tokenizer
from forkrl.rollout import HFGenerationBackend, Rollout, SamplingParams, entropy_of_logits
from forkrl.rollout.seeded_sampling import gumbel_from_bits, gumbel_max_sample, hash_bits

PROMPTS = ["1+1=", "User:\nWhat is 7*6?\n\nAssistant:\n", "9", "x = 3, y ="]


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    model = build_tiny_model(tok, seed=0)
    # Checkpoint sampling defaults must not leak into what the backend samples and records.
    model.generation_config.top_k = 2
    model.generation_config.repetition_penalty = 1.5
    return model


def teacher_forced_logits(model, rollout: Rollout) -> torch.Tensor:
    """Logits `[B, R, V]` predicting each response token, from one forward over prompt + response."""
    ids = torch.cat([rollout.prompt_ids, rollout.response_ids], 1)
    mask = torch.cat([rollout.prompt_mask, rollout.response_mask], 1)
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)  # what generate uses for left-padded rows
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
    P, R = rollout.prompt_ids.shape[1], rollout.response_ids.shape[1]
    return logits[:, P - 1 : P + R - 1]


def test_shapes_and_left_padded_prompts(model, tok):
    rollout = HFGenerationBackend(model, tok).generate(PROMPTS, SamplingParams(max_new_tokens=6, seed=0))
    B, P = len(PROMPTS), max(len(tok(p)["input_ids"]) for p in PROMPTS)
    assert rollout.prompt_ids.shape == (B, P) and rollout.response_ids.shape == (B, 6)
    for t in (rollout.sampler_logprobs, rollout.sampler_entropy, rollout.response_mask):
        assert t.shape == (B, 6)
    assert rollout.finished.shape == rollout.response_lengths.shape == (B,)
    # "9" is one token: P - 1 pads on the left, then the prompt.
    assert rollout.prompt_mask[2].tolist() == [0] * (P - 1) + [1]
    assert rollout.prompt_ids[2, : P - 1].eq(tok.pad_token_id).all()
    assert tok.decode(rollout.prompt_ids[1][rollout.prompt_mask[1].bool()]) == PROMPTS[1]
    assert model.generation_config.top_k == 2  # restored after sampling


def test_response_mask_stops_after_eos(model, tok):
    # Treat every digit as an end token so that rows stop early and at different steps.
    stop_ids = tok.convert_tokens_to_ids(list("0123456789"))
    backend = HFGenerationBackend(model, tok, eos_token_ids=stop_ids)
    r = backend.generate(PROMPTS * 4, SamplingParams(max_new_tokens=40, seed=0))
    assert r.finished.any() and r.response_lengths.unique().numel() > 1
    for row in range(r.batch_size):
        ids, n = r.response_ids[row].tolist(), int(r.response_lengths[row])
        first_stop = next((i for i, t in enumerate(ids) if t in stop_ids), None)
        assert bool(r.finished[row]) == (first_stop is not None)
        if first_stop is not None:
            assert n == first_stop + 1  # the EOS itself is kept
        assert r.response_mask[row].tolist() == [1] * n + [0] * (len(ids) - n)
        assert all(t == tok.pad_token_id for t in ids[n:])
    off = r.response_mask == 0
    assert r.sampler_logprobs[off].eq(0).all() and r.sampler_entropy[off].eq(0).all()


def test_same_seed_same_tokens_and_global_rng_untouched(model, tok):
    backend = HFGenerationBackend(model, tok)
    params = SamplingParams(max_new_tokens=8, seed=123)
    rng_before = torch.random.get_rng_state()
    a, b = backend.generate(PROMPTS, params), backend.generate(PROMPTS, params)
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert torch.equal(a.response_ids, b.response_ids)
    assert torch.equal(a.sampler_logprobs, b.sampler_logprobs)
    c = backend.generate(PROMPTS, SamplingParams(max_new_tokens=8, seed=124))
    assert not torch.equal(a.response_ids, c.response_ids)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_stats_match_teacher_forcing(model, tok, temperature):
    # batch_size 3 < 4 prompts: also exercises chunking and Rollout.cat's re-padding.
    backend = HFGenerationBackend(model, tok, batch_size=3)
    r = backend.generate(PROMPTS, SamplingParams(max_new_tokens=12, temperature=temperature, seed=7))
    logp = torch.log_softmax(teacher_forced_logits(model, r) / temperature, -1)
    expected_lp = logp.gather(-1, r.response_ids.unsqueeze(-1)).squeeze(-1)
    expected_h = -(logp.exp() * logp).sum(-1)
    valid = r.response_mask.bool()
    torch.testing.assert_close(r.sampler_logprobs[valid], expected_lp[valid], rtol=0, atol=1e-4)
    torch.testing.assert_close(r.sampler_entropy[valid], expected_h[valid], rtol=0, atol=1e-4)


def test_top_k_logprobs_renormalise_but_entropy_does_not(model, tok):
    r = HFGenerationBackend(model, tok).generate(PROMPTS, SamplingParams(max_new_tokens=8, top_k=5, seed=1))
    logits = teacher_forced_logits(model, r)
    kth = logits.topk(5, -1).values[..., -1:]
    truncated = torch.log_softmax(logits.masked_fill(logits < kth, float("-inf")), -1)
    expected_lp = truncated.gather(-1, r.response_ids.unsqueeze(-1)).squeeze(-1)
    valid = r.response_mask.bool()
    torch.testing.assert_close(r.sampler_logprobs[valid], expected_lp[valid], rtol=0, atol=1e-4)
    torch.testing.assert_close(r.sampler_entropy[valid], entropy_of_logits(logits)[valid], rtol=0, atol=1e-4)


@pytest.mark.parametrize("temperature", [1e-4, 0.0])
def test_near_zero_temperature_is_argmax(model, tok, temperature):
    r = HFGenerationBackend(model, tok).generate(PROMPTS, SamplingParams(max_new_tokens=8, temperature=temperature))
    argmax = teacher_forced_logits(model, r).argmax(-1)
    valid = r.response_mask.bool()
    assert torch.equal(r.response_ids[valid], argmax[valid])
    if temperature == 0.0:
        assert r.sampler_logprobs.eq(0).all() and r.sampler_entropy.eq(0).all()


def test_entropy_temperature_logprobs_use_the_per_token_temperature(model, tok):
    # The random tiny model's raw entropies sit near ln(V) ≈ 4.58; h = 4.585 splits them.
    t_low, t_high, h = 0.5, 1.5, 4.585
    params = SamplingParams(max_new_tokens=12, entropy_temperature=(t_low, t_high, h), seed=3)
    r = HFGenerationBackend(model, tok).generate(PROMPTS, params)
    logits = teacher_forced_logits(model, r)
    temps = torch.where(entropy_of_logits(logits) > h, t_high, t_low).unsqueeze(-1)  # [B, R, 1]
    assert (temps == t_high).any() and (temps == t_low).any()
    logp = torch.log_softmax(logits / temps, -1)
    expected_lp = logp.gather(-1, r.response_ids.unsqueeze(-1)).squeeze(-1)
    valid = r.response_mask.bool()
    torch.testing.assert_close(r.sampler_logprobs[valid], expected_lp[valid], rtol=0, atol=1e-4)
    torch.testing.assert_close(r.sampler_entropy[valid], entropy_of_logits(logits / temps)[valid], rtol=0, atol=1e-4)


def test_token_id_prompts_equal_text_prompts(model, tok):
    backend, params = HFGenerationBackend(model, tok), SamplingParams(max_new_tokens=5, seed=9)
    by_text = backend.generate(PROMPTS, params)
    by_ids = backend.generate([tok(p)["input_ids"] for p in PROMPTS], params)
    assert torch.equal(by_text.response_ids, by_ids.response_ids)


# --- Batch-invariant sampling with row seeds -------------------------------------------------------


def response_tokens(r: Rollout, row: int) -> list[int]:
    return r.response_ids[row, : int(r.response_lengths[row])].tolist()


def test_row_seeds_give_the_same_tokens_alone_chunked_or_reordered(model, tok):
    seeds = [11, 22, -33, 2**40]
    params = SamplingParams(max_new_tokens=10, row_seeds=seeds)
    whole = HFGenerationBackend(model, tok).generate(PROMPTS, params)
    one_by_one = HFGenerationBackend(model, tok, batch_size=1).generate(PROMPTS, params)
    # Reversed, interleaved with other prompts (which changes the padded prompt length) and split
    # into chunks of 4 at different places; `seed` must not matter either.
    others = ["A long unrelated prompt that pads everything else", "7"]
    mixed_prompts = [others[0], PROMPTS[3], PROMPTS[2], others[1], PROMPTS[1], PROMPTS[0]]
    mixed_params = SamplingParams(max_new_tokens=10, row_seeds=[5, seeds[3], seeds[2], 6, seeds[1], seeds[0]], seed=1)
    mixed = HFGenerationBackend(model, tok, batch_size=4).generate(mixed_prompts, mixed_params)
    mixed_row = {0: 5, 1: 4, 2: 2, 3: 1}  # where PROMPTS[i] went in the mixed batch

    assert whole.row_seeds.tolist() == one_by_one.row_seeds.tolist() == seeds
    for i in range(len(PROMPTS)):
        tokens = response_tokens(whole, i)
        assert response_tokens(one_by_one, i) == tokens
        assert response_tokens(mixed, mixed_row[i]) == tokens
        n = len(tokens)
        torch.testing.assert_close(one_by_one.sampler_logprobs[i, :n], whole.sampler_logprobs[i, :n])
        torch.testing.assert_close(mixed.sampler_logprobs[mixed_row[i], :n], whole.sampler_logprobs[i, :n])


def test_row_seeds_differ_per_row_and_leave_the_global_rng_alone(model, tok):
    backend = HFGenerationBackend(model, tok)
    rng_before = torch.random.get_rng_state()
    r = backend.generate([PROMPTS[0]] * 8, SamplingParams(max_new_tokens=6, row_seeds=list(range(8))))
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert len({tuple(response_tokens(r, i)) for i in range(8)}) > 1
    # The same (prompt, seed) twice in one batch is the same sample: callers give each sample its seed.
    twice = backend.generate([PROMPTS[0]] * 2, SamplingParams(max_new_tokens=6, row_seeds=[3, 3]))
    assert response_tokens(twice, 0) == response_tokens(twice, 1) == response_tokens(r, 3)
    with pytest.raises(ValueError, match="row_seeds"):
        backend.generate(PROMPTS, SamplingParams(max_new_tokens=2, row_seeds=[1, 2]))


@pytest.mark.parametrize("temperature, top_k", [(1.0, 0), (0.7, 5)])
def test_row_seed_sampler_logprobs_match_teacher_forcing(model, tok, temperature, top_k):
    backend = HFGenerationBackend(model, tok, batch_size=3)
    params = SamplingParams(max_new_tokens=12, temperature=temperature, top_k=top_k, row_seeds=[7, 8, 9, 10])
    r = backend.generate(PROMPTS, params)
    logits = teacher_forced_logits(model, r) / temperature
    if top_k:
        kth = logits.topk(top_k, -1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    expected_lp = torch.log_softmax(logits, -1).gather(-1, r.response_ids.unsqueeze(-1)).squeeze(-1)
    valid = r.response_mask.bool()
    torch.testing.assert_close(r.sampler_logprobs[valid], expected_lp[valid], rtol=0, atol=1e-4)


def test_rollout_cat_keeps_row_seeds_and_refuses_to_mix(model, tok):
    backend = HFGenerationBackend(model, tok)
    a = backend.generate(PROMPTS[:2], SamplingParams(max_new_tokens=3, row_seeds=[1, 2]))
    b = backend.generate(PROMPTS[2:], SamplingParams(max_new_tokens=3, row_seeds=[3, 4]))
    assert Rollout.cat([a, b], tok.pad_token_id).row_seeds.tolist() == [1, 2, 3, 4]
    unseeded = backend.generate(PROMPTS[2:], SamplingParams(max_new_tokens=3, seed=0))
    assert unseeded.row_seeds is None and unseeded.to("cpu").row_seeds is None
    with pytest.raises(ValueError, match="row_seeds"):
        Rollout.cat([a, unseeded], tok.pad_token_id)


def test_hash_uniforms_look_uniform():
    # One row seed over 200 steps x 1000 token ids = 200k uniforms. Their mean has std
    # 0.289 / sqrt(2e5) ≈ 0.0006 and each of 10 buckets expects 20k ± 134, so the bounds
    # below (0.01 and ±10%) only catch a broken hash, never an unlucky draw.
    bits = torch.cat([hash_bits(torch.tensor([12345]), step, torch.arange(1000)) for step in range(200)])
    assert bits.min() >= 0 and bits.max() < 2**32
    u = (bits.double() + 0.5) / 2**32
    assert abs(u.mean().item() - 0.5) < 0.01
    counts = torch.histc(u.float(), bins=10, min=0, max=1)
    assert ((counts - 20_000).abs() < 2_000).all(), counts
    # Gumbel(0, 1) has mean = Euler's gamma ≈ 0.5772 and variance pi^2 / 6 ≈ 1.645.
    g = gumbel_from_bits(bits)
    assert abs(g.mean().item() - 0.5772) < 0.02 and abs(g.var().item() - 1.645) < 0.05


def test_hash_depends_on_seed_step_and_token_but_not_on_batch_position():
    seeds = torch.tensor([0, 1, -1, 2**40, 2**40 + 1])
    bits = hash_bits(seeds, 0, torch.arange(64))  # [5, 64]
    assert len({tuple(row) for row in bits.tolist()}) == 5  # every seed its own noise
    assert bits[0].unique().numel() == 64  # a bijection of the token id for a fixed key
    assert not torch.equal(hash_bits(seeds, 1, torch.arange(64)), bits)
    assert torch.equal(hash_bits(seeds.flip(0), 0, torch.arange(64)), bits.flip(0))
    assert torch.equal(hash_bits(seeds[2:3], 0, torch.arange(64)), bits[2:3])


def test_gumbel_noise_is_finite_at_the_extreme_hashes():
    # u = (bits + 0.5) / 2^32. bits = 0: u = 2^-33, G = -log(33 ln 2) = -3.1297.
    # bits = 2^32 - 1: u = 1 - 2^-33, -log(u) ≈ 2^-33, G = 33 ln 2 = 22.874 (float32 u would be 1 and G = inf).
    g = gumbel_from_bits(torch.tensor([0, 2**32 - 1]))
    torch.testing.assert_close(g, torch.tensor([-3.1297, 22.874]), rtol=0, atol=1e-3)


def test_gumbel_max_samples_the_softmax():
    # Class probabilities 0.1, 0.2, 0.3, 0.4 and one excluded class (-inf, as top-k/top-p leave it).
    # With 40k draws each frequency has std <= sqrt(0.25 / 4e4) = 0.0025; allow 0.01 (4 std).
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.0])
    n = 40_000
    draws = gumbel_max_sample(probs.log().expand(n, 5), row_seeds=torch.arange(n), step=17)
    freqs = torch.bincount(draws, minlength=5) / n
    torch.testing.assert_close(freqs, probs, rtol=0, atol=0.01)
    assert freqs[4] == 0


# --- Shared prompts: each run of identical prompt rows is prefilled once ---------------------------


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_new_tokens=10, temperature=0.9, top_k=20, row_seeds=list(range(12))),
        SamplingParams(max_new_tokens=10, seed=5),
    ],
)
def test_shared_prompt_prefill_changes_nothing_but_the_work(model, tok, params):
    # Groups of 3 copies, plus a lone prompt; "9" (1 token) is left-padded to the longest prompt.
    prompts = [p for p in PROMPTS[:3] for _ in range(3)] + [PROMPTS[3]] + [PROMPTS[0]] * 2
    shapes = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    try:
        shared = HFGenerationBackend(model, tok).generate(prompts, params)
    finally:
        hook.remove()
    plain = HFGenerationBackend(model, tok, share_prompt=False).generate(prompts, params)
    P = shared.prompt_ids.shape[1]
    # 5 runs of equal rows prefilled over P - 1 tokens, then generate runs all 12 rows' last prompt token.
    assert shapes[:2] == [(5, P - 1), (12, 1)]
    assert torch.equal(shared.prompt_ids, plain.prompt_ids) and torch.equal(shared.prompt_mask, plain.prompt_mask)
    assert torch.equal(shared.response_ids, plain.response_ids)
    assert torch.equal(shared.response_mask, plain.response_mask)
    # Only float rounding of the prompt's keys/values differs (on this CPU the values come out equal).
    torch.testing.assert_close(shared.sampler_logprobs, plain.sampler_logprobs, rtol=0, atol=1e-5)
    torch.testing.assert_close(shared.sampler_entropy, plain.sampler_entropy, rtol=0, atol=1e-5)


def test_distinct_prompts_are_prefilled_by_generate(model, tok):
    shapes = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    try:
        r = HFGenerationBackend(model, tok).generate(PROMPTS, SamplingParams(max_new_tokens=2, seed=0))
    finally:
        hook.remove()
    assert shapes[0] == tuple(r.prompt_ids.shape)
