"""Graceful stop on SIGTERM / SIGINT: finish the current step, checkpoint it, exit (Slurm preemption).

`GracefulStop` replaces the two handlers while training runs. The first signal only records
itself; the trainer checks `requested` after each step, saves a checkpoint and raises
`TrainingInterrupted`, so `--resume` continues bit-exactly from that step. A second SIGINT
(Ctrl-C pressed again) interrupts at once, as usual.
"""

from __future__ import annotations

import signal
import sys
import threading

__all__ = ["GracefulStop"]

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class GracefulStop:
    """Context manager recording the first SIGTERM/SIGINT in `signum` (None until one arrives)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum: int, frame) -> None:
        if self.signum is None:
            self.signum = signum
            print(
                f"\n{signal.Signals(signum).name} received: finishing this step, then saving a checkpoint "
                "(press Ctrl-C again to stop at once)",
                file=sys.stderr,
                flush=True,
            )
            return
        if signum == signal.SIGINT:
            self._restore()
            raise KeyboardInterrupt

    def __enter__(self) -> GracefulStop:
        # Handlers can only be set from the main thread; elsewhere (a notebook's worker thread)
        # the default behaviour stays.
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
