"""A run's state in and out of checkpoints: model, optimizer, scheduler, RNG and data position.

`save_training_state` writes one `forkrl.train.checkpoint` directory from the live run under any
strategy (one process, DDP, FSDP2; LoRA), and `restore_training_state` puts a checkpoint's
trainer state back. The optimizer state is full (unsharded) and keyed by parameter name, so the
same file resumes a run on one process, under DDP or under FSDP2, whatever the process count.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from forkrl.distributed import barrier
from forkrl.train.checkpoint import restore_rng_state, save_checkpoint
from forkrl.train.setup import PolicyModels, tied_parameter_names


def save_training_state(
    models: PolicyModels,
    optimizer: torch.optim.Optimizer,
    scheduler,
    run_dir: Path,
    step: int,
    trainer_state: dict[str, Any],
    keep: int,
    is_main: bool,
) -> Path | None:
    """Checkpoint `step`; every process calls (FSDP2 gathers), the main one writes and returns the path.

    With LoRA, the checkpoint's model is a merged copy (loadable by `from_pretrained`) and the
    adapter itself goes to `adapter/` for resuming.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
    )

    # Full state dicts in the main process's CPU memory. Under FSDP2 gathering them is a
    # collective (every process calls); otherwise the main process's own copy is the whole.
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    optimizer_state = model_state = None
    path = None
    if models.sharded or is_main:
        optimizer_state = get_optimizer_state_dict(models.policy_scorer, optimizer, options=full)
    if models.sharded:
        # Tied weights (lm_head = embed_tokens) come back as two tensors; write the first name
        # only, as `save_pretrained` does for the shared parameter.
        tied = tied_parameter_names(models.model)
        model_state = {k: v for k, v in models.full_state_dict(cpu_offload=True).items() if k not in tied}
    if is_main:
        model, extra = models.model, None
        if models.lora:
            model = copy.deepcopy(models.model).merge_and_unload()
            extra = lambda tmp: models.model.save_pretrained(tmp / "adapter")  # noqa: E731
        path = save_checkpoint(
            run_dir,
            step,
            model,
            models.tokenizer,
            optimizer_state,
            scheduler,
            trainer_state,
            keep=keep,
            extra=extra,
            model_state=model_state,
        )
    barrier()
    return path


def restore_training_state(models: PolicyModels, optimizer, scheduler, saved: dict[str, Any]) -> dict[str, Any]:
    """Optimizer, scheduler and RNG states from `trainer_state.pt`; returns `{"step", "trainer"}`
    (the step reached and the trainer's own part: sampler position, bad-step count)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(
        models.policy_scorer,
        optimizer,
        optim_state_dict=saved["optimizer"],
        options=StateDictOptions(full_state_dict=True),
    )
    scheduler.load_state_dict(saved["scheduler"])
    restore_rng_state(saved["rng"])
    return {"step": saved["step"], "trainer": saved["trainer"]}
