"""Atomic checkpoints: a checkpoint directory either exists complete or not at all.

Layout of `RUN_DIR/checkpoints/step_000042/`: the model in `save_pretrained` format
(safetensors, loadable by `AutoModelForCausalLM.from_pretrained`), its tokenizer, and
`trainer_state.pt` with optimizer, scheduler, RNG states and the data position. Everything is
written into a temporary sibling directory first and renamed into place, so a run killed
mid-checkpoint (even by SIGKILL) leaves the previous checkpoint intact. Temporary directories
are named after their host and process (`.tmp-step_000042-HOST-PID`); a save removes only its
own and those of processes on this host that no longer exist, never another live process's.
A save that fails (a full disk: `CheckpointError` "no space left on device") removes its temporary
directory and leaves the earlier checkpoints as they were.

`trainer_state.pt` holds tensors and plain Python values only (the RNG states too) and is read
with `torch.load(weights_only=True)` (`load_state_file`): a checkpoint never runs code, and a file
that would need more than that to load is refused, by name.

Before a run resumes from a checkpoint it is validated (`read_checkpoint`, `check_shapes`):
every safetensors header is read and checked against the file's size (a truncated file is
caught without reading the weights), `trainer_state.pt` must load and hold every part, and the
tensor shapes must match the model. `select_checkpoint` falls back from a corrupt newest
checkpoint to the previous one, with a warning naming the corrupt path.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import re
import shutil
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from forkrl.errors import UserError, one_line
from forkrl.io import atomic_dir

_STEP_DIR = re.compile(r"^step_(\d+)$")
_TMP_DIR = re.compile(r"^\.tmp-(?:replaced-)?step_\d+-(?P<host>.+)-(?P<pid>\d+)$")
_TRAINER_STATE_KEYS = ("step", "optimizer", "scheduler", "rng", "trainer")


class CheckpointError(UserError):
    """A checkpoint that cannot be resumed from, or written; the message names the file and what is wrong."""


def capture_rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and plain Python values, so `trainer_state.pt` loads with
    `torch.load(weights_only=True)` (numpy's own state holds an ndarray, which would not)."""
    numpy_state = np.random.get_state(legacy=False)  # {"bit_generator", "state": {"key", "pos"}, ...}
    numpy_state["state"] = {
        "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
        "pos": int(numpy_state["state"]["pos"]),
    }
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):  # plain form (`capture_rng_state`); older checkpoints hold numpy's tuple
        key = np.asarray(numpy_state["state"]["key"], dtype=np.int64).astype(np.uint32)
        numpy_state = {**numpy_state, "state": {"key": key, "pos": int(numpy_state["state"]["pos"])}}
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RNGState:
    """The process's global RNGs (Python, numpy, torch, CUDA) as a checkpointable part."""

    def state_dict(self) -> dict[str, Any]:
        return capture_rng_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        restore_rng_state(state)


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:06d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def step_of(checkpoint: str | os.PathLike) -> int:
    """The step number of a `step_N` checkpoint directory."""
    match = _STEP_DIR.match(Path(checkpoint).name)
    if match is None:
        raise ValueError(f"{checkpoint} is not a step_N checkpoint directory")
    return int(match.group(1))


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model: torch.nn.Module,
    tokenizer,
    state: dict[str, Any],
    *,
    keep: int = 2,
    extra: Callable[[Path], None] | None = None,
    model_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write checkpoint `step` atomically and keep only the newest `keep` checkpoints.

    `model` is the HF model to save in `save_pretrained` format (not the DDP wrapper); with
    `model_state` (e.g. the full state dict gathered from FSDP2 shards) those tensors are written
    instead of the model's own. `state`: the parts' states by name ("optimizer", "scheduler", "rng",
    "trainer"; plain values and tensors), written with the step to `trainer_state.pt`.
    `extra(tmp_dir)` may write more files (e.g. a LoRA adapter) before the rename.
    Call on the writing rank only.
    """
    final = checkpoint_dir(run_dir, step)
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_tmp_dirs(root)
    tag = f"{socket.gethostname()}-{os.getpid()}"
    try:
        # re-saving the same step (e.g. the final save right after a periodic one) replaces it
        with atomic_dir(final, tag=tag, durable=True) as tmp:
            model.save_pretrained(tmp, safe_serialization=True, state_dict=model_state)
            tokenizer.save_pretrained(tmp)
            if extra is not None:
                extra(tmp)
            # Through a Python file: a full disk is then OSError(ENOSPC), not torch's "unexpected pos".
            with open(tmp / "trainer_state.pt", "wb") as f:
                torch.save({"step": step, **state}, f)
    except BaseException as err:  # atomic_dir removed its temporary directory; earlier checkpoints are intact
        if _out_of_space(err):
            raise CheckpointError(
                f"checkpoint {final} not saved: no space left on device under {root} (the earlier checkpoints "
                f"are intact); free some space, then continue with: forkrl train --resume {run_dir}"
            ) from None
        raise
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _out_of_space(err: BaseException | None) -> bool:
    """Whether `err` (or an error it came from) is a full disk or quota, also as wrapped by
    safetensors ("I/O error: No space left on device (os error 28)")."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            return True
        if "No space left on device" in str(err) or "Disk quota exceeded" in str(err):
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


def _remove_abandoned_tmp_dirs(root: Path) -> None:
    """Remove temporary directories of this process and of dead processes on this host (left by a
    run killed mid-save). Another live process's, or another host's, are never touched."""
    host = socket.gethostname()
    for tmp in root.glob(".tmp-*"):
        match = _TMP_DIR.match(tmp.name)
        if match is None or match["host"] != host:
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or not _process_exists(pid):
            shutil.rmtree(tmp, ignore_errors=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _legacy_numpy_globals() -> list:
    """What rebuilds the one numpy array (numpy's RNG key) in checkpoints written before
    `capture_rng_state` stored it as a tensor, so those still resume: `_reconstruct`, `ndarray`,
    `dtype` and the uint32 dtype class; nothing else."""
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # numpy 1
        from numpy.core.multiarray import _reconstruct
    return [
        (_reconstruct, "numpy._core.multiarray._reconstruct"),  # as numpy 2 pickles it
        (_reconstruct, "numpy.core.multiarray._reconstruct"),  # as numpy 1 pickles it
        np.ndarray,
        np.dtype,
        type(np.dtype(np.uint32)),
    ]


def load_state_file(file: str | os.PathLike) -> Any:
    """`trainer_state.pt` read with `torch.load(weights_only=True)`: tensors and plain Python values
    only, so a crafted file can never run code (a pickle's `__reduce__` is refused, not called).
    Raises `CheckpointError` naming the file when it is unreadable or needs anything more."""
    file = Path(file)
    try:
        with torch.serialization.safe_globals(_legacy_numpy_globals()):
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        needs = re.search(r"GLOBAL ([\w.]+)", str(err)) or re.search(
            r"Can only build [^,]+, but got ([^\n]+)", str(err)
        )
        raise CheckpointError(
            f"{file}: refused: loading it would need {needs[1] if needs else 'more than plain data'}, not only "
            "tensors and plain values; forkrl loads checkpoints with torch.load(weights_only=True) and never runs "
            "code from them"
        ) from None
    except Exception as err:  # a cut-short zip, not a torch file: unusable either way
        first = one_line(err).split(". ")[0]  # torch's own advice follows; the file is unusable either way
        raise CheckpointError(f"{file}: cannot be loaded ({type(err).__name__}: {first})") from None


def load_trainer_state(path: str | os.PathLike) -> dict[str, Any]:
    """The non-model part of a checkpoint (optimizer, scheduler, RNG, trainer state)."""
    file = Path(path) / "trainer_state.pt"
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a forkrl checkpoint: {file.name} is missing")
    return load_state_file(file)


# ---------------------------------------------------------------------------- validation


def safetensors_shapes(file: str | os.PathLike) -> dict[str, list[int]]:
    """Tensor name -> shape from a safetensors header, after checking the file holds all the data
    the header describes (so a truncated file fails here, naming itself, not deep in a load)."""
    file = Path(file)
    size = file.stat().st_size
    with open(file, "rb") as f:
        prefix = f.read(8)
        header_len = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if header_len < 2 or 8 + header_len > size:
            raise CheckpointError(f"{file}: not a complete safetensors file ({size} bytes, header cut short)")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{file}: safetensors header is not valid JSON ({err})") from None
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    try:
        end = max((v["data_offsets"][1] for v in tensors.values()), default=0)
        shapes = {k: list(v["shape"]) for k, v in tensors.items()}
    except (TypeError, KeyError, IndexError):
        raise CheckpointError(f"{file}: safetensors header lacks shapes or offsets") from None
    if 8 + header_len + end > size:
        raise CheckpointError(
            f"{file}: truncated ({size} bytes; its header describes {8 + header_len + end} bytes of tensors)"
        )
    return shapes


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, list[int]]]:
    """Validate checkpoint `path` without the model: every safetensors header against its file,
    and `trainer_state.pt` loading with every part. Returns (trainer state, tensor shapes by name)."""
    path = Path(path)
    adapter = path / "adapter" / "adapter_model.safetensors"
    files = sorted(path.glob("*.safetensors")) + ([adapter] if adapter.is_file() else [])
    if not files:
        raise CheckpointError(f"{path}: no model weights (*.safetensors)")
    shapes: dict[str, list[int]] = {}
    for file in files:
        shapes.update(safetensors_shapes(file))
    state_file = path / "trainer_state.pt"
    if not state_file.is_file():
        raise CheckpointError(f"{state_file}: missing")
    state = load_state_file(state_file)
    missing = [k for k in _TRAINER_STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{state_file}: lacks {', '.join(missing)}")
    return state, shapes


def check_shapes(path: str | os.PathLike, shapes: dict[str, list[int]], expected: dict[str, torch.Size]) -> None:
    """Raise `CheckpointError` when a checkpoint tensor's shape differs from the model's."""
    wrong = [f"{k} {shapes[k]} vs {list(v)}" for k, v in expected.items() if k in shapes and list(v) != shapes[k]]
    if wrong:
        more = f" and {len(wrong) - 3} more" if len(wrong) > 3 else ""
        raise CheckpointError(
            f"{path}: tensor shapes do not match the model (checkpoint vs model: {'; '.join(wrong[:3])}{more})"
        )


def parse_resume_target(target: str | os.PathLike) -> tuple[Path, Path | None]:
    """`--resume RUN_DIR` or `--resume RUN_DIR/checkpoints/step_N`: (run dir, the chosen step or None)."""
    target = Path(target)
    if _STEP_DIR.match(target.name) and target.parent.name == "checkpoints":
        return target.parent.parent, target
    return target, None


class ResumePoint(NamedTuple):
    """A validated checkpoint to resume from (`select_checkpoint`)."""

    path: Path
    state: dict[str, Any]
    """The contents of its `trainer_state.pt`."""
    shapes: dict[str, list[int]]
    """Tensor name -> shape of its weights."""


def select_checkpoint(run_dir: str | os.PathLike, step_dir: Path | None = None) -> ResumePoint:
    """The checkpoint to resume from, validated: `step_dir` when given (no fallback: it was asked
    for), else the newest valid one of `run_dir`, warning about each corrupt newer one.
    Raises `CheckpointError`."""
    if step_dir is not None:
        if not step_dir.is_dir():
            raise CheckpointError(f"--resume {step_dir}: no such checkpoint")
        return ResumePoint(step_dir, *read_checkpoint(step_dir))
    candidates = list_checkpoints(run_dir)
    if not candidates:
        raise CheckpointError(f"--resume {run_dir}: no checkpoint found under {Path(run_dir) / 'checkpoints'}")
    problems = []
    for path in reversed(candidates):
        try:
            state, shapes = read_checkpoint(path)
        except CheckpointError as err:
            problems.append(str(err))
            continue
        if problems:
            print(f"warning: corrupt checkpoint skipped: {'; '.join(problems)}; resuming from {path}", file=sys.stderr)
        return ResumePoint(path, state, shapes)
    raise CheckpointError(f"--resume {run_dir}: every checkpoint is corrupt: {'; '.join(problems)}")


def all_finite(tensors) -> bool:
    """Whether every tensor is free of NaN/inf (local shards of DTensors; one host sync)."""
    flags = [torch.isfinite(t.to_local() if hasattr(t, "to_local") else t).all() for t in tensors]
    return bool(torch.stack(flags).all()) if flags else True
