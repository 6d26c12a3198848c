"""`RewardBatch`: the scores of one batch and what went wrong, as every reward returns them (the
math verifier included); its own module so that `tasks.math` and `tasks.rewards` share it."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RewardBatch"]


@dataclass
class RewardBatch:
    """Scores of one batch plus how many items fell back to 0 and why."""

    scores: list[float]
    """One score per completion, in input order."""
    num_errors: int = 0
    """Calls that raised (or whose worker died)."""
    num_timeouts: int = 0
    """Calls that overran the time limit."""
    num_invalid: int = 0
    """Calls that returned something other than a finite number."""
    first_failure: str | None = None
    """One line describing the first failed call (its exception, timeout or bad return), if any."""
    num_invalid_format: int = 0
    """Responses without a parseable answer, given the reward's documented invalid-format score.
    They were scored, so they are not failures (not in `num_failed`)."""

    @property
    def num_failed(self) -> int:
        """Calls that gave no score: errors, timeouts and invalid returns."""
        return self.num_errors + self.num_timeouts + self.num_invalid
