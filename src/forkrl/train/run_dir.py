"""Run directories: one run per directory, locked for the run's lifetime, and nothing ever overwritten.

- A new run refuses a directory that already holds something (another run's metrics and
  checkpoints would be mixed with its own, and checkpoint rotation would delete the newer
  run's checkpoints). `--resume` continues the run there; `--overwrite` first renames the old
  directory to `NAME.old-YYYYmmdd-HHMMSS` (`forkrl.io.move_aside`), so it is kept, never deleted.
- The lock is a `filelock.FileLock` on `.NAME.lock` *beside* the directory, taken before
  anything else (a second run into the same directory stops at once, naming the holder's PID
  from `.NAME.lock.owner`) and held until the run ends. Beside, not inside: nothing is written
  into the run directory before the config, data, reward and model have been checked, and a
  moved-aside directory does not take the lock with it.
- The directory itself is created (and an old one moved aside) only by `prepare()`, which the
  trainer calls once everything has been validated. A run that fails before its first step (a
  logger that cannot start, an error in step 1) is undone by `undo_start()`: its directory is
  removed, or the one `--overwrite` moved aside is put back, so a rerun is not blocked.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from filelock import FileLock, Timeout

from forkrl.errors import UserError, os_reason
from forkrl.io import aside_name, atomic_write_text, is_empty_dir, move_aside
from forkrl.train.logging import split_jsonl_after_step

__all__ = ["RunDirError", "RunDirectory"]

_START_FILES = ("config.yaml", "metrics.jsonl", "samples.jsonl")
_START_DIRS = ("tensorboard", "wandb")
"""What a start writes before its first step: `undo_start` removes a directory holding only these
(the jsonl files empty)."""


class RunDirError(UserError):
    """A run directory that cannot be used as asked (not empty, locked, not a run); names the path."""


def _describe(path: Path, limit: int = 4) -> str:
    names = sorted(p.name for p in path.iterdir())
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


class RunDirectory:
    """The run directory of one training run: its lock, and when it may be written.

    `mode`: "new" (the directory must be empty or absent), "resume" (continue the run in it)
    or "overwrite" (move a non-empty one aside in `prepare()`). Only the process that writes the
    run (rank 0) should create one.
    """

    def __init__(self, path: str | os.PathLike, mode: str = "new"):
        if mode not in ("new", "resume", "overwrite"):
            raise ValueError(f"mode must be new, resume or overwrite, got {mode!r}")
        self.path = Path(path)
        self.mode = mode
        self.lock_path = self.path.with_name(f".{self.path.name}.lock")
        self.owner_path = self.path.with_name(f".{self.path.name}.lock.owner")
        self.moved_to: Path | None = None
        self._created = False  # prepare() made the directory of a new run (or of --overwrite)
        self._lock: FileLock | None = None

    def acquire(self) -> RunDirectory:
        """Take the lock (at once, or `RunDirError` naming the holder) and check the mode's precondition."""
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"output_dir = '{self.path}' is a file, not a directory")
        lock = FileLock(str(self.lock_path), timeout=0)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lock.acquire()
        except Timeout:
            raise RunDirError(
                f"run directory '{self.path}' is in use by another forkrl run ({self._holder()}; "
                f"lock file {self.lock_path}); wait for it to finish or choose another output_dir"
            ) from None
        except OSError as err:  # a read-only file system, no permission, a full disk (after Timeout, an OSError too)
            raise RunDirError(
                f"output_dir = '{self.path}': cannot create its lock file {self.lock_path} "
                f"({os_reason(err)}); choose an output_dir you can write to"
            ) from None
        self._lock = lock
        try:
            self.check()
        except BaseException:
            self.release()
            raise
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        owner["command"] = " ".join(sys.argv)[:500]
        self.owner_path.write_text(json.dumps(owner) + "\n", encoding="utf-8")
        return self

    def prepare(self, config_text: str | None = None, resume_step: int | None = None) -> None:
        """Make the directory ready for writing; call once the inputs are validated.

        New run: (with `overwrite`, after moving the old directory aside) create it and write
        `config.yaml`. Resume from step N: checkpoints newer than N (a corrupt newest one, or a
        future abandoned by `--resume .../step_N`) are renamed `step_M.old-<time>`, metrics and
        samples records after N are moved to `metrics.after_step_N.old-<time>.jsonl` (the run redoes
        those steps), and a `config.yaml` changed by overrides keeps its old version aside.
        """
        if self.mode == "overwrite":
            self.moved_to = move_aside(self.path)
            if self.moved_to is not None:
                print(f"moved the previous contents of {self.path} to {self.moved_to}", file=sys.stderr)
        self._created = self.mode != "resume"
        self.path.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self._set_aside_after(resume_step)
        if config_text is None:
            return
        config = self.path / "config.yaml"
        if config.is_file() and config.read_text(encoding="utf-8") != config_text:
            move_aside(config)
        atomic_write_text(config, config_text)

    def _set_aside_after(self, step: int) -> None:
        from forkrl.train.checkpoint import list_checkpoints, step_of

        for path in list_checkpoints(self.path):
            if step_of(path) > step:
                print(f"checkpoint {path} is newer than step {step}: kept as {move_aside(path)}", file=sys.stderr)
        for name in ("metrics.jsonl", "samples.jsonl"):
            dropped = split_jsonl_after_step(self.path / name, step)
            if dropped:
                aside = aside_name(self.path / f"{Path(name).stem}.after_step_{step:06d}")
                atomic_write_text(aside.with_name(aside.name + ".jsonl"), "".join(dropped))

    def undo_start(self) -> bool:
        """After a failed start: remove what `prepare()` and the run's loggers wrote, and put the
        directory that `--overwrite` moved aside back, when the run got no further (no step logged,
        no sample, no checkpoint), so the same command can simply be run again. Returns whether it
        did. Never touches a resumed run, nor a directory holding anything else."""
        if not self._created or not self.path.is_dir():
            return False
        for entry in self.path.iterdir():
            if entry.name in _START_DIRS and entry.is_dir():
                continue
            if (
                entry.name in _START_FILES
                and entry.is_file()
                and (entry.name == "config.yaml" or not entry.stat().st_size)
            ):
                continue
            return False
        try:  # never hide the error that stopped the start behind one of its own
            shutil.rmtree(self.path)
            if self.moved_to is not None:
                self.moved_to.rename(self.path)
                self.moved_to = None
        except OSError as err:
            print(f"warning: could not undo the failed start in {self.path}: {err}", file=sys.stderr)
            return False
        self._created = False
        return True

    def release(self) -> None:
        if self._lock is None:
            return
        try:
            self.owner_path.unlink(missing_ok=True)
        finally:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> RunDirectory:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def check(self) -> None:
        """The mode's precondition (a new run needs an empty directory); raises `RunDirError`."""
        if self.mode == "new" and not is_empty_dir(self.path):
            raise RunDirError(
                f"output_dir = '{self.path}' is not empty ({_describe(self.path)}): continue that run with "
                f"--resume {self.path}, pass --overwrite to move it aside (to {self.path.name}.old-<time>), "
                "or choose another output_dir"
            )
        if self.mode == "resume" and not (self.path / "config.yaml").is_file():
            raise RunDirError(
                f"--resume {self.path}: {self.path / 'config.yaml'} not found (is it a forkrl run directory?)"
            )

    def _holder(self) -> str:
        try:
            owner = json.loads(self.owner_path.read_text(encoding="utf-8"))
            return f"PID {owner['pid']} on {owner['host']}, started {owner['started']}"
        except (OSError, ValueError, KeyError):
            return "PID unknown"
