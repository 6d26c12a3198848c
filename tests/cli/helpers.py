"""Helpers of the bad-input suite: one-line-error assertions, directory snapshots, a file system that
refuses writes (read-only or full) under one directory, and packages that look uninstalled."""

from __future__ import annotations

import builtins
import errno
import hashlib
import importlib.util
import os
from pathlib import Path

import transformers

LOCK_FILE_NOTE = (
    "`.NAME.lock` beside a run directory is the run lock (train/run_dir.py): an empty file, left for the "
    "next run to reuse, as filelock does; it is the one thing a refused start may leave"
)


def one_error_line(result) -> str:
    """Exit code 2, exactly one `error:` line on stderr and nothing else there, no traceback; returns it."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    return errors[0]


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under `root` (but lock files, see `LOCK_FILE_NOTE`): kind, and a file's content hash."""
    state = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.name.startswith(".") and path.name.endswith(".lock") and path.stat().st_size == 0:
            continue
        if path.is_symlink():
            state[rel] = ("link", os.readlink(path))
        elif path.is_dir():
            state[rel] = ("dir",)
        else:
            state[rel] = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
    return state


def refuse_writes(monkeypatch, root: Path, code: int = errno.EROFS) -> None:
    """Make creating, writing, renaming or making directories under `root` fail with `code` (EROFS: a
    read-only file system; ENOSPC: a full disk), in this process, as the kernel would report it."""
    root = os.path.realpath(root)
    message = os.strerror(code)

    def under(path) -> bool:
        if isinstance(path, int):
            return False
        return os.path.realpath(os.fsdecode(path)).startswith(root)

    def refuse(path):
        raise OSError(code, message, os.fsdecode(path))

    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir
    real_rename, real_replace = os.rename, os.replace
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def open_(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and under(file):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def os_open(path, flags, *args, **kwargs):
        if flags & writing and under(path):
            refuse(path)
        return real_os_open(path, flags, *args, **kwargs)

    def mkdir(path, *args, **kwargs):
        if under(path):
            refuse(path)
        return real_mkdir(path, *args, **kwargs)

    def rename(src, dst, *args, **kwargs):
        if under(src) or under(dst):
            refuse(src)
        return real_rename(src, dst, *args, **kwargs)

    def replace(src, dst, *args, **kwargs):
        if under(src) or under(dst):
            refuse(src)
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "replace", replace)


def hide_packages(monkeypatch, *names: str) -> None:
    """`importlib.util.find_spec` says `names` are not installed (how forkrl.extras checks them)."""
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name.split(".")[0] in names else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def forbid_model_loading(monkeypatch) -> None:
    """Loading model weights fails the test: every bad input is caught before the expensive part."""

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_model)
