"""Thin helpers over torch.distributed so that world size 1 and N share one code path."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed(group: dist.ProcessGroup | None = None) -> bool:
    """True when a process group is initialized and has more than one member."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def world_size(group: dist.ProcessGroup | None = None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def rank(group: dist.ProcessGroup | None = None) -> int:
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def all_reduce_sum(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Sum `tensor` over the group in place (no-op for a single process) and return it."""
    if is_distributed(group):
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def all_gather_scalars(value: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Gather one scalar per rank into a `[world_size]` tensor ordered by rank."""
    value = value.reshape(1)
    if not is_distributed(group):
        return value.clone()
    out = [torch.empty_like(value) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, value, group=group)
    return torch.cat(out)
