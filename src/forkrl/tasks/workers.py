"""Worker processes with a hard per-call time limit: what runs math-verify and `module:function` rewards.

A call that runs past its limit costs its worker: the process is killed (SIGKILL, which also
stops code stuck in C, such as a catastrophic regex or sympy's big-integer arithmetic, that no
thread-level timer can interrupt) and replaced, and the call's outcome is "timeout". A call
that raises comes back as "error" with its traceback; a worker that dies mid-call (segfault,
`os._exit`, the address-space cap) gives "error" too. Nothing is left spinning: every process
the pool started is killed by `close()` or when the interpreter exits (daemon processes).

Workers start with the "forkserver" method where available (a clean single-threaded process
that forks them), which is safe from a process that already runs torch threads or CUDA. As with
any non-fork start method, a script that uses this must guard its entry point with
`if __name__ == "__main__":`.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import signal
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

__all__ = ["OK", "ERROR", "TIMEOUT", "ProcessPool", "WorkerStartError"]

OK, ERROR, TIMEOUT = "ok", "error", "timeout"


class WorkerStartError(RuntimeError):
    """A worker process could not start (its setup raised, it died, or it took too long)."""


def _limit_address_space(extra_mb: int | None) -> None:
    """Cap this process's virtual memory at its current size plus `extra_mb` (Linux)."""
    if not extra_mb:
        return
    try:
        import resource

        with open("/proc/self/statm") as f:
            current = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = current + extra_mb * 2**20
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ImportError, OSError, ValueError):
        pass  # no /proc or no RLIMIT_AS (macOS, Windows): run uncapped, the time limit still holds


def _worker_main(conn: Connection, memory_limit_mb: int | None, setup: Callable[[], Callable]) -> None:
    """Worker loop: `handler = setup()`, then receive argument tuples and send (kind, value)."""
    # Ctrl-C and a preemption's SIGTERM reach the whole process group; the parent decides
    # what happens (it finishes its step), so a worker must not die under a call.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        _limit_address_space(memory_limit_mb)
        handler = setup()
    except BaseException:
        conn.send(("init_error", traceback.format_exc()))
        return
    conn.send(("ready", None))
    while True:
        try:
            args = conn.recv()
        except (EOFError, OSError):
            return  # the parent closed the pipe: shut down
        try:
            reply = (OK, handler(*args))
        except Exception:  # includes MemoryError from the address-space cap
            reply = (ERROR, traceback.format_exc(limit=4))
        try:
            conn.send(reply)
        except Exception:  # an unpicklable return value
            conn.send((ERROR, f"the return value cannot be sent back: {traceback.format_exc(limit=1)}"))


class _Worker:
    """One process and the call it is running."""

    def __init__(self, ctx, memory_limit_mb: int | None, setup: Callable, name: str):
        self.conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(
            target=_worker_main, args=(child_conn, memory_limit_mb, setup), daemon=True, name=name
        )
        self.process.start()
        child_conn.close()  # so that the worker's death shows up as EOF on our end
        self.started = time.monotonic()
        self.ready = False
        self.job: int | None = None  # position of the call being run
        self.deadline = math.inf

    def kill(self) -> None:
        # SIGKILL: a worker deep in C code would not notice anything gentler.
        self.process.kill()
        self.conn.close()


class ProcessPool:
    """`num_workers` processes running `handler(*args)` calls, each limited to `timeout_s`.

    `setup` is a picklable zero-argument callable run once in each new worker; it returns the
    handler (so the handler itself may be a closure, or hold caches). Workers start on the first
    `run` and persist across calls; not thread-safe (callers serialize).
    """

    def __init__(
        self,
        setup: Callable[[], Callable],
        num_workers: int,
        memory_limit_mb: int | None = None,
        start_method: str | None = None,
        startup_timeout_s: float = 120.0,
        name: str = "forkrl-worker",
    ):
        self.setup = setup
        self.num_workers = max(1, num_workers)
        self.memory_limit_mb = memory_limit_mb
        self.startup_timeout_s = startup_timeout_s
        self.name = name
        available = multiprocessing.get_all_start_methods()
        self.start_method = start_method or ("forkserver" if "forkserver" in available else "spawn")
        self._workers: list[_Worker] = []
        self._pid = os.getpid()

    def run(self, calls: Sequence[tuple], timeout_s: float) -> list[tuple[str, Any]]:
        """Per call, in order: ("ok", value), ("error", traceback text) or ("timeout", None)."""
        outcomes: list[tuple[str, Any]] = [(TIMEOUT, None)] * len(calls)
        if not calls:
            return outcomes
        self._forget_if_forked()
        ctx = self._context()
        while len(self._workers) < self.num_workers:
            self._workers.append(self._new_worker(ctx))
        jobs = deque(enumerate(calls))
        while jobs or any(w.job is not None for w in self._workers):
            now = time.monotonic()
            for slot, worker in enumerate(self._workers):
                if worker.ready and worker.job is None and jobs:
                    i, args = jobs.popleft()
                    try:
                        worker.conn.send(args)
                    except OSError:  # died while idle: replace it and retry the call
                        jobs.appendleft((i, args))
                        self._replace(slot, ctx)
                        continue
                    # The limit starts at hand-off: a call only goes to an idle, started worker.
                    worker.job, worker.deadline = i, now + timeout_s
            deadlines = [w.deadline if w.ready else w.started + self.startup_timeout_s for w in self._workers]
            by_conn = {w.conn: slot for slot, w in enumerate(self._workers)}
            # Capped so the loop re-checks its state at least once a second, whatever happens.
            for conn in wait(list(by_conn), timeout=min(1.0, max(0.0, min(deadlines) - now))):
                self._receive(by_conn[conn], ctx, outcomes)
            now = time.monotonic()
            for slot, worker in enumerate(self._workers):
                if worker.job is not None and now >= worker.deadline:
                    self._replace(slot, ctx)  # the outcome stays "timeout"
                elif not worker.ready and now >= worker.started + self.startup_timeout_s:
                    self.close()
                    raise WorkerStartError(f"{self.name} worker did not start within {self.startup_timeout_s:.0f} s")
        return outcomes

    def close(self) -> None:
        """Stop all workers (a later `run` starts fresh ones)."""
        self._forget_if_forked()
        for worker in self._workers:
            worker.kill()
        for worker in self._workers:
            worker.process.join(timeout=1.0)  # reap now rather than leave zombies until exit
        self._workers = []

    # -- internals

    def _context(self):
        ctx = multiprocessing.get_context(self.start_method)
        if self.start_method == "forkserver":
            # Import the caller's main module (which every child would otherwise re-import) and the
            # math task once in the fork server, so new workers start in milliseconds. Has no
            # effect once the fork server is running.
            ctx.set_forkserver_preload(["__main__", "forkrl.tasks.math"])
        return ctx

    def _forget_if_forked(self) -> None:
        # After os.fork the child inherits handles to its parent's workers; never touch them.
        if os.getpid() != self._pid:
            self._workers, self._pid = [], os.getpid()

    def _new_worker(self, ctx) -> _Worker:
        return _Worker(ctx, self.memory_limit_mb, self.setup, self.name)

    def _replace(self, slot: int, ctx) -> None:
        # Not joined here: the replacement starts at once, and multiprocessing reaps the killed
        # process the next time it starts one (`close` joins them all).
        self._workers[slot].kill()
        self._workers[slot] = self._new_worker(ctx)

    def _receive(self, slot: int, ctx, outcomes: list) -> None:
        worker = self._workers[slot]
        try:
            kind, payload = worker.conn.recv()
        except (EOFError, OSError):
            if not worker.ready:
                code = worker.process.exitcode
                self.close()
                raise WorkerStartError(f"{self.name} worker exited during startup (exit code {code})") from None
            if worker.job is not None:
                outcomes[worker.job] = (ERROR, f"worker process died (exit code {worker.process.exitcode})")
            self._replace(slot, ctx)
            return
        if kind == "ready":
            worker.ready = True
        elif kind == "init_error":
            self.close()
            raise WorkerStartError(f"{self.name} worker failed to start: {payload.strip().splitlines()[-1]}")
        else:
            i, worker.job, worker.deadline = worker.job, None, math.inf
            outcomes[i] = (kind, payload)
