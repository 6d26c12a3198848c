"""Reward functions for trainer tests: cheap, deterministic, and varied under a random tiny model."""


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
