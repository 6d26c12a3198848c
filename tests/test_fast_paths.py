"""The fast paths are on for the locked transformers, a declined one warns once per run naming the
path, the reason and the version, and every step of a run records which ran."""

import json
import logging

import pytest
import torch
import transformers

from forkrl import fast_paths
from forkrl.models import build_tiny_model, build_tiny_tokenizer, compat
from forkrl.models.scoring import _shared_prefix_hidden_states, score_responses, shared_prefix_unsupported
from forkrl.rollout import HFGenerationBackend, SamplingParams
from forkrl.train.trainer import run_training
from tests.train.conftest import tiny_overrides

ALL = sorted(fast_paths.DESCRIPTIONS)
GENERATION = [
    fast_paths.INPLACE_KV_CACHE,
    fast_paths.SHARED_PROMPT_PREFILL,
    fast_paths.DECODE_PHASES,
    fast_paths.LEAN_DECODE_LOOP,
]
PROMPTS = ["1+1=", "1+1=", "1+1=", "x = 3, y =", "9", "9"]


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return build_tiny_model(tok, seed=0)


def _generate(model, tok, **backend_kwargs):
    params = SamplingParams(max_new_tokens=12, row_seeds=list(range(len(PROMPTS))))
    return HFGenerationBackend(model, tok, **backend_kwargs).generate(PROMPTS, params)


def test_every_fast_path_is_on_for_the_installed_transformers(model, tok):
    """The guard against a silent fallback: generation and scoring of repeated prompts use them all."""
    rollout = _generate(model, tok, decode_phase=4)
    with torch.no_grad():
        score_responses(model, rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids, rollout.response_mask)
    assert fast_paths.status() == dict.fromkeys(fast_paths.DESCRIPTIONS, "on")
    assert fast_paths.step_flags() == {f"fast_path/{name}": 1.0 for name in ALL}
    assert fast_paths.step_flags() == {}  # a new window starts empty


def test_a_training_run_records_the_fast_paths_of_every_step(tiny_model_dir, prompts_file, tmp_path):
    out = tmp_path / "run"
    run_training(None, tiny_overrides(tiny_model_dir, prompts_file, str(out), **{"rollout.decode_phase": 4}))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2
    for record in records:
        assert {k: v for k, v in record.items() if k.startswith("fast_path/")} == {f"fast_path/{n}": 1.0 for n in ALL}


def test_paths_that_do_not_apply_are_not_declined(model, tok, caplog):
    caplog.set_level(logging.WARNING, logger="forkrl.fast_paths")
    params = SamplingParams(max_new_tokens=4, row_seeds=[0, 1])
    rollout = HFGenerationBackend(model, tok).generate(["ab", "cd"], params)  # distinct prompts, no phases
    with torch.no_grad():
        score_responses(model, rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids, rollout.response_mask)
    assert fast_paths.status() == {
        fast_paths.SHARED_PREFIX_SCORING: "not used",
        fast_paths.SHARED_PROMPT_PREFILL: "not used",
        fast_paths.INPLACE_KV_CACHE: "on",
        fast_paths.DECODE_PHASES: "not used",
        fast_paths.LEAN_DECODE_LOOP: "on",
    }
    assert caplog.records == []


def test_warning_text_names_the_path_the_reason_and_the_version():
    text = fast_paths.warning_text(fast_paths.SHARED_PROMPT_PREFILL, "Foo.forward takes no cache argument")
    assert text == (
        "fast path off: shared-prompt prefill (each group's prompt prefilled once in generation): "
        f"Foo.forward takes no cache argument (transformers {transformers.__version__}); "
        "results are the same up to float rounding, but slower"
    )


@pytest.mark.declines_fast_paths
def test_a_declined_path_warns_once_per_run_and_changes_no_token(model, tok, caplog, monkeypatch):
    expected = _generate(model, tok, decode_phase=4)
    fast_paths.reset()
    caplog.set_level(logging.WARNING, logger="forkrl.fast_paths")
    monkeypatch.setattr(compat, "cache_argument", lambda module: None)  # as if the model took no cache
    first = _generate(model, tok, decode_phase=4)
    _generate(model, tok, decode_phase=4)  # a second call in the same run warns no more
    reason = f"{type(model.get_decoder()).__name__}.forward takes no cache argument (cache or past_key_values)"
    assert [r.getMessage() for r in caplog.records] == [
        fast_paths.warning_text(fast_paths.INPLACE_KV_CACHE, reason),
        fast_paths.warning_text(fast_paths.DECODE_PHASES, reason),
        fast_paths.warning_text(fast_paths.LEAN_DECODE_LOOP, reason),
        fast_paths.warning_text(fast_paths.SHARED_PROMPT_PREFILL, reason),
    ]
    assert {name: fast_paths.status()[name] for name in GENERATION} == dict.fromkeys(GENERATION, f"off: {reason}")
    assert fast_paths.step_flags() == {f"fast_path/{name}": 0.0 for name in sorted(GENERATION)}
    assert torch.equal(first.response_ids, expected.response_ids)
    torch.testing.assert_close(first.sampler_logprobs, expected.sampler_logprobs, rtol=0, atol=1e-5)
    fast_paths.reset()
    assert fast_paths.status() == dict.fromkeys(fast_paths.DESCRIPTIONS, "not used")


@pytest.mark.declines_fast_paths
def test_scoring_declines_models_it_cannot_share_a_prefix_for(model, tok, caplog):
    caplog.set_level(logging.WARNING, logger="forkrl.fast_paths")
    rollout = _generate(model, tok)
    batch = (rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids, rollout.response_mask)
    config = model.get_decoder().config
    saved = config.layer_types
    config.layer_types = ["full_attention", "sliding_attention"]  # as a Gemma/Qwen2-style hybrid declares
    try:
        reason = shared_prefix_unsupported(model.get_decoder())
        hidden = _shared_prefix_hidden_states(model, *batch)
    finally:
        config.layer_types = saved
    assert reason == "the model has sliding_attention layers (only full attention is supported)"
    assert hidden is None  # the caller then runs the plain path
    assert fast_paths.status()[fast_paths.SHARED_PREFIX_SCORING] == f"off: {reason}"
    assert [r.getMessage() for r in caplog.records] == [
        fast_paths.warning_text(fast_paths.SHARED_PREFIX_SCORING, reason)
    ]


def test_combine_keeps_the_first_decline():
    a = {fast_paths.INPLACE_KV_CACHE: "on", fast_paths.DECODE_PHASES: "not used"}
    b = {fast_paths.INPLACE_KV_CACHE: "off: x", fast_paths.DECODE_PHASES: "on"}
    combined = fast_paths.combine(a, b)
    assert combined[fast_paths.INPLACE_KV_CACHE] == "off: x"
    assert combined[fast_paths.DECODE_PHASES] == "on"
    assert combined[fast_paths.SHARED_PREFIX_SCORING] == "not used"
