"""score_responses: the shared-prefix path (each distinct prompt run once, responses against copies of
its keys/values) gives the plain path's log-probs, entropies and parameter gradients."""

import types

import pytest
import torch

from forkrl import fast_paths
from forkrl.models import build_tiny_model, build_tiny_tokenizer, compat
from forkrl.models.loading import forward_hidden_states, get_lm_head
from forkrl.models.scoring import (
    PLAIN_MARGIN,
    _shared_prefix_hidden_states,
    prompt_groups,
    score_responses,
    scoring_cost,
)
from forkrl.ops.logprobs import fused_linear_logprobs_and_entropy

TEMPERATURE = 0.7


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def _float64_rms_norm(self, x):
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def make_model(tok, arch="qwen3", dtype=torch.float64, gradient_checkpointing=False):
    """A tiny model in training mode. In float64 its RMSNorms are made to stay in float64: transformers'
    norms compute in float32 whatever the input dtype, which caps the agreement of the two paths'
    gradients at ~1e-7 (they sum the G responses' gradients at different points: before the prompt's
    norm backward on the shared path, after it on the plain path)."""
    model = build_tiny_model(tok, arch=arch, seed=0).to(dtype).train()
    if dtype == torch.float64:
        for module in model.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.forward = types.MethodType(_float64_rms_norm, module)
    if gradient_checkpointing:
        compat.enable_activation_checkpointing(model)
    return model


def make_batch(prompt_lens, group_sizes, response_lens, pad_id, seed=0):
    """Groups of identical left-padded prompts (one random prompt of `prompt_lens[i]` tokens repeated
    `group_sizes[i]` times) and right-padded random responses of `response_lens` tokens."""
    gen = torch.Generator().manual_seed(seed)
    P, R, B = max(prompt_lens), max(response_lens), sum(group_sizes)
    prompt_ids = torch.full((B, P), pad_id)
    prompt_mask = torch.zeros((B, P), dtype=torch.long)
    row = 0
    for n, g in zip(prompt_lens, group_sizes):
        prompt_ids[row : row + g, P - n :] = torch.randint(3, 90, (n,), generator=gen)
        prompt_mask[row : row + g, P - n :] = 1
        row += g
    response_mask = (torch.arange(R) < torch.tensor(response_lens)[:, None]).long()
    response_ids = torch.randint(3, 90, (B, R), generator=gen).masked_fill(response_mask == 0, pad_id)
    return prompt_ids, prompt_mask, response_ids, response_mask


def score_with_grads(model, batch, share_prompt):
    """`(logprobs, entropy, {name: grad})` of a loss that uses both outputs."""
    model.zero_grad(set_to_none=True)
    logprobs, entropy, _ = score_responses(model, *batch, TEMPERATURE, share_prompt=share_prompt)
    (logprobs.sum() + 0.5 * entropy.sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logprobs.detach(), entropy.detach(), grads


def assert_paths_agree(model, batch, rtol, atol):
    lp_plain, ent_plain, grads_plain = score_with_grads(model, batch, share_prompt=False)
    lp_shared, ent_shared, grads_shared = score_with_grads(model, batch, share_prompt=True)
    assert fast_paths.status()[fast_paths.SHARED_PREFIX_SCORING] == "on"  # the comparison is not plain vs plain
    torch.testing.assert_close(lp_shared, lp_plain, rtol=rtol, atol=atol)
    torch.testing.assert_close(ent_shared, ent_plain, rtol=rtol, atol=atol)
    assert grads_shared.keys() == grads_plain.keys() and grads_plain
    for name, grad in grads_plain.items():
        assert grad.abs().max() > 0, name  # every parameter is exercised
        torch.testing.assert_close(grads_shared[name], grad, rtol=rtol, atol=atol, msg=name)


# Two groups with different prompt lengths (5 tokens padded to 9 on the left, and 9), responses of
# every length from 1 to R = 7 (right-padded), and a one-row group in between.
MIXED = dict(prompt_lens=[5, 3, 9], group_sizes=[3, 1, 4], response_lens=[7, 3, 1, 5, 7, 2, 6, 4])


def test_prompt_groups_finds_runs_of_equal_consecutive_rows():
    a, b = [5, 6, 7], [5, 6, 8]
    ids = torch.tensor([a, a, b, b, b, a])
    first_rows, row_to_group = prompt_groups(ids, torch.ones_like(ids))
    # The last row repeats the first prompt but not its predecessor: a run of its own.
    assert first_rows.tolist() == [0, 2, 5]
    assert row_to_group.tolist() == [0, 0, 1, 1, 1, 2]
    # Equal ids with different masks are different prompts (e.g. a pad id that is also a real token).
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    assert prompt_groups(torch.tensor([a, a]), mask)[0].tolist() == [0, 1]


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_shared_prefix_equals_plain_path_float64(tok, arch, gradient_checkpointing):
    model = make_model(tok, arch, gradient_checkpointing=gradient_checkpointing)
    batch = make_batch(**MIXED, pad_id=tok.pad_token_id)
    assert _shared_prefix_hidden_states(model, *batch) is not None  # the shared path really runs
    assert_paths_agree(model, batch, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_shared_prefix_equals_plain_path_float32(tok, gradient_checkpointing):
    model = make_model(tok, dtype=torch.float32, gradient_checkpointing=gradient_checkpointing)
    batch = make_batch(prompt_lens=[12, 20], group_sizes=[8, 8], response_lens=list(range(1, 17)), pad_id=1)
    # float32 rounding differs between the paths (sums over other batch shapes): ~1e-6 on the values.
    assert_paths_agree(model, batch, rtol=1e-4, atol=1e-5)


def test_decoder_runs_each_prompt_once_and_responses_without_their_last_token(tok):
    model = make_model(tok)
    batch = make_batch(**MIXED, pad_id=tok.pad_token_id)
    shapes = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    try:
        score_responses(model, *batch)
    finally:
        hook.remove()
    # 3 distinct prompts of P = 9 tokens, then all 8 rows' response tokens 0..R-2 (token R-1 predicts nothing).
    assert shapes == [(3, 9), (8, 6)]


def test_all_distinct_prompts_use_the_plain_path(tok):
    model = make_model(tok)
    batch = make_batch(prompt_lens=[4, 6, 6], group_sizes=[1, 1, 1], response_lens=[3, 5, 2], pad_id=tok.pad_token_id)
    assert _shared_prefix_hidden_states(model, *batch) is None
    torch.testing.assert_close(
        score_responses(model, *batch), score_responses(model, *batch, share_prompt=False), rtol=0, atol=0
    )


def test_one_token_responses_come_from_the_prompt_pass_alone(tok):
    model = make_model(tok)
    batch = make_batch(prompt_lens=[4, 7], group_sizes=[2, 3], response_lens=[1] * 5, pad_id=tok.pad_token_id)
    assert_paths_agree(model, batch, rtol=1e-10, atol=1e-10)


def test_no_grad_scoring_of_the_old_policy(tok):
    model = make_model(tok).eval()
    batch = make_batch(**MIXED, pad_id=tok.pad_token_id)
    with torch.no_grad():
        shared, plain = score_responses(model, *batch), score_responses(model, *batch, share_prompt=False)
    torch.testing.assert_close(shared, plain, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_lora_model(tok, gradient_checkpointing):
    peft = pytest.importorskip("peft")
    model = make_model(tok, gradient_checkpointing=gradient_checkpointing)
    if gradient_checkpointing:
        model.enable_input_require_grads()  # as `load_policy` does: the embeddings are frozen
    # init_lora_weights=False: random A and B, so that every LoRA matrix gets a nonzero gradient.
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    model = peft.get_peft_model(model, config)
    batch = make_batch(**MIXED, pad_id=tok.pad_token_id)
    assert _shared_prefix_hidden_states(model, *batch) is not None
    assert_paths_agree(model, batch, rtol=1e-10, atol=1e-10)


def test_scoring_cost_by_hand():
    """H 8, F 16, 2 heads (d 4), 1 kv head: a token costs 8·4·(4 + 2) + 3·8·16 = 576, a pair 2·2·4 = 16.
    B 4, U 2, P 3, R 5: plain (packed, causal: half the square) 4·8·576 + 4·8·8/2·16 = 20,480; shared
    (2·3 + 4·4)·576 + (2·3·3/2 + 4·4·7)·16 = 12,672 + 1,936 = 14,608 with unpadded prompts (their
    causal half), + 2·9/2·16 = 14,752 with padded ones (masked: the whole square)."""
    config = types.SimpleNamespace(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_key_value_heads=1)
    shapes = dict(rows=4, groups=2, prompt_len=3, response_len=5)
    assert scoring_cost(config, **shapes, prompts_padded=False) == (20480.0, 14608.0)
    assert scoring_cost(config, **shapes, prompts_padded=True) == (20480.0, 14752.0)
    assert scoring_cost(types.SimpleNamespace(hidden_size=8), **shapes, prompts_padded=True) is None


def test_auto_shares_only_where_it_is_cheaper(tok):
    """The default, "auto", takes the shared path for long prompts and short responses, and the plain
    path, with the plain path's exact numbers and nothing reported, for 2-token prompts and 150-token
    responses: there the rectangle of masked attention costs more than 7 of 8 prompt copies save."""
    model = make_model(tok).eval()
    short_prompts = make_batch(prompt_lens=[2], group_sizes=[8], response_lens=[150] * 8, pad_id=tok.pad_token_id)
    long_prompts = make_batch(prompt_lens=[30], group_sizes=[8], response_lens=[6] * 8, pad_id=tok.pad_token_id)
    cfg = model.get_decoder().config
    unpadded = dict(rows=8, groups=1, prompts_padded=False)
    plain, shared = scoring_cost(cfg, prompt_len=2, response_len=150, **unpadded)
    assert plain < PLAIN_MARGIN * shared
    plain, shared = scoring_cost(cfg, prompt_len=30, response_len=6, **unpadded)
    assert shared < plain
    with torch.no_grad():
        fast_paths.reset()
        auto = score_responses(model, *short_prompts)
        assert fast_paths.status()[fast_paths.SHARED_PREFIX_SCORING] == "not used"
        torch.testing.assert_close(auto, score_responses(model, *short_prompts, share_prompt=False), rtol=0, atol=0)
        forced = score_responses(model, *short_prompts, share_prompt=True)
        assert fast_paths.status()[fast_paths.SHARED_PREFIX_SCORING] == "on"
        torch.testing.assert_close(forced, auto, rtol=1e-10, atol=1e-10)
        fast_paths.reset()
        score_responses(model, *long_prompts)
        assert fast_paths.status()[fast_paths.SHARED_PREFIX_SCORING] == "on"


def masked_reference_scores(model, prompt_ids, prompt_mask, response_ids, response_mask):
    """The plain path as it was: one forward over the padded `[B, P + R]` rows with their attention mask."""
    hidden = forward_hidden_states(
        model, torch.cat([prompt_ids, response_ids], 1), torch.cat([prompt_mask, response_mask], 1)
    )[:, prompt_ids.shape[1] - 1 : -1]
    valid = response_mask.bool()
    weight, bias = get_lm_head(model)
    outputs = fused_linear_logprobs_and_entropy(hidden[valid], weight, response_ids[valid], bias, TEMPERATURE)
    zeros = torch.zeros(response_ids.shape, dtype=outputs[0].dtype)
    return tuple(zeros.masked_scatter(valid, values) for values in outputs)


def test_plain_path_packs_rows_and_runs_without_a_mask(tok):
    """The plain path moves each row's real tokens to the front and runs the decoder with no attention
    mask; log-probs, entropies and every parameter's gradient equal the padded, masked forward's, and
    more padding on either side changes nothing."""
    model = make_model(tok)
    batch = make_batch(**MIXED, pad_id=tok.pad_token_id)
    masks = []
    hook = model.get_decoder().register_forward_pre_hook(
        lambda m, args, kwargs: masks.append(kwargs.get("attention_mask", "missing")), with_kwargs=True
    )
    try:
        lp, ent, grads = score_with_grads(model, batch, share_prompt=False)
    finally:
        hook.remove()
    assert masks == [None]
    model.zero_grad(set_to_none=True)
    ref_lp, ref_ent = masked_reference_scores(model, *batch)
    (ref_lp.sum() + 0.5 * ref_ent.sum()).backward()
    torch.testing.assert_close(lp, ref_lp.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ent, ref_ent.detach(), rtol=1e-10, atol=1e-10)
    for name, param in model.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-10, atol=1e-10, msg=name)
    prompt_ids, prompt_mask, response_ids, response_mask = batch
    pad = tok.pad_token_id
    wider = (
        torch.cat([torch.full((len(prompt_ids), 3), pad), prompt_ids], 1),
        torch.cat([torch.zeros((len(prompt_ids), 3), dtype=torch.long), prompt_mask], 1),
        torch.cat([response_ids, torch.full((len(prompt_ids), 4), pad)], 1),
        torch.cat([response_mask, torch.zeros((len(prompt_ids), 4), dtype=torch.long)], 1),
    )
    with torch.no_grad():
        wide_lp, wide_ent, _ = score_responses(model, *wider, TEMPERATURE, share_prompt=False)
    torch.testing.assert_close(wide_lp[:, : lp.shape[1]], lp, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(wide_ent[:, : ent.shape[1]], ent, rtol=1e-10, atol=1e-10)
    assert not wide_lp[:, lp.shape[1] :].any()
