"""Which of forkrl's speed-ups a run used, and one warning per run for each one it had to decline.

Each fast path gives the same numbers as the plain path (up to float rounding) and is faster, so
falling back is never an error; falling back *silently* is the failure this module exists for (a
transformers release once turned all four off without a word, tripling the demo's CPU time). At
every place a fast path could run, the code reports one of:

- `used(name)`: it ran;
- `declined(name, reason)`: it was wanted but cannot run here (the model, transformers, a setting):
  logged once per run and reason, with the transformers version;
- nothing, when it does not apply (all prompts distinct; `share_prompt=False`; `decode_phase=0`).

The trainer resets the record at the start of a run and writes `fast_path/<name>` (1 used, 0
declined) to every step of `metrics.jsonl`; `forkrl demo` and `forkrl eval` put `status()` in their
reports.
"""

from __future__ import annotations

import logging
import threading

import transformers

logger = logging.getLogger(__name__)

SHARED_PREFIX_SCORING = "shared_prefix_scoring"
SHARED_PROMPT_PREFILL = "shared_prompt_prefill"
INPLACE_KV_CACHE = "inplace_kv_cache"
DECODE_PHASES = "decode_phases"
LEAN_DECODE_LOOP = "lean_decode_loop"

DESCRIPTIONS = {
    SHARED_PREFIX_SCORING: "shared-prefix scoring (each group's prompt run once in the update pass)",
    SHARED_PROMPT_PREFILL: "shared-prompt prefill (each group's prompt prefilled once in generation)",
    INPLACE_KV_CACHE: "in-place KV cache (generation appends without re-concatenating)",
    DECODE_PHASES: "decode phases (rollout.decode_phase: finished rows leave every n tokens)",
    LEAN_DECODE_LOOP: "lean decode loop (generation steps the model's forward itself, without generate's overhead)",
}
"""Every fast path, by the name used in metrics and reports."""


class _Record:
    """Counts of use and the reasons of decline, for the whole run and since the last `step_flags`."""

    def __init__(self):
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.used: dict[str, int] = {}
        self.declined: dict[str, str] = {}  # name -> first reason
        self.warned: set[tuple[str, str]] = set()
        self.window_used: set[str] = set()
        self.window_declined: set[str] = set()


_RECORD = _Record()


def used(name: str) -> None:
    """Report that fast path `name` ran."""
    with _RECORD.lock:
        _RECORD.used[name] = _RECORD.used.get(name, 0) + 1
        _RECORD.window_used.add(name)


def declined(name: str, reason: str) -> None:
    """Report that fast path `name` was wanted but cannot run, and why (warns once per run and reason)."""
    with _RECORD.lock:
        _RECORD.declined.setdefault(name, reason)
        _RECORD.window_declined.add(name)
        first = (name, reason) not in _RECORD.warned
        _RECORD.warned.add((name, reason))
    if first:
        logger.warning(warning_text(name, reason))


def warning_text(name: str, reason: str) -> str:
    """The one-line warning for a declined fast path."""
    return (
        f"fast path off: {DESCRIPTIONS.get(name, name)}: {reason} (transformers {transformers.__version__}); "
        "results are the same up to float rounding, but slower"
    )


def reset() -> None:
    """Forget what earlier runs in this process used and declined (called at the start of a run)."""
    with _RECORD.lock:
        _RECORD.reset()


def status() -> dict[str, str]:
    """Per fast path: `"on"` (used, never declined), `"off: <reason>"`, or `"not used"` (never applied)."""
    with _RECORD.lock:
        out = {}
        for name in DESCRIPTIONS:
            if name in _RECORD.declined:
                out[name] = f"off: {_RECORD.declined[name]}"
            elif _RECORD.used.get(name):
                out[name] = "on"
            else:
                out[name] = "not used"
        return out


def combine(*statuses: dict[str, str]) -> dict[str, str]:
    """One status from several parts of a run (e.g. a measurement before a `Trainer`, which resets
    the record): the first "off" of each path, else "on" if any part used it."""
    out = {}
    for name in DESCRIPTIONS:
        values = [s.get(name, "not used") for s in statuses]
        out[name] = next((v for v in values if v.startswith("off")), "on" if "on" in values else "not used")
    return out


def summary_line(status_by_name: dict[str, str]) -> str:
    """`shared_prefix_scoring on, ..., decode_phases off: <reason>` for logs and reports."""
    return ", ".join(f"{name} {value}" for name, value in status_by_name.items())


def step_flags() -> dict[str, float]:
    """`{"fast_path/<name>": 1.0 | 0.0}` for the paths that applied since the last call (0 if any
    use was declined), and start a new window. Paths that did not apply are left out."""
    with _RECORD.lock:
        flags = {f"fast_path/{n}": 0.0 if n in _RECORD.window_declined else 1.0 for n in _RECORD.window_used}
        flags.update({f"fast_path/{n}": 0.0 for n in _RECORD.window_declined})
        _RECORD.window_used, _RECORD.window_declined = set(), set()
        return dict(sorted(flags.items()))
