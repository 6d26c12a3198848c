"""Atomic checkpoints: a checkpoint directory either exists complete or not at all.

Layout of `RUN_DIR/checkpoints/step_000042/`: the model in `save_pretrained` format
(safetensors, loadable by `AutoModelForCausalLM.from_pretrained`), its tokenizer, and
`trainer_state.pt` with optimizer, scheduler, RNG states and the data position. Everything is
written into a temporary sibling directory first and renamed into place, so a run killed
mid-checkpoint (even by SIGKILL) leaves the previous checkpoint intact; the stale temporary
directory is removed by the next save.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

_STEP_DIR = re.compile(r"^step_(\d+)$")


def capture_rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:06d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model: torch.nn.Module,
    tokenizer,
    optimizer: torch.optim.Optimizer | dict[str, Any],
    scheduler,
    trainer_state: dict[str, Any],
    keep: int = 2,
    extra: Callable[[Path], None] | None = None,
    model_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write checkpoint `step` atomically and keep only the newest `keep` checkpoints.

    `model` is the HF model to save in `save_pretrained` format (not the DDP wrapper); with
    `model_state` (e.g. the full state dict gathered from FSDP2 shards) those tensors are written
    instead of the model's own. `optimizer` is the optimizer or an already gathered state dict.
    `extra(tmp_dir)` may write more files (e.g. a LoRA adapter) before the rename.
    Call on the writing rank only.
    """
    final = checkpoint_dir(run_dir, step)
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a run killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    model.save_pretrained(tmp, safe_serialization=True, state_dict=model_state)
    tokenizer.save_pretrained(tmp)
    if extra is not None:
        extra(tmp)
    torch.save(
        {
            "step": step,
            "optimizer": optimizer if isinstance(optimizer, dict) else optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": capture_rng_state(),
            "trainer": trainer_state,
        },
        tmp / "trainer_state.pt",
    )
    _fsync_dir(tmp)
    if final.exists():  # re-saving the same step (e.g. final save right after a periodic one)
        old = root / f".tmp-replaced-{final.name}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    _fsync_dir(root)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_trainer_state(path: str | os.PathLike) -> dict[str, Any]:
    """The non-model part of a checkpoint (optimizer, scheduler, RNG, trainer state)."""
    file = Path(path) / "trainer_state.pt"
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a forkrl checkpoint: {file.name} is missing")
    return torch.load(file, map_location="cpu", weights_only=False)


def _fsync_dir(path: Path) -> None:
    """Flush file data and the directory entry so the rename is durable after a crash."""
    for child in path.iterdir() if path.is_dir() else []:
        if child.is_file():
            with open(child, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
