"""Tests for forkrl.tasks.math: answer extraction and math-verify checks under a hard time limit."""

from __future__ import annotations

import threading

import pytest

from forkrl.tasks.math import MathVerifier, extract_answer, extract_boxed, math_reward


def _finishes_within(seconds: float, fn, *args):
    """Run fn(*args) in a daemon thread; fail the test (instead of hanging it) if it overruns."""
    out: list = []
    thread = threading.Thread(target=lambda: out.append(fn(*args)), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"did not return within {seconds} s"
    return out[0]


@pytest.fixture(scope="module")
def verifier():
    with MathVerifier(num_workers=2) as v:
        yield v


# ---------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so x = \\boxed{\\frac{1}{\\sqrt{2}}}.", "\\frac{1}{\\sqrt{2}}"),  # nested braces
        ("first \\boxed{1}, finally \\boxed{2}", "2"),  # the last box wins
        ("\\fbox{7}", "7"),
        ("\\boxed {8}", "8"),  # space before the brace
        ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),  # escaped braces are not groups
        ("\\boxed{3} then \\boxed{4", None),  # truncated last box: no boxed answer
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Let me think.\nAnswer: 42", "42"),
        ("Answer: 1\nwait, no.\n**Final Answer:** $42$.", "42"),  # last line, decoration stripped
        ("Answer: 5\nso \\boxed{ 6 }", "6"),  # a box beats an answer line; padding stripped
        ("\\boxed{} oops\nanswer: 9", "9"),  # an empty box is no answer
        ("The result is 42", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


# ---------------------------------------------------------------------------- checking


def test_equivalence_and_counters(verifier):
    completions = [
        "... so the probability is \\boxed{\\frac{1}{2}}",  # 1/2 == 0.5
        "... \\boxed{3}",  # 3 != 4
        "Reasoning.\nAnswer: 42",
        "I am not sure.",  # no answer at all
        "\\boxed{2^{10}}",  # gold given as a number (AIME style) -> "1024"
    ]
    result = verifier.score(completions, ["0.5", "4", "42", "1", "1024"], timeout_s=5.0)
    assert result.scores == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert (result.num_invalid_format, result.num_timeouts, result.num_errors) == (1, 0, 0)


def test_pathological_answers_time_out_and_pool_recovers(verifier):
    # 9^(9^(9^9)) has ~10^(3.7e8) digits: sympy would compute it forever; each check is
    # killed after 1 s, scores 0, and the replaced workers go on to score the last item.
    completions = ["\\boxed{9^{9^{9^{9}}}}", "\\boxed{9^{9^{9}}}", "\\boxed{3}"]
    result = _finishes_within(60.0, verifier.score, completions, ["3", "3", "3"], 1.0)
    assert result.scores == [0.0, 0.0, 1.0]
    assert result.num_timeouts == 2


def test_math_reward_module_function():
    assert _finishes_within(60.0, math_reward, "\\boxed{\\frac{1}{2}}", "0.5") == 1.0
    assert math_reward("no answer here", "0.5") == 0.0


def test_mismatched_lengths(verifier):
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        verifier.score(["a", "b"], ["1"])
