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
replaced, and that check scores 0 (`forkrl.tasks.workers.ProcessPool`, which also runs
`module:function` rewards). Each worker also gets an address-space cap so a check that
allocates gigabytes fails with MemoryError instead of taking the machine down.

Workers start with the "forkserver" method (a clean single-threaded process that forks
them), which is safe to use from a process that already runs torch threads or CUDA. As with
any non-fork start method, a script that uses this must guard its entry point with
`if __name__ == "__main__":`.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import re
import threading
from collections.abc import Sequence

from forkrl.tasks.scores import RewardBatch
from forkrl.tasks.workers import OK, TIMEOUT, ProcessPool, WorkerStartError

__all__ = [
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


def _math_setup():
    """Runs once in each new worker: import math-verify (failing visibly if it is missing)."""
    # We disabled math-verify's signal timeouts on purpose; hush its warning about that.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    import math_verify  # noqa: F401

    return _verify


# ---------------------------------------------------------------------------- parent side


class MathVerifier:
    """A pool of math-verify worker processes with a hard per-check time limit.

    Workers start on first use and persist across batches (math-verify's parse caches stay
    warm). A check that runs past `timeout_s` costs its worker, which is replaced
    (`forkrl.tasks.workers.ProcessPool`). Thread-safe: concurrent batches take turns.
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
        self.max_logged_errors = max_logged_errors
        self._pool = ProcessPool(
            _math_setup,
            self.num_workers,
            memory_limit_mb=memory_limit_mb,
            start_method=start_method,
            startup_timeout_s=startup_timeout_s,
            name="forkrl-math-verify",
        )
        self._lock = threading.Lock()
        self._logged_errors = 0

    # -- public

    def score(self, completions: Sequence[str], answers: Sequence[str], timeout_s: float | None = None) -> RewardBatch:
        """Score each completion against its reference answer (1.0 equivalent, else 0.0). A completion
        with no extractable answer scores 0 without a check (`num_invalid_format`); a check that
        raised or whose worker died counts in `num_errors`, one killed at the time limit in
        `num_timeouts` (both score 0)."""
        if len(completions) != len(answers):
            raise ValueError(f"{len(completions)} completions but {len(answers)} answers")
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        result = RewardBatch(scores=[0.0] * len(completions))
        positions, calls = [], []
        for i, (completion, answer) in enumerate(zip(completions, answers)):
            prediction = extract_answer(completion)
            if prediction is None:
                result.num_invalid_format += 1
            else:
                positions.append(i)
                calls.append((str(answer), prediction))
        if not calls:
            return result
        with self._lock:
            try:
                outcomes = self._pool.run(calls, timeout_s)
            except WorkerStartError as err:
                raise RuntimeError(f"math verification: {err}") from err
        for i, (kind, value) in zip(positions, outcomes):
            if kind == OK:
                result.scores[i] = value
            elif kind == TIMEOUT:
                result.num_timeouts += 1
            else:
                result.num_errors += 1
                self._log_error(f"check of batch item {i} raised:\n{value}")
        return result

    def close(self) -> None:
        """Stop all workers (a later `score` starts fresh ones)."""
        with self._lock:
            self._pool.close()

    def __enter__(self) -> MathVerifier:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

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
