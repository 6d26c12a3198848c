"""A run's state in and out of checkpoints: the policy's weights, and the state of each part.

`Checkpointer` writes one `forkrl.train.checkpoint` directory from the live run under any strategy
(one process, DDP, FSDP2; LoRA) and puts a checkpoint's state back. The parts it is handed are
*stateful*, each saving and loading itself (`state_dict()` / `load_state_dict(state)`), and each
is stored in `trainer_state.pt` under its name: the trainer's are "optimizer" (`OptimizerState`),
"scheduler", "rng" (`RNGState`) and "trainer" (sampler position, bad-step count). A new part is
one more entry in that mapping. The optimizer state is full (unsharded) and keyed by parameter
name, so the same file resumes a run on one process, under DDP or under FSDP2, whatever the
process count.

The weights are not such a part: they go to safetensors (`save_pretrained`), and on resume they
are loaded before the model is wrapped (`forkrl.train.setup.load_models`).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from forkrl.distributed import barrier
from forkrl.train.checkpoint import save_checkpoint
from forkrl.train.setup import PolicyModels, tied_parameter_names


class Stateful(Protocol):
    """A part of the run that checkpoints itself (as `torch.distributed.checkpoint.stateful.Stateful`)."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


class OptimizerState:
    """The optimizer as a checkpointable part: its full (unsharded) state keyed by parameter name.
    Under FSDP2 `state_dict` gathers the shards (a collective: every process calls)."""

    def __init__(self, models: PolicyModels, optimizer):
        self.models, self.optimizer = models, optimizer

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        # In the main process's CPU memory; under FSDP2 gathering it is a collective.
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(self.models.policy_scorer, self.optimizer, options=full)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(
            self.models.policy_scorer,
            self.optimizer,
            optim_state_dict=state,
            options=StateDictOptions(full_state_dict=True),
        )


class Checkpointer:
    """Saves the run's checkpoints into `run_dir` and restores the parts from one.

    `parts`: name -> stateful part, saved and restored in this order. `keep`: how many checkpoints
    are kept; `is_main`: whether this process writes (the others take part in gathers only).
    """

    def __init__(self, models: PolicyModels, run_dir: Path, parts: Mapping[str, Stateful], *, keep: int, is_main: bool):
        self.models, self.run_dir, self.parts = models, run_dir, dict(parts)
        self.keep, self.is_main = keep, is_main

    def save(self, step: int) -> Path | None:
        """Checkpoint `step`; every process calls (FSDP2 gathers), the main one writes and returns the path.

        With LoRA, the checkpoint's model is a merged copy (loadable by `from_pretrained`) and the
        adapter itself goes to `adapter/` for resuming.
        """
        models = self.models
        state = model_state = path = None
        # Full state dicts in the main process's CPU memory. Under FSDP2 gathering them is a
        # collective (every process calls); otherwise the main process's own copy is the whole.
        if models.sharded or self.is_main:
            state = {name: part.state_dict() for name, part in self.parts.items()}
        if models.sharded:
            # Tied weights (lm_head = embed_tokens) come back as two tensors; write the first name
            # only, as `save_pretrained` does for the shared parameter.
            tied = tied_parameter_names(models.model)
            model_state = {k: v for k, v in models.full_state_dict(cpu_offload=True).items() if k not in tied}
        if self.is_main:
            model, extra = models.model, None
            if models.lora:
                model = copy.deepcopy(models.model).merge_and_unload()
                extra = lambda tmp: models.model.save_pretrained(tmp / "adapter")  # noqa: E731
            path = save_checkpoint(
                self.run_dir, step, model, models.tokenizer, state, keep=self.keep, extra=extra, model_state=model_state
            )
        barrier()
        return path

    def load(self, saved: dict[str, Any]) -> int:
        """Put each part's state from `saved` (a `trainer_state.pt`) back; returns the step it reached.
        A part the checkpoint does not hold keeps its state (checkpoints written before it existed)."""
        for name, part in self.parts.items():
            if name in saved:
                part.load_state_dict(saved[name])
        return saved["step"]
