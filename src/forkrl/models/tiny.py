"""Tiny tokenizers and randomly initialised causal LMs built in code, for tests and the CPU toy task.

Nothing here touches the network: the tokenizer is assembled with the `tokenizers` library and the
model is a freshly initialised Hugging Face `Qwen3ForCausalLM` (or `LlamaForCausalLM`), so the
whole pipeline — generation, log-probs, training, analysis — can run on a laptop in seconds while
exercising exactly the code paths a real checkpoint uses.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
UNK_TOKEN = "<|unk|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN, UNK_TOKEN)

# Every printable ASCII character except the exotic whitespace (\r, \x0b, \x0c), so that arbitrary
# short ASCII text (math problems, chain-of-thought) round-trips through encode/decode unchanged.
DEFAULT_VOCAB: tuple[str, ...] = tuple(c for c in string.printable if c not in "\r\x0b\x0c")

# The paper's prompt layout (SPEC: "User:\n[question]\n...\n\nAssistant:\n") as a chat template, so
# code written against `apply_chat_template` works unchanged on the tiny tokenizer.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}:\n{{ message['content'] }}\n\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:\n{% endif %}"
)

_ARCHS = {"qwen3": (Qwen3Config, Qwen3ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}


def build_tiny_tokenizer(
    vocab: Sequence[str] | None = None,
    chat_template: str | None = TINY_CHAT_TEMPLATE,
    model_max_length: int = 2048,
) -> PreTrainedTokenizerFast:
    """Build a small word/character-level tokenizer in code.

    Args:
        vocab: the non-special tokens. Single characters are the usual case; multi-character entries
            (e.g. ``"wait"``) are also allowed and are matched greedily, longest first, before falling
            back to single characters. Defaults to printable ASCII (`DEFAULT_VOCAB`). Characters not
            in the vocabulary map to ``<|unk|>``.
        chat_template: Jinja template for `apply_chat_template`; the default renders the paper's
            ``User:\\n...\\n\\nAssistant:\\n`` layout.
        model_max_length: stored on the tokenizer, mirrors `max_position_embeddings` of the model.

    Ids: the special tokens ``<|endoftext|>`` (EOS), ``<|pad|>`` (pad) and ``<|unk|>`` come first
    (ids 0, 1, 2), then `vocab` in the given order — so ids are stable for a given vocabulary.
    """
    tokens = list(DEFAULT_VOCAB if vocab is None else vocab)
    if len(set(tokens)) != len(tokens):
        raise ValueError("vocab contains duplicate entries")
    if any(t in SPECIAL_TOKENS or t == "" for t in tokens):
        raise ValueError(f"vocab must not contain special tokens {SPECIAL_TOKENS} or empty strings")
    token_to_id = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *tokens])}

    # One regex piece per token: multi-character entries first (longest wins), then any single
    # character. With behavior="isolated" every match becomes its own pre-token, which WordLevel
    # then looks up as a whole; unknown single characters become <|unk|>.
    multi = sorted((t for t in tokens if len(t) > 1), key=len, reverse=True)
    pattern = "|".join([*(re.escape(t) for t in multi), r"[\s\S]"])
    backend = Tokenizer(models.WordLevel(vocab=token_to_id, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    # Fuse concatenates tokens without the spaces the default decoder would insert between words.
    backend.decoder = decoders.Fuse()

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=model_max_length,
        padding_side="left",  # decoder-only generation wants the prompt flush against the response
        clean_up_tokenization_spaces=False,
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def build_tiny_model(
    tokenizer: PreTrainedTokenizerFast,
    arch: str = "qwen3",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 2048,
    seed: int = 0,
    tie_word_embeddings: bool = True,
) -> PreTrainedModel:
    """A randomly initialised causal LM whose vocabulary matches `tokenizer` (float32, eval mode).

    Args:
        arch: ``"qwen3"`` (`Qwen3ForCausalLM`, the paper's family) or ``"llama"`` (`LlamaForCausalLM`).
        seed: the weights depend only on this seed and the sizes; the global RNG state is restored.
        tie_word_embeddings: share the input embedding and the LM head, as small Qwen3 models do.

    The EOS, pad and BOS ids are written to both `config` and `generation_config` (BOS = EOS, as in
    Qwen3, since the tiny tokenizer adds no BOS token).
    """
    if arch not in _ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(_ARCHS)}")
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError("hidden_size must divide by num_heads, and num_heads by num_kv_heads")
    config_cls, model_cls = _ARCHS[arch]
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    # fork_rng keeps the caller's global RNG untouched while making the init depend only on `seed`.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    model.generation_config = GenerationConfig(bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=pad_id)
    return model.eval()


def save_tiny_model_dir(
    path: str | Path,
    vocab: Sequence[str] | None = None,
    arch: str = "qwen3",
    seed: int = 0,
    **model_kwargs,
) -> Path:
    """Write a tiny tokenizer + model checkpoint (safetensors) that `AutoModelForCausalLM` and
    `AutoTokenizer.from_pretrained` load offline. Extra keyword arguments go to `build_tiny_model`.

    Returns the directory path.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(vocab)
    model = build_tiny_model(tokenizer, arch=arch, seed=seed, **model_kwargs)
    model.save_pretrained(path)  # safetensors is the default format
    tokenizer.save_pretrained(path)
    return path
