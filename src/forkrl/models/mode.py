"""A model's train/eval mode set for one block: sampling and teacher-forced scoring run in eval mode."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["eval_mode"]


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) inside the block, restoring the caller's mode afterwards.

    Used by the HF generation backend (`rollout/hf.py`) and the rollout store's scoring
    (`analysis/store`).
    """
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
