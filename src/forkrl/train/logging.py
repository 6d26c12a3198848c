"""Run outputs: metrics.jsonl every step, samples.jsonl, TensorBoard and W&B when available."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from forkrl.extras import require_package
from forkrl.io import atomic_write_text


def split_jsonl_after_step(path: str | os.PathLike, step: int) -> list[str]:
    """Keep the records with `step` <= `step` in `path` and return the later ones' lines (written
    after the checkpoint a run resumes from), so the caller can keep them elsewhere. A line cut
    short by a kill is dropped from the file and returned too."""
    path = Path(path)
    if not path.is_file():
        return []
    kept, later = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                later.append(line if line.endswith("\n") else line + "\n")
                continue
            (kept if record.get("step", 0) <= step else later).append(line if line.endswith("\n") else line + "\n")
    if later:
        atomic_write_text(path, "".join(kept))
    return later


def truncate_jsonl_after_step(path: str | os.PathLike, step: int) -> None:
    """Drop records with `step` > `step` (see `split_jsonl_after_step`, which returns them)."""
    split_jsonl_after_step(path, step)


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunLogger:
    """Writes one JSON object per step to `metrics.jsonl` (and mirrors scalars to TensorBoard/W&B).

    Only the rank that owns the run directory should create one.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        tensorboard: bool = True,
        wandb_project: str | None = None,
        config: dict | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._metrics = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")
        self._samples = open(self.run_dir / "samples.jsonl", "a", encoding="utf-8")
        self._tb = self._wandb = None
        try:
            self._start_integrations(tensorboard, wandb_project, config)
        except BaseException:
            self.close()  # the files are closed; the trainer's undo_start removes the directory
            raise

    def _start_integrations(self, tensorboard: bool, wandb_project: str | None, config: dict | None) -> None:
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
            except ImportError:  # tensorboard is an optional extra
                self._tb = None
        if wandb_project:
            require_package("wandb", f"trainer.wandb_project = {wandb_project!r}")  # the trainer checked it earlier
            import wandb

            self._wandb = wandb.init(project=wandb_project, dir=str(self.run_dir), config=config)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def log_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        for sample in samples:
            self._samples.write(json.dumps({"step": step, **sample}) + "\n")
        self._samples.flush()

    def close(self) -> None:
        self._metrics.close()
        self._samples.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
