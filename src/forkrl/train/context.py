"""Where this process stands in a run, and the per-process batch sizes: derived once from the config.

The collector, the updater and the evaluator all need the process's rank, the world size and the
device, and the same batch sizes split across processes; `TrainContext.create` computes them in one
place, after checking that every global size divides by the number of processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from forkrl.config import Config
from forkrl.errors import TrainingStopped


@dataclass(frozen=True)
class TrainContext:
    """This process's place in the run and the sizes it works with (all per process unless named global)."""

    rank: int
    world: int
    """Number of processes (1 without torchrun)."""
    device: torch.device
    group: object
    """The process group the metrics and loss denominators reduce over (None with one process)."""
    prompts_per_rank: int
    """Groups this process trains on per step: `rollout.prompts_per_step / world`."""
    round_prompts_per_rank: int
    """Prompts this process draws per sampling round: `rollout.prompts_per_round` (default
    `prompts_per_step`) `/ world`."""
    mini_batch_rows: int
    """Response rows per mini-batch (one optimizer step): `optim.mini_batch_size / world * group_size`."""
    micro_batch_rows: int
    """Response rows per forward pass: `optim.micro_batch_size`."""
    updates_per_step: int
    """Optimizer steps per training step with a full batch (global): mini-batches x `optim.epochs`."""

    @property
    def is_main(self) -> bool:
        """The process that writes the run directory (rank 0)."""
        return self.rank == 0

    @classmethod
    def create(cls, cfg: Config, rank: int, world: int, device: torch.device, group=None) -> TrainContext:
        """The context of process `rank` of `world`; `TrainingStopped` when a global batch size does not
        divide by `world`."""
        r, o = cfg.rollout, cfg.optim
        prompts_per_round = r.prompts_per_round or r.prompts_per_step
        for key, value in (
            ("rollout.prompts_per_step", r.prompts_per_step),
            ("optim.mini_batch_size", o.mini_batch_size),
            ("rollout.prompts_per_round", r.prompts_per_round),
        ):
            if value % world:
                raise TrainingStopped(f"{key} = {value} must be divisible by the number of processes ({world})")
        return cls(
            rank=rank,
            world=world,
            device=device,
            group=group,
            prompts_per_rank=r.prompts_per_step // world,
            round_prompts_per_rank=prompts_per_round // world,
            mini_batch_rows=o.mini_batch_size // world * r.group_size,
            micro_batch_rows=o.micro_batch_size,
            updates_per_step=(r.prompts_per_step // o.mini_batch_size) * o.epochs,
        )
