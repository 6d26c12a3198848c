"""Run by test_vllm_backend in a fresh process: build, use and close an engine inside a trainer-like
process (a gloo default group, 2 threads, seeded RNGs) and check that nothing it changed stays
changed. Usage: python -m tests.vllm.process_state_probe MODEL_DIR PG_FILE"""

import gc
import os
import random
import subprocess
import sys

import numpy as np
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoTokenizer

from forkrl.rollout.base import SamplingParams
from forkrl.rollout.vllm import VLLMGenerationBackend


def child_env() -> str:
    """What a reward worker started now would inherit (LD_PRELOAD, OpenMP and vLLM settings)."""
    code = "import os; print(sorted((k, v) for k, v in os.environ.items() if k != 'PWD'))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout


def snapshot():
    return {
        "threads": torch.get_num_threads(),
        "set_num_threads": torch.set_num_threads,
        "environ": dict(os.environ),
        "child_env": child_env(),
        "gc_frozen": gc.get_freeze_count(),
    }


def main(model_dir: str, pg_file: str) -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    dist.init_process_group("gloo", init_method=f"file://{pg_file}", rank=0, world_size=1)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.set_num_threads(2)
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    rng = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    before = snapshot()
    backend = VLLMGenerationBackend(
        model.config,
        lambda: model.state_dict().items(),
        tokenizer,
        engine_options={"kv_cache_memory_bytes": 64 * 2**20, "max_model_len": 256},
    )
    assert torch.equal(torch.get_rng_state(), rng[0]), "torch RNG changed by the engine's start"
    assert (np.random.get_state()[1] == rng[1]).all(), "numpy RNG changed by the engine's start"
    assert random.getstate() == rng[2], "random's RNG changed by the engine's start"
    backend.generate(["hello", "abc"], SamplingParams(max_new_tokens=4, row_seeds=[1, 2]))
    during = snapshot()
    backend.close()
    after = snapshot()
    for name, state in (("running", during), ("closed", after)):
        for key, value in before.items():
            assert state[key] == value, f"{key} changed while the engine was {name}: {value!r} -> {state[key]!r}"
    torch.set_num_threads(1)
    assert torch.get_num_threads() == 1, "torch.set_num_threads no longer works"
    assert dist.is_initialized(), "the trainer's process group was destroyed by the engine's shutdown"
    t = torch.ones(1)
    dist.all_reduce(t)
    assert t.item() == 1.0
    dist.destroy_process_group()
    print("process state unchanged")


if __name__ == "__main__":
    main(*sys.argv[1:3])
