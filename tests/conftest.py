"""Fixtures shared by all test packages: a tiny HF model directory and a small prompt file."""

import json

import pytest

from forkrl.models.tiny import save_tiny_model_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Qwen3 model + tokenizer saved like any HF checkpoint."""
    return str(save_tiny_model_dir(tmp_path_factory.mktemp("tiny_model"), seed=0))


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [{"question": f"what is {i} plus {i + 1}?", "answer": str(2 * i + 1)} for i in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)
