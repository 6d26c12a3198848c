"""Tiny model factory round-trips through Hugging Face's Auto classes; load_policy and the
hidden-state forward used by the fused log-prob path agree with the full-logits forward."""

import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from forkrl.models import (
    build_tiny_model,
    build_tiny_tokenizer,
    forward_hidden_states,
    get_lm_head,
    load_policy,
    save_tiny_model_dir,
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny"), seed=3)


def _left_padded_batch(tokenizer, texts):
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


def test_tokenizer_round_trips_ascii_and_has_specials():
    tok = build_tiny_tokenizer()
    text = "User:\nWhat is 12+3*(4-5)?\n\nAssistant:\nwait, so x = -3.\n"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert (tok.eos_token, tok.pad_token, tok.padding_side) == ("<|endoftext|>", "<|pad|>", "left")
    assert tok.eos_token_id != tok.pad_token_id
    chat = tok.apply_chat_template([{"role": "user", "content": "1+1"}], tokenize=False, add_generation_prompt=True)
    assert chat == "User:\n1+1\n\nAssistant:\n"


def test_tokenizer_multichar_vocab_is_matched_longest_first():
    tok = build_tiny_tokenizer(list("0123456789 ") + ["wait", "wa"])
    pieces = tok.convert_ids_to_tokens(tok("wait wa w1")["input_ids"])
    assert pieces == ["wait", " ", "wa", " ", "<|unk|>", "1"]


def test_saved_dir_loads_with_auto_classes_and_same_logits(tiny_dir):
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, seed=3)
    auto_model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    auto_tok = AutoTokenizer.from_pretrained(tiny_dir)
    text = "User:\n2+2\n"
    assert auto_tok(text)["input_ids"] == tok(text)["input_ids"]
    assert auto_tok.eos_token_id == tok.eos_token_id and auto_tok.pad_token_id == tok.pad_token_id
    assert auto_model.generation_config.eos_token_id == tok.eos_token_id
    ids = torch.tensor([tok(text)["input_ids"]])
    torch.testing.assert_close(auto_model(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_model_is_deterministic_from_seed_and_leaves_global_rng_alone():
    tok = build_tiny_tokenizer()
    rng_before = torch.random.get_rng_state()
    a, b, c = (build_tiny_model(tok, seed=s) for s in (0, 0, 1))
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    ids = torch.tensor([[5, 6, 7]])
    assert torch.equal(a(ids).logits, b(ids).logits)
    assert not torch.equal(a(ids).logits, c(ids).logits)
    assert a.config.vocab_size == len(tok)


@pytest.mark.parametrize("arch,tied", [("llama", True), ("qwen3", False)])
def test_hidden_states_times_lm_head_equal_logits(arch, tied):
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, arch=arch, tie_word_embeddings=tied)
    ids, mask = _left_padded_batch(tok, ["1+1=", "User:\nlonger prompt\n"])
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    weight, bias = get_lm_head(model)
    hidden = forward_hidden_states(model, ids, mask)  # [B, L, H], default positions from the mask
    logits = hidden @ weight.T + (bias if bias is not None else 0)
    expected = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    assert hidden.shape == (*ids.shape, model.config.hidden_size)


@pytest.mark.parametrize("dtype,expected", [("auto", torch.float32), ("bfloat16", torch.bfloat16)])
def test_load_policy_dtypes(tiny_dir, dtype, expected):
    model, tok = load_policy(tiny_dir, dtype=dtype, device="cpu")
    assert next(model.parameters()).dtype == expected
    assert tok.padding_side == "left" and tok.pad_token == "<|pad|>"


def test_load_policy_sets_pad_to_eos_when_missing(tiny_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    AutoModelForCausalLM.from_pretrained(tiny_dir).save_pretrained(tmp_path)
    _, loaded = load_policy(str(tmp_path), device="cpu")
    assert loaded.pad_token_id == loaded.eos_token_id


def test_load_policy_missing_local_path_names_it(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        load_policy(str(missing))
    with pytest.raises(ValueError, match="dtype"):
        load_policy(str(tmp_path), dtype="float64")


def test_lora_without_peft_says_how_to_install(tiny_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # makes `import peft` fail as if it were not installed
    with pytest.raises(ImportError, match=r"forkrl\[lora\]"):
        load_policy(tiny_dir, device="cpu", lora_rank=4)
