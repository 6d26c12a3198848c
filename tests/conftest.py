"""Fixtures shared by all test packages: a tiny HF model directory and a small prompt file."""

import importlib.util
import json

import pytest
import torch

from forkrl import fast_paths
from forkrl.models.tiny import save_tiny_model_dir

# tests/gpu needs CUDA and has its own command (`make test-gpu`); without CUDA it is not collected.
collect_ignore_glob = [] if torch.cuda.is_available() else ["gpu/*"]
_HAVE_VLLM = importlib.util.find_spec("vllm") is not None


def pytest_report_header(config):
    if not _HAVE_VLLM:
        return "tests/vllm: not collected, vllm is not installed here (`make test-vllm` runs them; CI does)"
    return None


@pytest.fixture(autouse=True)
def no_fast_path_declined(request):
    """Every test fails if a fast path was declined in its process (a silent fallback on the locked
    transformers), except those marked `declines_fast_paths`, which make it happen on purpose."""
    fast_paths.reset()
    yield
    if request.node.get_closest_marker("declines_fast_paths") is None:
        off = {name: value for name, value in fast_paths.status().items() if value.startswith("off")}
        assert not off, f"fast paths declined: {off}"


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
