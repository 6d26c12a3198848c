"""User errors: the exceptions that mean bad input, and the one place that shows them as one line.

A user error is something the person at the keyboard can fix — a config key, a file, a row, a path,
an option, a full disk — as opposed to a bug in forkrl. Every command of `forkrl` runs inside
`user_errors()` (the root command applies it, `forkrl.cli`), which prints such an error as one line,
`error: <what is wrong, naming the key, file, row or value>`, on stderr and exits with code 2;
anything else keeps its traceback. `--debug` (or `FORKRL_DEBUG=1`) shows user errors' tracebacks too.

What counts as a user error:
- `UserError` and its subclasses: `ConfigError` here; in their own modules `PromptDataError`
  (tasks/data.py), `RunDirError` (train/run_dir.py), `CheckpointError` (train/checkpoint.py),
  `EvalInputError` (eval/accuracy.py), `StoreError` (analysis/store/schema.py), `RunError`
  (analysis/runs.py), `CalibrationInputError` (analysis/calibration.py), `SweepReportError`
  (sweep/report.py), `RewardOptionsError` (tasks/rewards.py);
- `TrainingStopped`: a run that cannot go on (NaN steps, failing rewards), which names the cause;
- the operating system's refusals: a missing file or directory, an existing one in the way, no
  permission, a read-only file system, no space left (`OSError` with one of `USER_ERRNOS`);
- click's usage errors (an unknown option, a value of the wrong type), shown in the same form.

`TrainingInterrupted` (SIGTERM/SIGINT, checkpointed) is shown as `stopped: ...` with exit code
128 + the signal's number, as a shell reports a process stopped by that signal.

This module imports nothing of forkrl (every other module may import it) and does no work at import.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator

__all__ = [
    "USER_ERRNOS",
    "ConfigError",
    "TrainingInterrupted",
    "TrainingStopped",
    "UserError",
    "one_line",
    "os_reason",
    "set_debug",
    "user_errors",
]


class UserError(ValueError):
    """Bad input (a key, a file, a row, a path, an option), not a bug; the message names it."""


class ConfigError(UserError):
    """A config key or value that cannot be used; the message names the key."""


class TrainingStopped(RuntimeError):
    """Raised when the run cannot go on (e.g. too many consecutive NaN/inf steps); names the cause."""


class TrainingInterrupted(TrainingStopped):
    """SIGTERM/SIGINT: the step in progress was finished and checkpointed; `--resume` continues."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


USER_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "ENOENT",
        "EEXIST",
        "ENOTDIR",
        "EISDIR",
        "EACCES",
        "EPERM",
        "EROFS",
        "ENOSPC",
        "EDQUOT",
        "ENAMETOOLONG",
        "ELOOP",
        "ENOTEMPTY",
        "EXDEV",
    )  # fmt: skip
    if hasattr(errno, name)
)
"""`OSError`s the person running the command can fix (free space, another path, permissions)."""

_DEBUG = {"on": False}


def set_debug(on: bool | None = None) -> None:
    """Show user errors' tracebacks (`--debug`); None: from the environment (`FORKRL_DEBUG=1`)."""
    _DEBUG["on"] = on if on is not None else os.environ.get("FORKRL_DEBUG", "") not in ("", "0")


def one_line(err: BaseException) -> str:
    """The error's message on one line (an `OSError` as `PATH: what happened`)."""
    if isinstance(err, OSError) and err.strerror and err.filename is not None:
        what = err.strerror[:1].lower() + err.strerror[1:]
        where = os.fsdecode(err.filename) + (f" -> {os.fsdecode(err.filename2)}" if err.filename2 else "")
        text = f"{where}: {what}"
    elif isinstance(err, OSError) and err.strerror and not str(err).startswith("[Errno"):
        text = str(err)
    elif isinstance(err, OSError) and err.strerror:
        text = err.strerror[:1].lower() + err.strerror[1:]
    elif isinstance(err, KeyError) and err.args:
        text = str(err.args[0])  # KeyError's str() adds quotes
    else:
        text = str(err)
    return " ".join(text.split()) or type(err).__name__


def os_reason(err: OSError) -> str:
    """What the operating system said, without the path (`read-only file system`), for messages that
    name the path themselves."""
    return err.strerror[:1].lower() + err.strerror[1:] if err.strerror else one_line(err)


def _usage_errors() -> tuple[type[Exception], tuple[type[Exception], ...]]:
    """(click's UsageError, the usage errors that are not errors: a group run without arguments shows
    its help). Found through typer, which brings its own copy of click in recent versions."""
    import sys

    import typer

    usage = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
    help_only = getattr(sys.modules[usage.__module__], "NoArgsIsHelpError", None)
    return usage, (help_only,) if help_only is not None else ()


def _is_user_error(err: BaseException, more: tuple[type[BaseException], ...]) -> bool:
    if isinstance(err, (UserError, TrainingStopped, *more)):
        return True
    if isinstance(err, (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)):
        return True
    if isinstance(err, OSError):
        return err.errno in USER_ERRNOS
    usage, help_only = _usage_errors()
    return isinstance(err, usage) and not isinstance(err, help_only)


def _message(err: BaseException) -> str:
    usage, _ = _usage_errors()
    if isinstance(err, usage):
        text = " ".join(err.format_message().split())
        path = err.ctx.command_path if err.ctx is not None else None
        return f"{text} (see: {path} --help)" if path else text
    return one_line(err)


@contextlib.contextmanager
def user_errors(*more: type[BaseException]) -> Iterator[None]:
    """Show the user errors raised inside (plus the types `more`) as `error: <one line>` on stderr
    and exit with code 2; a graceful stop by SIGTERM/SIGINT exits 128 + the signal's number."""
    import typer

    try:
        yield
    except TrainingInterrupted as err:
        typer.echo(f"stopped: {one_line(err)}", err=True)
        raise typer.Exit(128 + err.signum) from err
    except (typer.Exit, typer.Abort):
        raise
    except Exception as err:
        if not _is_user_error(err, more) or _DEBUG["on"]:
            raise
        typer.echo(f"error: {_message(err)}", err=True)
        raise typer.Exit(2) from err
