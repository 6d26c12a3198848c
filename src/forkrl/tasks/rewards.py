"""Reward plumbing: which function scores a completion, running it safely, overlong shaping.

A reward function is any callable `fn(completion: str, example: PromptExample) -> float`.
Name one by a registered name ("math") or by import path, "package.module:function" or
"path/to/file.py:function". `RewardComputer` scores a batch with it so that one bad item
never stops a run: an exception, a non-numeric or non-finite return, or a call that
overruns the time limit each scores 0 and is counted (the trainer stops a run when too many
of a step's calls fail). Import-path rewards run in worker processes that are killed on
timeout, so even a call stuck in C code cannot hang the run.

Options (`reward.kwargs`) reach a reward by its kind (`configure_reward`): a class named by import
path is instantiated with them, a reward object with options (`BatchReward.with_options`, e.g. the
forecast rewards) is copied with them replaced, and a function is called as
`fn(completion, example, **kwargs)` (verl's `reward_kwargs`). Keys the reward does not take raise
`RewardOptionsError` naming them and the valid ones, before anything is scored.

A function that can do better on a whole batch (the math reward, which fans checks out to
worker processes) also provides `score_batch(completions, examples, timeout_s) ->
RewardBatch`; `RewardComputer` then hands it the batch and trusts its counters.

A reward whose score of one response depends on the other responses of the step (the
forecast calibration rewards of `forkrl.tasks.forecast`) subclasses `BatchReward`: it writes
`score_all(completions, examples) -> RewardBatch` and inherits a `score_batch` that runs it
under the same time limit and failure accounting as per-response rewards (see `BatchReward`).

`overlong_penalty` (DAPO's overlong reward shaping, which the trainer adds to the task reward
before advantages are computed), `shape_rewards` and `accuracy_of` live in `forkrl.tasks.shaping`
and are re-exported here.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import logging
import math
import numbers
import os
import queue
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from forkrl.errors import UserError
from forkrl.registry import Registry
from forkrl.tasks.data import PromptExample
from forkrl.tasks.math import DEFAULT_TIMEOUT_S, MathVerifier, get_default_verifier
from forkrl.tasks.scores import RewardBatch
from forkrl.tasks.shaping import accuracy_of, overlong_penalty, shape_rewards
from forkrl.tasks.workers import ProcessPool

__all__ = [
    "REWARD_FUNCTIONS",
    "BatchReward",
    "MathReward",
    "RewardBatch",
    "RewardComputer",
    "RewardFn",
    "RewardOptionsError",
    "configure_reward",
    "load_reward_fn",
    "accuracy_of",
    "overlong_penalty",
    "shape_rewards",
    "register_reward",
]

logger = logging.getLogger(__name__)


class RewardFn(Protocol):
    """Score one completion of `example.prompt`; higher is better (the math reward is 0/1)."""

    def __call__(self, completion: str, example: PromptExample) -> float: ...


@runtime_checkable
class BatchRewardFn(Protocol):
    """A reward that scores whole batches itself, with its own isolation and time limits."""

    def score_batch(
        self, completions: Sequence[str], examples: Sequence[PromptExample], timeout_s: float
    ) -> RewardBatch: ...


# ---------------------------------------------------------------------------- built-ins


class MathReward:
    """1.0 when the completion's final answer is equivalent to `example.answer` (math-verify)."""

    def __init__(self, verifier: MathVerifier | None = None):
        # None: share the process-wide verifier, whose workers start on first use.
        self._verifier = verifier

    @property
    def verifier(self) -> MathVerifier:
        return self._verifier or get_default_verifier()

    def __call__(self, completion: str, example: PromptExample) -> float:
        return self.verifier.score([completion], [example.answer]).scores[0]

    def score_batch(
        self, completions: Sequence[str], examples: Sequence[PromptExample], timeout_s: float
    ) -> RewardBatch:
        return self.verifier.score(completions, [e.answer for e in examples], timeout_s)


REWARD_FUNCTIONS: Registry[RewardFn] = Registry(
    "reward", hint=" (or an import path like 'package.module:function' or 'path/to/file.py:function')"
)
"""Reward functions by name; `register_reward` adds to it."""


def register_reward(name: str, fn: RewardFn | None = None):
    """Register `fn` under `name`; usable as `register_reward("x", fn)` or `@register_reward("x")`."""

    def add(fn: RewardFn) -> RewardFn:
        if not callable(fn):
            raise TypeError(f"reward {name!r} must be callable, got {type(fn).__name__}")
        return REWARD_FUNCTIONS.register(name, fn)

    return add if fn is None else add(fn)


register_reward("math", MathReward())
# The forecast rewards subclass `BatchReward`: named by import path, imported when first used.
for _name in (
    "forecast_brier", "forecast_log", "forecast_winrate", "forecast_winrate_pure", "forecast_winrate_b5",
    "forecast_winrate_b20",
):  # fmt: skip
    REWARD_FUNCTIONS.register_lazy(_name, f"forkrl.tasks.forecast.scoring:{_name}")
REWARD_FUNCTIONS.register_lazy("forecast_truth", "forkrl.tasks.forecast.scoring:truth_score")


# ---------------------------------------------------------------------------- loading


def load_reward_fn(spec: str | RewardFn) -> RewardFn:
    """Resolve a registered name, "package.module:function" or "path/to/file.py:function".

    The attribute part may be dotted ("module:Class.method"). Raises ValueError naming
    what could not be found.
    """
    if callable(spec):
        return spec
    if spec in REWARD_FUNCTIONS or ":" not in spec:
        return REWARD_FUNCTIONS.get(spec)
    # rsplit: a Windows path ("C:\\x.py:fn") has a colon of its own
    module_part, attr_path = spec.rsplit(":", 1)
    if not module_part or not attr_path:
        raise ValueError(f"reward {spec!r}: expected 'module:function' with both parts non-empty")
    module = _import_reward_module(module_part, spec)

    obj = module
    for name in attr_path.split("."):
        if not hasattr(obj, name):
            raise ValueError(f"reward {spec!r}: {getattr(obj, '__name__', obj)!r} has no attribute {name!r}")
        obj = getattr(obj, name)
    if not callable(obj):
        raise ValueError(f"reward {spec!r}: {attr_path!r} is a {type(obj).__name__}, not callable")
    return obj


class RewardOptionsError(UserError):
    """Options (`reward.kwargs`) the reward does not take; the message names them and the valid ones."""


def _check_arguments(fn: Callable, options: Mapping[str, Any], leading: tuple = ()) -> None:
    """`fn(*leading, **options)` binds to `fn`'s signature; else `RewardOptionsError` naming the
    unknown (or missing) keys and the keyword parameters `fn` has after the `leading` ones."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # a builtin without a readable signature: the first call will tell
    try:
        signature.bind(*leading, **options)
        return
    except TypeError as err:
        problem = str(err)
    params = list(signature.parameters.values())
    keyword = [p.name for p in params[len(leading) :] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    valid = f"valid keys: {', '.join(keyword)}" if keyword else "it takes no options"
    unknown = [k for k in options if k not in keyword]
    if unknown and not any(p.kind is p.VAR_KEYWORD for p in params):
        problem = f"unknown key {', '.join(map(repr, unknown))}"
    raise RewardOptionsError(f"{problem}; {valid}")


def configure_reward(spec: str | RewardFn, options: Mapping[str, Any] | None = None) -> tuple[RewardFn, dict]:
    """The reward `spec` names (`load_reward_fn`) with its `options` (`reward.kwargs`) applied.

    Returns `(reward, call_kwargs)`: a response is scored as `reward(completion, example, **call_kwargs)`.

    - a class (`module:Class`): `Class(**options)` (no options: `Class()`); call_kwargs empty;
    - a reward object with options (`with_options`, e.g. a `BatchReward`): with options, the copy
      `reward.with_options(**options)`, the registered object left as it is; call_kwargs empty;
    - a function (any other callable): itself, with call_kwargs = `options`.

    Checked now, before anything is scored: keys a function or class does not take (by
    `inspect.signature(...).bind`), options for a reward object that takes none, and the reward's
    own checks of the values (`ValueError`/`TypeError` from its constructor) raise
    `RewardOptionsError` "reward 'SPEC': unknown key 'k'; valid keys: ...". A bad `spec` raises
    `load_reward_fn`'s ValueError, and so does a class whose constructor fails without options.
    The result depends on (spec, options) alone, so the worker processes of an import-path reward
    rebuild the same reward from them.
    """
    options = dict(options or {})
    obj = load_reward_fn(spec)
    try:
        if isinstance(obj, type):
            _check_arguments(obj, options)
            return obj(**options), {}
        if hasattr(obj, "with_options"):
            return (obj.with_options(**options) if options else obj), {}
        if isinstance(obj, BatchRewardFn):
            if options:  # its score_batch gets the whole batch and nothing else
                raise RewardOptionsError(f"unknown key {', '.join(map(repr, options))}; it takes no options")
            return obj, {}
        if options:
            _check_arguments(obj, options, leading=("completion", "example"))
        return obj, options
    except (TypeError, ValueError) as err:
        name = spec if isinstance(spec, str) else getattr(obj, "__name__", None) or getattr(obj, "name", repr(obj))
        # A class that fails to build without options has a problem of its own, not of its options.
        kind = RewardOptionsError if options or isinstance(err, RewardOptionsError) else ValueError
        raise kind(f"reward {name!r}: {err}") from err


def _import_reward_module(module_part: str, spec: str):
    if module_part.endswith(".py") or os.sep in module_part or "/" in module_part:
        path = os.path.abspath(module_part)
        if not os.path.isfile(path):
            raise ValueError(f"reward {spec!r}: file {module_part!r} not found")
        # A path-derived name: loading the same file twice reuses the module, and logs name it.
        name = "forkrl_reward_" + "".join(c if c.isalnum() else "_" for c in path)
        if name in sys.modules:
            return sys.modules[name]
        file_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(file_spec)
        sys.modules[name] = module
        try:
            file_spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
        return module
    try:
        return importlib.import_module(module_part)
    except ModuleNotFoundError as e:
        if e.name == module_part or module_part.startswith(f"{e.name}."):
            raise ValueError(f"reward {spec!r}: module {module_part!r} not found (is it on PYTHONPATH?)") from e
        raise  # the module exists but one of its own imports is missing: show that error as is


# ---------------------------------------------------------------------------- scoring

_OK, _ERROR, _TIMEOUT = "ok", "error", "timeout"


class _Runner:
    """One persistent daemon thread that runs calls sent to its inbox.

    Daemon, so a call that never returns cannot block interpreter exit. Reused across
    calls because starting a thread per call costs ~100x more than a queue hand-off.
    """

    def __init__(self):
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._loop, daemon=True, name="forkrl-reward").start()

    def _loop(self) -> None:
        while (job := self.inbox.get()) is not None:
            results, i, fn, args = job
            try:
                results.put((i, _OK, fn(*args)))
            except BaseException:  # noqa: B036 -- a reward raising SystemExit must not end the run
                results.put((i, _ERROR, traceback.format_exc()))

    def abandon(self) -> None:
        """Exit once the current call returns (a thread cannot be killed), if it ever does."""
        self.inbox.put(None)


class _GuardedCaller:
    """Runs `fn(*args)` over a batch on up to `size` runners, each call limited to `timeout_s`.

    A runner whose call overruns is abandoned and replaced, and the call's late result is
    dropped (results go to a queue private to the batch it belongs to).
    """

    def __init__(self, size: int):
        self._idle = [_Runner() for _ in range(size)]
        self._lock = threading.Lock()  # runners serve one batch at a time

    def close(self) -> None:
        """Let the idle threads exit (SimpleQueue.put is safe even from a finalizer)."""
        for runner in self._idle:
            runner.abandon()
        self._idle = []

    __del__ = close

    def run(self, fn: Callable, args_list: Sequence[tuple], timeout_s: float) -> list[tuple[str, object]]:
        """Per call: ("ok", value), ("error", traceback text) or ("timeout", None)."""
        outcomes: list[tuple[str, object]] = [(_TIMEOUT, None)] * len(args_list)
        results: queue.SimpleQueue = queue.SimpleQueue()
        running: dict[int, tuple[_Runner, float]] = {}  # batch position -> (runner, deadline)
        next_item = 0
        with self._lock:
            while next_item < len(args_list) or running:
                # The deadline starts at hand-off: a call only goes to an idle runner.
                while self._idle and next_item < len(args_list):
                    runner = self._idle.pop()
                    runner.inbox.put((results, next_item, fn, args_list[next_item]))
                    running[next_item] = (runner, time.monotonic() + timeout_s)
                    next_item += 1
                earliest = min(deadline for _, deadline in running.values())
                try:
                    i, kind, value = results.get(timeout=max(0.0, earliest - time.monotonic()))
                    if i in running:
                        self._idle.append(running.pop(i)[0])
                        outcomes[i] = (kind, value)
                except queue.Empty:
                    pass
                now = time.monotonic()
                for i in [i for i, (_, deadline) in running.items() if deadline <= now]:
                    running.pop(i)[0].abandon()  # outcome stays "timeout"
                    self._idle.append(_Runner())
        return outcomes


def _as_score(value: object) -> float | None:
    """The finite float a reward returned, or None when it returned anything else."""
    if isinstance(value, (str, bytes)) or not (isinstance(value, numbers.Real) or hasattr(value, "__float__")):
        return None
    try:
        score = float(value)  # also takes numpy scalars and one-element tensors
    except (TypeError, ValueError, RuntimeError):
        return None
    return score if math.isfinite(score) else None


def _reward_worker_setup(spec: str, parent_sys_path: list[str], options: dict | None = None):
    """Runs once in each reward worker process: import the reward, apply its `options`
    (`configure_reward`, as in the parent) and return a checked caller."""
    # A fork server started earlier (or by another pool) does not see the parent's later
    # sys.path changes; the reward's module must resolve exactly as in the parent.
    sys.path[:0] = [p for p in parent_sys_path if p not in sys.path]
    fn, call_kwargs = configure_reward(spec, options)

    def call(completion: str, example: PromptExample) -> tuple[float | None, str]:
        value = fn(completion, example, **call_kwargs)
        # Converted here: the raw value (a tensor, a custom object) may not survive pickling.
        return _as_score(value), f"{value!r:.80}"

    return call


def _is_import_spec(spec: object) -> bool:
    return isinstance(spec, str) and spec not in REWARD_FUNCTIONS and ":" in spec


def _absolute_spec(spec: str) -> str:
    """`file.py:fn` with the file made absolute (workers may run in another directory)."""
    module_part, attr = spec.rsplit(":", 1)
    if module_part.endswith(".py") or os.sep in module_part or "/" in module_part:
        return f"{os.path.abspath(module_part)}:{attr}"
    return spec


class RewardComputer:
    """Scores batches with one reward function, so that no single item can stop the run.

    Per item: an exception, a non-finite or non-numeric return, or a call running past
    `timeout_s` scores 0 and is counted in the returned `RewardBatch`, which also keeps one
    failing call's description (`first_failure`) for the caller's error message. The first
    `max_logged_errors` problems are logged with their batch position and prompt index.

    Where the reward runs:

    - a `"module:function"` / `"file.py:function"` spec of a per-response reward: in `max_concurrency` worker
      processes (`forkrl.tasks.workers.ProcessPool`, the mechanism behind the math reward). A
      call that overruns `timeout_s` is killed with its process, even when it is stuck in C
      code (a catastrophic regex), and the process is replaced; nothing keeps spinning. The
      function and its module are imported in the parent first, so a bad spec fails at once.
    - a batch reward (`score_batch`, e.g. "math", or a `BatchReward` named by import path):
      handed the whole batch in this process; it isolates itself.
    - a Python callable or a name registered at runtime: on `max_concurrency` persistent
      daemon threads (it need not be picklable). A timed-out call cannot be killed: its
      thread is written off, exits if the call ever returns, and is replaced. CPU-bound
      Python rewards share the GIL there, so give rewards that can truly hang an import
      path, which runs them in processes.
    """

    def __init__(
        self,
        reward_fn: str | RewardFn = "math",
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_concurrency: int = 4,
        max_logged_errors: int = 5,
        reward_kwargs: Mapping[str, Any] | None = None,
    ):
        """`reward_kwargs`: the reward's options (`reward.kwargs`), applied by `configure_reward`;
        unknown keys raise `RewardOptionsError` here, before any worker starts."""
        if not (timeout_s > 0 and math.isfinite(timeout_s)) or max_concurrency < 1:
            raise ValueError(
                f"need a finite timeout_s > 0 and max_concurrency >= 1, got {timeout_s}, {max_concurrency}"
            )
        reward_kwargs = dict(reward_kwargs or {})
        self.reward_fn, call_kwargs = configure_reward(reward_fn, reward_kwargs)
        # Plain functions with options run on threads as fn(completion, example, **options).
        self._thread_fn = functools.partial(self.reward_fn, **call_kwargs) if call_kwargs else self.reward_fn
        self.name = reward_fn if isinstance(reward_fn, str) else getattr(reward_fn, "__name__", repr(reward_fn))
        self.timeout_s = timeout_s
        self.max_concurrency = max_concurrency
        self.max_logged_errors = max_logged_errors
        self._logged = 0
        self._caller: _GuardedCaller | None = None  # threads start on the first plain-function batch
        self._pool: ProcessPool | None = None
        # A batch reward named by import path scores itself in this process: no workers for it.
        if _is_import_spec(reward_fn) and not isinstance(self.reward_fn, BatchRewardFn):
            # The workers rebuild the reward from (spec, options): both picklable, the reward itself need not be.
            setup = functools.partial(
                _reward_worker_setup, _absolute_spec(reward_fn), [os.getcwd(), *sys.path], reward_kwargs
            )
            workers = min(max_concurrency, os.cpu_count() or 1)
            self._pool = ProcessPool(setup, workers, name="forkrl-reward")

    def __call__(self, completions: Sequence[str], examples: Sequence[PromptExample]) -> RewardBatch:
        """Score `completions[i]` as a response to `examples[i]`."""
        if len(completions) != len(examples):
            raise ValueError(f"{len(completions)} completions but {len(examples)} examples")
        if isinstance(self.reward_fn, BatchRewardFn):
            return self.reward_fn.score_batch(completions, examples, self.timeout_s)
        calls = list(zip(completions, examples))
        if self._pool is not None:
            outcomes = self._pool.run(calls, self.timeout_s)
            # The worker already turned the return value into (score or None, its repr).
            outcomes = [(_OK, value) if kind == _OK else (kind, value) for kind, value in outcomes]
            checked = True
        else:
            if self._caller is None:
                self._caller = _GuardedCaller(self.max_concurrency)
            outcomes = self._caller.run(self._thread_fn, calls, self.timeout_s)
            checked = False
        batch = RewardBatch(scores=[0.0] * len(completions))
        for i, (kind, value) in enumerate(outcomes):
            if kind == _TIMEOUT:
                batch.num_timeouts += 1
                self._failed(batch, i, examples[i], f"timed out after {self.timeout_s:g} s")
            elif kind == _ERROR:
                batch.num_errors += 1
                self._failed(batch, i, examples[i], f"raised:\n{value}")
            else:
                score, shown = value if checked else (_as_score(value), f"{value!r:.80}")
                if score is None:
                    batch.num_invalid += 1
                    self._failed(batch, i, examples[i], f"returned {shown}, not a finite number")
                else:
                    batch.scores[i] = score
        return batch

    def close(self) -> None:
        """Release the workers: processes are killed; idle threads exit now, a stuck one when its call returns."""
        if self._caller is not None:
            self._caller.close()
            self._caller = None
        if self._pool is not None:
            self._pool.close()

    def _failed(self, batch: RewardBatch, position: int, example: PromptExample, what: str) -> None:
        if batch.first_failure is None:
            # One line, for an error message: of a traceback, its last line (the exception).
            short = f"raised {what.strip().splitlines()[-1]}" if what.startswith("raised:") else what
            batch.first_failure = f"batch item {position} (prompt index {example.index}) {short}"
        self._log(position, example, what)

    def _log(self, position: int, example: PromptExample, what: str) -> None:
        if self._logged >= self.max_logged_errors:
            return
        self._logged += 1
        suffix = " (further problems are counted, not logged)" if self._logged == self.max_logged_errors else ""
        logger.warning(
            "reward %r on batch item %d (prompt index %d) %s%s", self.name, position, example.index, what, suffix
        )


# ---------------------------------------------------------------------------- batch rewards


class BatchReward:
    """Base of rewards that score a whole batch at once: one response's score may depend on the others'.

    A subclass implements `score_all(completions, examples) -> RewardBatch`, returning one score
    per response plus its own per-item counts (`num_invalid_format` for responses without a
    parseable answer, which are scored by the reward's documented rule and are not failures;
    `num_errors` and `first_failure` for items the reward could not score, e.g. a bad data row).

    `score_batch`, which `RewardComputer` calls with the step's responses and rows (one sampling
    round of the trainer: `rollout.prompts_per_round` x `rollout.group_size` responses), runs
    `score_all` with the accounting of per-response rewards, the batch being one call:

    - it runs on a persistent daemon thread of its own, limited to `timeout_s` for the whole batch;
      past that, every item scores 0 and counts as a timeout (the thread is written off, as for
      Python-callable rewards);
    - an exception scores every item 0 and counts each as an error, with the exception's last
      line in `first_failure`; so does a return that is not a `RewardBatch` of one score per item;
    - a returned score that is not a finite number scores 0 and counts as invalid (`num_invalid`).

    Called on one response (`reward(completion, example)`), it scores the batch of one, directly.

    Options (`reward.kwargs`): `with_options(**changes)` returns a new reward built by the
    subclass's constructor from the current options with `changes` replaced. The options are the
    constructor's parameters that the instance keeps as attributes of the same name (`options()`);
    a subclass that stores them otherwise overrides `options`.
    """

    name: str = "batch reward"
    """Shown in log lines."""

    def options(self) -> dict[str, Any]:
        """The current options: each constructor parameter held as an attribute of the same name."""
        params = inspect.signature(type(self)).parameters.values()
        named = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        return {name: getattr(self, name) for name in named if hasattr(self, name)}

    def with_options(self, **changes: Any) -> BatchReward:
        """A new reward of this class with `changes` replacing the current options (this one is left
        as it is). `RewardOptionsError` naming unknown keys and the valid ones; the constructor checks values."""
        current = self.options()
        unknown = [k for k in changes if k not in current]
        if unknown:
            valid = f"valid keys: {', '.join(current)}" if current else "it takes no options"
            raise RewardOptionsError(f"unknown key {', '.join(map(repr, unknown))}; {valid}")
        return type(self)(**{**current, **changes})

    def score_all(self, completions: Sequence[str], examples: Sequence[PromptExample]) -> RewardBatch:
        raise NotImplementedError

    def __call__(self, completion: str, example: PromptExample) -> float:
        return self.score_all([completion], [example]).scores[0]

    def score_batch(
        self, completions: Sequence[str], examples: Sequence[PromptExample], timeout_s: float
    ) -> RewardBatch:
        n = len(completions)
        if n == 0:
            return RewardBatch(scores=[])
        if getattr(self, "_caller", None) is None:
            self._caller = _GuardedCaller(1)  # started on first use: registering a reward starts nothing
        ((kind, value),) = self._caller.run(self.score_all, [(list(completions), list(examples))], timeout_s)
        if kind == _TIMEOUT:
            return self._failed_batch(n, True, f"timed out after {timeout_s:g} s")
        if kind == _ERROR:
            return self._failed_batch(n, False, f"raised {value.strip().splitlines()[-1]}")
        if not isinstance(value, RewardBatch) or len(value.scores) != n:
            shown = f"{len(value.scores)} scores" if isinstance(value, RewardBatch) else f"{value!r:.80}"
            return self._failed_batch(n, False, f"returned {shown}, not a RewardBatch of {n} scores")
        batch = RewardBatch(
            scores=[0.0] * n,
            num_errors=value.num_errors,
            num_timeouts=value.num_timeouts,
            num_invalid=value.num_invalid,
            first_failure=value.first_failure,
            num_invalid_format=value.num_invalid_format,
        )
        for i, raw in enumerate(value.scores):
            score = _as_score(raw)
            if score is None:
                batch.num_invalid += 1
                if batch.first_failure is None:
                    batch.first_failure = (
                        f"batch item {i} (prompt index {examples[i].index}) scored {raw!r:.80}, not a finite number"
                    )
            else:
                batch.scores[i] = score
        if batch.first_failure is not None:
            logger.warning("reward %r: %s", self.name, batch.first_failure)
        return batch

    def _failed_batch(self, n: int, timed_out: bool, what: str) -> RewardBatch:
        batch = RewardBatch(
            scores=[0.0] * n,
            num_errors=0 if timed_out else n,
            num_timeouts=n if timed_out else 0,
            first_failure=f"the batch call ({n} responses) {what}",
        )
        logger.warning("reward %r: %s", self.name, batch.first_failure)
        return batch
