"""Reward functions for trainer tests: cheap, deterministic, and varied under a random tiny model."""

from forkrl.tasks.rewards import BatchReward, RewardBatch


def vowel_fraction(completion: str, example) -> float:
    """Share of vowels in the completion: differs between almost any two samples."""
    if not completion:
        return 0.0
    return sum(c in "aeiou" for c in completion) / len(completion)


def always_raises(completion: str, example) -> float:
    raise RuntimeError("broken reward")


def hangs(completion: str, example) -> float:
    import time

    time.sleep(5)  # far past the test's 0.2 s limit; short so the abandoned thread exits soon
    return 1.0


def returns_nan(completion: str, example) -> float:
    return float("nan")


def returns_text(completion: str, example):
    return "1.0"


def constant_one(completion: str, example) -> float:
    """Every response scores the same: no group ever has a learning signal."""
    return 1.0


def stuck_in_c_on_first_prompt(completion: str, example) -> float:
    """Catastrophic backtracking in the C regex engine (GIL held, no Python frame to interrupt)
    for the prompt at index 0; the vowel fraction elsewhere."""
    import re

    if example.index == 0:
        re.match(r"(a+)+$", "a" * 40 + "b")  # ~2^40 steps: hours
    return vowel_fraction(completion, example)


def slow_vowel_fraction(completion: str, example) -> float:
    """`vowel_fraction` after 50 ms: makes a step last long enough to signal it midway."""
    import time

    time.sleep(0.05)
    return vowel_fraction(completion, example)


class EveryNthInvalid(BatchReward):
    """A batch reward with an option (`reward.function=tests.train.reward_fns:EveryNthInvalid`,
    `reward.kwargs.every=N`): the responses at batch positions 0, N, 2N, ... have an invalid format
    (score 0, counted in `num_invalid_format`); the others score their vowel fraction."""

    name = "every_nth_invalid"

    def __init__(self, every: int = 2):
        self.every = every

    def score_all(self, completions, examples):
        invalid = [i % self.every == 0 for i in range(len(completions))]
        scores = [0.0 if bad else vowel_fraction(text, None) for bad, text in zip(invalid, completions)]
        return RewardBatch(scores, num_invalid_format=sum(invalid))
