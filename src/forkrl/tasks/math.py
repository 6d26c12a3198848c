"""Math rewards: pull the final answer out of a completion and judge it with math-verify.

The answer is the last `\\boxed{...}` (or `\\fbox{...}`) with balanced braces, else the last
`Answer: ...` line. It is compared with the reference by `math_verify` (symbolic and
numeric equivalence through sympy): 1.0 when equivalent, 0.0 otherwise or when there is
no answer.

Checks run in a few persistent worker processes, never in the caller. math-verify hands
answers to sympy, and some answers (`\\boxed{9^{9^{9^{9}}}}`, a huge factorial) make sympy
compute for hours or exhaust memory. math-verify's own guard is `signal.alarm`, which works
only in a main thread and cannot interrupt long C-level big-integer arithmetic, so it is
switched off; instead a worker that overruns the per-check limit is killed (SIGKILL) and
replaced, and that check scores 0. Each worker also gets an address-space cap so a check
that allocates gigabytes fails with MemoryError instead of taking the machine down.

Workers start with the "forkserver" method (a clean single-threaded process that forks
them, with math-verify preloaded), which is safe to use from a process that already runs
torch threads or CUDA. As with any non-fork start method, a script that uses this must
guard its entry point with `if __name__ == "__main__":`.
"""

from __future__ import annotations

import atexit
import functools
import logging
import math
import multiprocessing
import os
import re
import threading
import time
import traceback
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

__all__ = [
    "MathScores",
    "MathVerifier",
    "extract_answer",
    "extract_boxed",
    "get_default_verifier",
    "math_reward",
    "score_batch",
]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 5.0
"""Per-check limit (math-verify's own default). Ordinary answers take milliseconds."""

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
# "Answer: 42", "**Final answer:** $42$", "## Answer: 42"; the last such line wins.
# No adjacent or nested quantifiers over the same characters: the scan stays linear even
# on adversarial text (it runs in the caller, outside any time limit).
_ANSWER_LINE_RE = re.compile(r"^[ \t*#>]*(?:final[ \t]+)?answer[ \t*]*[:：](.*)$", re.I | re.M)


# ---------------------------------------------------------------------------- extraction


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` / `\\fbox{...}`, or None if absent or unclosed.

    Braces are counted, skipping escaped characters (`\\{`, `\\}`), so nested groups such
    as `\\boxed{\\frac{1}{2}}` come out whole. An unclosed last box (a truncated completion)
    counts as no box: the model never finished stating that answer.
    """
    starts = [match.end() for match in _BOXED_RE.finditer(text)]
    if not starts:
        return None
    start = i = starts[-1]
    depth = 1
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2  # an escaped character never opens or closes a group
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
        i += 1
    return None


def extract_answer(text: str) -> str | None:
    """The final answer stated in a completion: last box, else last `Answer:` line, else None."""
    boxed = extract_boxed(text)
    if boxed is not None and boxed.strip():
        return boxed.strip()
    lines = _ANSWER_LINE_RE.findall(text)
    if not lines:
        return None
    # Markdown emphasis, math delimiters and a closing full stop are decoration, not answer:
    # math-verify reads "42." as the string "42." and would mark it wrong.
    answer = lines[-1].strip().strip("*").strip().rstrip(".").strip()
    if len(answer) > 1 and answer.startswith("$") and answer.endswith("$"):
        answer = answer.strip("$").strip().rstrip(".").strip()
    return answer or None


# ---------------------------------------------------------------------------- worker side


def _as_boxed(text: str) -> str:
    """Wrap plain text in `\\boxed{}` so math-verify's LaTeX extraction reads all of it."""
    text = text.strip()
    if "\\boxed" in text or "\\fbox" in text or text.startswith(("$", "\\(", "\\[")):
        return text
    return "\\boxed{" + text + "}"


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str) -> list:
    # Cached: each reference is checked against G responses in a row. Callers only read it.
    from math_verify import parse

    return parse(_as_boxed(gold), parsing_timeout=None)


def _verify(gold: str, prediction: str) -> float:
    """1.0 when `prediction` (an extracted answer) is equivalent to `gold`. Runs in a worker."""
    from math_verify import parse, verify

    gold_parsed = _parse_gold(gold)
    if not gold_parsed:
        return 0.0
    # The prediction came out of a box already; re-boxing keeps math-verify from hunting
    # for some other expression inside it.
    predicted = parse("\\boxed{" + prediction + "}", parsing_timeout=None)
    return float(verify(gold_parsed, predicted, timeout_seconds=None))


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


def _worker_main(conn: Connection, memory_limit_mb: int | None) -> None:
    """Worker loop: receive (gold, prediction), send ("ok", score) or ("error", traceback)."""
    import signal

    # Ctrl-C reaches the whole process group; the parent decides what to do, not us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _limit_address_space(memory_limit_mb)
        # We disabled math-verify's signal timeouts on purpose; hush its warning about that.
        logging.getLogger("math_verify").setLevel(logging.ERROR)
        import math_verify  # noqa: F401 -- fail here, visibly, if it is missing
    except BaseException:
        conn.send(("init_error", traceback.format_exc()))
        return
    conn.send(("ready", None))
    while True:
        try:
            gold, prediction = conn.recv()
        except (EOFError, OSError):
            return  # the parent closed the pipe: shut down
        try:
            reply = ("ok", _verify(gold, prediction))
        except Exception:  # includes MemoryError from the address-space cap
            reply = ("error", traceback.format_exc(limit=4))
        conn.send(reply)


# ---------------------------------------------------------------------------- parent side


@dataclass
class MathScores:
    """Scores of one batch and what went wrong while computing them."""

    scores: list[float]
    """1.0 or 0.0 per completion, in input order."""
    num_timeouts: int = 0
    """Checks killed at the time limit (scored 0)."""
    num_errors: int = 0
    """Checks that raised or whose worker died (scored 0)."""
    num_unanswered: int = 0
    """Completions with no extractable answer (scored 0 without a check)."""


class _Worker:
    """One verification process and the job it is running."""

    def __init__(self, ctx: multiprocessing.context.BaseContext, memory_limit_mb: int | None):
        self.conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(
            target=_worker_main, args=(child_conn, memory_limit_mb), daemon=True, name="forkrl-math-verify"
        )
        self.process.start()
        child_conn.close()  # so that the worker's death shows up as EOF on our end
        self.started = time.monotonic()
        self.ready = False
        self.job: int | None = None  # batch position being checked
        self.deadline = math.inf

    def kill(self) -> None:
        # SIGKILL: a worker deep in C arithmetic would not notice anything gentler.
        # multiprocessing reaps the zombie the next time it starts a process.
        self.process.kill()
        self.conn.close()


class MathVerifier:
    """A pool of math-verify worker processes with a hard per-check time limit.

    Workers start on first use and persist across batches (math-verify's parse caches stay
    warm). A check that runs past `timeout_s` costs its worker, which is replaced.
    Thread-safe: concurrent batches take turns.
    """

    def __init__(
        self,
        num_workers: int | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        memory_limit_mb: int | None = 2048,
        start_method: str | None = None,
        startup_timeout_s: float = 120.0,
        max_logged_errors: int = 3,
    ):
        """
        Args:
            num_workers: processes checking in parallel; default min(4, CPU count).
            timeout_s: default per-check limit, counted from when a worker receives the check.
            memory_limit_mb: address space a worker may allocate beyond its size at start;
                None for no cap.
            start_method: multiprocessing start method; default "forkserver" where available.
            startup_timeout_s: how long a new worker may take to import math-verify.
            max_logged_errors: worker tracebacks logged over this verifier's lifetime.
        """
        self.num_workers = num_workers or min(4, os.cpu_count() or 1)
        self.timeout_s = timeout_s
        self.memory_limit_mb = memory_limit_mb
        self.startup_timeout_s = startup_timeout_s
        self.max_logged_errors = max_logged_errors
        available = multiprocessing.get_all_start_methods()
        self.start_method = start_method or ("forkserver" if "forkserver" in available else "spawn")
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._logged_errors = 0

    # -- public

    def score(self, completions: Sequence[str], answers: Sequence[str], timeout_s: float | None = None) -> MathScores:
        """Score each completion against its reference answer (1.0 equivalent, else 0.0)."""
        if len(completions) != len(answers):
            raise ValueError(f"{len(completions)} completions but {len(answers)} answers")
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        result = MathScores(scores=[0.0] * len(completions))
        jobs: deque[tuple[int, tuple[str, str]]] = deque()
        for i, (completion, answer) in enumerate(zip(completions, answers)):
            prediction = extract_answer(completion)
            if prediction is None:
                result.num_unanswered += 1
            else:
                jobs.append((i, (str(answer), prediction)))
        if jobs:
            with self._lock:
                self._run(jobs, timeout_s, result)
        return result

    def close(self) -> None:
        """Stop all workers (a later `score` starts fresh ones)."""
        with self._lock:
            self._forget_if_forked()
            self._kill_all()

    def __enter__(self) -> MathVerifier:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- scheduling

    def _context(self) -> multiprocessing.context.BaseContext:
        ctx = multiprocessing.get_context(self.start_method)
        if self.start_method == "forkserver":
            # Import math-verify (and the caller's main module, which every child would
            # otherwise re-import) once in the fork server, so new workers start in ms.
            # Has no effect if the fork server is already running.
            ctx.set_forkserver_preload(["__main__", __name__])
        return ctx

    def _forget_if_forked(self) -> None:
        # After os.fork the child inherits handles to its parent's workers; never touch them.
        if os.getpid() != self._pid:
            self._workers, self._pid = [], os.getpid()

    def _run(self, jobs: deque, timeout_s: float, result: MathScores) -> None:
        self._forget_if_forked()
        ctx = self._context()
        while len(self._workers) < self.num_workers:
            self._workers.append(_Worker(ctx, self.memory_limit_mb))

        while jobs or any(w.job is not None for w in self._workers):
            now = time.monotonic()
            for slot, worker in enumerate(self._workers):
                if worker.ready and worker.job is None and jobs:
                    i, payload = jobs.popleft()
                    try:
                        worker.conn.send(payload)
                    except OSError:  # died while idle: replace it and retry the job
                        jobs.appendleft((i, payload))
                        self._replace(slot, ctx)
                        continue
                    worker.job, worker.deadline = i, now + timeout_s

            deadlines = [w.deadline if w.ready else w.started + self.startup_timeout_s for w in self._workers]
            by_conn = {w.conn: slot for slot, w in enumerate(self._workers)}
            # Capped so the loop re-checks its state at least once a second, whatever happens.
            for conn in wait(list(by_conn), timeout=min(1.0, max(0.0, min(deadlines) - now))):
                self._receive(by_conn[conn], ctx, result)

            now = time.monotonic()
            for slot, worker in enumerate(self._workers):
                if worker.job is not None and now >= worker.deadline:
                    result.num_timeouts += 1  # score stays 0
                    self._replace(slot, ctx)
                elif not worker.ready and now >= worker.started + self.startup_timeout_s:
                    self._kill_all()
                    raise RuntimeError(f"math verification worker did not start within {self.startup_timeout_s:.0f} s")

    def _receive(self, slot: int, ctx, result: MathScores) -> None:
        worker = self._workers[slot]
        try:
            kind, payload = worker.conn.recv()
        except (EOFError, OSError):
            if not worker.ready:
                code = worker.process.exitcode
                self._kill_all()
                raise RuntimeError(f"math verification worker exited during startup (exit code {code})") from None
            if worker.job is not None:
                result.num_errors += 1
                self._log_error(f"worker died (exit code {worker.process.exitcode}) while checking")
            self._replace(slot, ctx)
            return
        if kind == "ready":
            worker.ready = True
        elif kind == "init_error":
            self._kill_all()
            raise RuntimeError(f"math verification worker failed to start:\n{payload}")
        else:
            i, worker.job, worker.deadline = worker.job, None, math.inf
            if kind == "ok":
                result.scores[i] = payload
            else:
                result.num_errors += 1
                self._log_error(f"check of batch item {i} raised:\n{payload}")

    def _replace(self, slot: int, ctx) -> None:
        self._workers[slot].kill()
        self._workers[slot] = _Worker(ctx, self.memory_limit_mb)

    def _kill_all(self) -> None:
        for worker in self._workers:
            worker.kill()
        for worker in self._workers:
            worker.process.join(timeout=1.0)  # reap now rather than leave zombies until exit
        self._workers = []

    def _log_error(self, message: str) -> None:
        if self._logged_errors < self.max_logged_errors:
            self._logged_errors += 1
            logger.warning("math verification: %s", message)


# ---------------------------------------------------------------------------- module API

_default_verifier: MathVerifier | None = None
_default_lock = threading.Lock()


def get_default_verifier() -> MathVerifier:
    """The process-wide verifier behind `math_reward` and `score_batch` (created lazily)."""
    global _default_verifier
    with _default_lock:
        if _default_verifier is None:
            _default_verifier = MathVerifier()
            atexit.register(_default_verifier.close)
        return _default_verifier


def score_batch(
    completions: Sequence[str], answers: Sequence[str], timeout_s: float = DEFAULT_TIMEOUT_S
) -> list[float]:
    """1.0/0.0 per completion; checks run in parallel, each limited to `timeout_s`."""
    return get_default_verifier().score(completions, answers, timeout_s).scores


def math_reward(completion: str, answer: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> float:
    """1.0 if the completion's final answer is equivalent to `answer`, else 0.0."""
    return score_batch([completion], [answer], timeout_s)[0]
