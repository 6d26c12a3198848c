"""Output files and directories: never half-written, never silently overwritten.

Every output file is written to a temporary file in the target's directory and renamed over
the target (`os.replace` is atomic on POSIX and Windows within one filesystem), so a crashed or
interrupted analysis leaves the previous result intact instead of a truncated one.

An output *directory* that already holds files (an earlier `forkrl demo`, `eval --out` or
`analyze ... --out`) is not written into: `fresh_output_dir` renames it to
`NAME.old-YYYYmmdd-HHMMSS` first (kept, never deleted) and puts it back if the command fails
before writing anything.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from forkrl.errors import UserError, os_reason

__all__ = [
    "atomic_dir",
    "atomic_path",
    "atomic_write_json",
    "atomic_write_text",
    "check_writable",
    "fresh_output_dir",
    "is_empty_dir",
    "move_aside",
    "pyplot",
    "restore_aside",
    "save_figure",
    "umask_permissions",
]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success rename it to `path`, else delete it.

    The temporary name keeps the target's suffix, so libraries that pick a format from the
    extension (matplotlib, pyarrow) write the right one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        yield Path(tmp)
        umask_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, tag: str | None = None, durable: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory beside `path` to write into; on success it takes `path`'s
    place (a directory already there is moved aside, then deleted), else it is deleted.

    tag: the temporary directories are `.tmp-NAME-TAG` and `.tmp-replaced-NAME-TAG` (checkpoints
        tag them with host and process, so that an abandoned one can be told apart); None: unique
        names.
    durable: flush the files and the directory entries to disk (`fsync`), so that the rename
        survives a crash of the machine.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if tag is None:
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".tmp-{path.name}-"))
    else:
        tmp = path.parent / f".tmp-{path.name}-{tag}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    try:
        yield tmp
        if durable:
            _fsync_dir(tmp)
        if path.exists():  # a directory cannot be renamed over a non-empty one: move it aside first
            old = path.parent / f".tmp-replaced-{path.name}-{tag or tmp.name}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if durable:
        _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    """Flush the files directly in `path` and its directory entry."""
    for child in path.iterdir():
        if child.is_file():
            with open(child, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_once(path: str | os.PathLike, write: Callable[[Path], Path], mismatch: str) -> Path:
    """Write a data file once: `write(tmp_path)` writes it beside `path`; it is moved into place if
    `path` is missing, else must equal the file there byte for byte (`FileExistsError` "PATH
    holds other MISMATCH" otherwise). A sweep's data files are shared by its runs and sittings."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        fresh = write(Path(tmp) / path.name)
        if not path.exists():
            os.replace(fresh, path)
        elif path.read_bytes() != fresh.read_bytes():
            raise FileExistsError(f"{path} holds other {mismatch}; use a new sweep directory")
    return path


def check_writable(path: str | os.PathLike, what: str = "output") -> None:
    """`UserError` naming `what` and `path` unless files can be made where `path` is or will be (the
    nearest existing directory above it): a read-only or forbidden location fails before the work,
    not after it. Leaves nothing behind (an anonymous temporary file)."""
    base = Path(path).absolute().parent
    while not base.exists() and base != base.parent:
        base = base.parent
    try:
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as err:
        raise UserError(f"{what} {os.fspath(path)}: cannot write there ({os_reason(err)})") from None


def umask_permissions(path: str | os.PathLike) -> None:
    """Give a file made by `mkstemp` (mode 0600) the permissions a plain `open` would have."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically; returns the path."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write `obj` as indented JSON to `path` atomically. NaN/inf are written as null."""
    return atomic_write_text(path, json.dumps(_finite(obj), indent=2, ensure_ascii=False) + "\n")


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Save a matplotlib figure atomically and close it (figures are not kept open)."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return Path(path)


def pyplot():
    """`matplotlib.pyplot` on the non-interactive Agg backend (analyses run headless)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def is_empty_dir(path: str | os.PathLike) -> bool:
    """True when `path` does not exist or is a directory with no entries."""
    path = Path(path)
    return not path.exists() or (path.is_dir() and not any(path.iterdir()))


def aside_name(path: str | os.PathLike) -> Path:
    """`path.old-YYYYmmdd-HHMMSS` (with `-2`, `-3`, ... when taken): where `move_aside` puts it."""
    path = Path(path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate = path.with_name(f"{path.name}.old-{stamp}")
    n = 2
    while candidate.exists():  # two moves within one second
        candidate = path.with_name(f"{path.name}.old-{stamp}-{n}")
        n += 1
    return candidate


def move_aside(path: str | os.PathLike) -> Path | None:
    """Rename a non-empty directory (or a file) to `aside_name(path)`, kept, never deleted; return
    the new name, or None when there was nothing to move (an empty directory is reused)."""
    path = Path(path)
    if is_empty_dir(path):
        return None
    aside = aside_name(path)
    path.rename(aside)
    return aside


def restore_aside(aside: Path | None, path: str | os.PathLike) -> bool:
    """Undo `move_aside` when nothing new was written to `path` (the command failed first)."""
    path = Path(path)
    if aside is None or not aside.exists() or not is_empty_dir(path):
        return False
    if path.exists():
        path.rmdir()
    aside.rename(path)
    return True


@contextlib.contextmanager
def fresh_output_dir(path: str | os.PathLike | None) -> Iterator[Path | None]:
    """Run a command that writes the directory `path` without touching what is already there:
    a non-empty `path` is moved aside first (a note on stderr says where) and moved back if the
    command raises before writing anything. Yields where the old contents went (None: nothing)."""
    if path is None:
        yield None
        return
    if Path(path).exists() and not Path(path).is_dir():
        raise FileExistsError(f"output {os.fspath(path)!r} is a file, not a directory")
    check_writable(path, "--out")
    aside = move_aside(path)
    if aside is not None:
        print(f"note: {os.fspath(path)} already held results; moved them to {aside}", file=sys.stderr)
    try:
        yield aside
    except BaseException:
        restore_aside(aside, path)
        raise


def _finite(obj: Any) -> Any:
    """JSON has no NaN: map non-finite floats to None, recursively."""
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def jsonl_objects(path: str | os.PathLike, error: type[Exception]) -> Iterator[tuple[str, dict]]:
    """(`PATH: line N`, object) for each non-blank line of a jsonl file.

    The file is read as bytes and decoded line by line, so a bad byte is reported with its line
    number instead of as an offset into the whole file. A line that is not UTF-8, not JSON or not
    a JSON object raises `error` with one line naming the file and line.
    """
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            where = f"{os.fspath(path)}: line {line_no}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise error(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue  # blank lines (often a trailing newline) carry no row
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise error(f"{where}: expected a JSON object, got {type(row).__name__}")
            yield where, row
