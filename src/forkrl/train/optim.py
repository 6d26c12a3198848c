"""The optimizer side of a step: AdamW, the learning-rate schedule, and one clipped step that is
skipped (not taken) when the gradient is NaN/inf."""

from __future__ import annotations

import math

import torch

from forkrl.config import OptimConfig


def build_optimizer(params: list[torch.nn.Parameter], o: OptimConfig, total_updates: int):
    """(AdamW, LambdaLR) for `total_updates` optimizer steps: warmup, then `o.schedule`."""
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: lr_factor(i, o.warmup_steps, total_updates, o.schedule)
    )
    return optimizer, scheduler


def lr_factor(i: int, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the base learning rate at optimizer step `i`."""
    if warmup and i < warmup:
        return (i + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (i - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def clipped_step(params: list[torch.nn.Parameter], optimizer, scheduler, grad_clip: float) -> torch.Tensor | None:
    """Clip the global gradient norm to `grad_clip` (0: no clipping) and step, unless the norm is
    NaN/inf; zero the gradients either way. Returns the (pre-clipping) gradient norm of a step
    taken, None for one skipped. One host sync: the skip decision (identical on every rank after
    the gradient all-reduce)."""
    clip = grad_clip if grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
        grad_norm = grad_norm.full_tensor()
    finite = bool(torch.isfinite(grad_norm))
    if finite:
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm if finite else None
