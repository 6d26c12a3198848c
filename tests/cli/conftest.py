"""Fixtures of the bad-input suite: tiny models whose tokenizers differ from the shared tiny model's."""

import pytest

from forkrl.models.tiny import DEFAULT_VOCAB, save_tiny_model_dir


@pytest.fixture(scope="session")
def other_tokenizer_model_dir(tmp_path_factory):
    """Same vocabulary size as `tiny_model_dir` (100 tokens), other ids: its ids mean other text."""
    return str(save_tiny_model_dir(tmp_path_factory.mktemp("other_tok"), vocab=DEFAULT_VOCAB[::-1]))


@pytest.fixture(scope="session")
def small_vocab_model_dir(tmp_path_factory):
    """A smaller vocabulary (53 tokens) than `tiny_model_dir`'s: the shared model's ids overflow it."""
    return str(save_tiny_model_dir(tmp_path_factory.mktemp("small_vocab"), vocab=DEFAULT_VOCAB[:50]))
