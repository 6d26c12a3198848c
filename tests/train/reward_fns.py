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
