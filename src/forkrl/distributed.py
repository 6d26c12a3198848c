"""Thin helpers over torch.distributed so that world size 1 and N share one code path.

Every collective in forkrl goes through these functions (a test checks that no other module
calls `torch.distributed` collectives directly). They take tensors wherever they live and move
them, in this one place, to the device the group's backend can reduce: NCCL reduces only CUDA
tensors, so a count made on the CPU (how many groups a process kept, reward failures, loss
denominators) is copied to the current CUDA device, reduced there, and copied back in place.
Gloo reduces CPU tensors, which is what the CPU tests run.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_OPS = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}


def is_distributed(group: dist.ProcessGroup | None = None) -> bool:
    """True when a process group is initialized and has more than one member."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def world_size(group: dist.ProcessGroup | None = None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def rank(group: dist.ProcessGroup | None = None) -> int:
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def collective_device(group: dist.ProcessGroup | None = None) -> torch.device | None:
    """The device the group's backend needs its tensors on: the current CUDA device for NCCL,
    None (any) for Gloo and for a single process."""
    if not is_distributed(group):
        return None
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return None


def all_reduce(tensor: torch.Tensor, op: str = "sum", group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Reduce `tensor` over the group in place with `op` (`sum`, `min`, `max`) and return it;
    a no-op for a single process."""
    if not is_distributed(group):
        return tensor
    target = collective_device(group)
    if target is None or tensor.device == target:
        dist.all_reduce(tensor, op=_OPS[op], group=group)
        return tensor
    moved = tensor.to(target)
    dist.all_reduce(moved, op=_OPS[op], group=group)
    tensor.copy_(moved)
    return tensor


def all_reduce_sum(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Sum `tensor` over the group in place (no-op for a single process) and return it."""
    return all_reduce(tensor, "sum", group)


def reduce_scalars(values: list[float], op: str, group: dist.ProcessGroup | None = None) -> list[float]:
    """Python numbers reduced over the group with `op`, in one collective (the host values
    themselves when there is one process)."""
    if not is_distributed(group):
        return [float(v) for v in values]
    return all_reduce(torch.tensor([float(v) for v in values], dtype=torch.float64), op, group).tolist()


def all_gather_scalars(value: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Gather one scalar per rank into a `[world_size]` tensor ordered by rank (on `value`'s device)."""
    value = value.reshape(1)
    if not is_distributed(group):
        return value.clone()
    target = collective_device(group)
    send = value if target is None else value.to(target)
    out = [torch.empty_like(send) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, send, group=group)
    return torch.cat(out).to(value.device)


def barrier(group: dist.ProcessGroup | None = None) -> None:
    """Wait for every process of the group (no-op for a single process)."""
    if is_distributed(group):
        dist.barrier(group=group)
