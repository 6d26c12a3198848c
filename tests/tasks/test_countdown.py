"""Tests for forkrl.tasks.countdown: the verifier's rules, the seeded generator and its disjoint
splits, and the noisy solver's traces (format, exact arithmetic, choice labels)."""

from __future__ import annotations

import random
import re
from collections import Counter
from fractions import Fraction

import pytest

from forkrl.models.tiny import build_tiny_tokenizer
from forkrl.tasks.countdown import (
    CountdownProblem,
    SolverSettings,
    countdown_vocab,
    format_question,
    generate_problems,
    noisy_solver_trace,
    parse_question,
    problem_split,
    problems_to_examples,
    score_countdown,
    solution_expression,
    trace_stats,
    trace_token_choice_mask,
    write_problems_jsonl,
)
from forkrl.tasks.data import PROMPT_TEMPLATES, PromptExample, load_prompts
from forkrl.tasks.rewards import REWARD_FUNCTIONS, load_reward_fn


def _example(numbers, target, with_metadata=True) -> PromptExample:
    question = format_question(numbers, target)
    meta = {"numbers": list(numbers), "target": target} if with_metadata else {}
    return PromptExample(prompt=question + "\n", question=question, answer=str(target), index=0, metadata=meta)


# ---------------------------------------------------------------------------- verifier

EX = _example((3, 5, 7), 22)  # 5*3+7 = 22 is a solution


class TestScoreCountdown:
    @pytest.mark.parametrize(
        "completion",
        [
            "answer: (5*3)+7",  # the solver's fully parenthesised form
            "answer: 5*3+7",  # precedence: 15 + 7
            "answer: 7 + 3 * 5",  # spaces and any order of the numbers
            "5*3=15 [7 15]\n15+7=22 vs 22 yes\nanswer: (5*3)+7",  # a whole trace
            "answer: (5*3)+7\nback\n7+",  # only the answer line counts
            "answer: 3+5+7\nanswer: (5*3)+7",  # the last answer counts
            "answer:5*3+7   ",  # no space after the colon, trailing spaces
        ],
    )
    def test_correct_expressions_score_one(self, completion):
        assert score_countdown(completion, EX) == 1.0

    @pytest.mark.parametrize(
        "completion",
        [
            "answer: 5*7-3",  # 32 != 22
            "answer: (5*3)+7\nanswer: 3+5+7",  # last answer is 15
            "answer: 3+5+7",  # 15
            "answer: 7/5*3",  # 21/5, exact: not rounded to an integer
        ],
    )
    def test_wrong_values_score_zero(self, completion):
        assert score_countdown(completion, EX) == 0.0

    @pytest.mark.parametrize(
        "completion",
        [
            "answer: 7+7+5+3",  # = 22 but 7 used twice
            "answer: 5*3+7+3-3",  # = 22 but 3 used three times
            "answer: 15+7",  # = 22 but 15 is not a given number (3 and 5 missing)
            "answer: 22",  # the target itself
        ],
    )
    def test_reused_or_foreign_numbers_score_zero(self, completion):
        assert score_countdown(completion, EX) == 0.0

    def test_every_number_must_be_used(self):
        # 20 + 2 = 22 hits the target but leaves the 4 unused: the rule is "each number exactly once".
        ex = _example((2, 4, 20), 22)
        assert score_countdown("answer: 20+2", ex) == 0.0
        assert score_countdown("answer: 20+4/2", ex) == 1.0

    def test_division_by_zero_scores_zero(self):
        ex = _example((3, 3, 7), 7)
        assert score_countdown("answer: 7/(3-3)", ex) == 0.0
        assert score_countdown("answer: 7+3-3", ex) == 1.0

    def test_exact_fractions_and_negatives_are_allowed(self):
        # 6 / (1 - 3/4) = 6 / (1/4) = 24 exactly; float arithmetic could miss it, Fraction does not.
        assert score_countdown("answer: 6/(1-3/4)", _example((1, 3, 4, 6), 24)) == 1.0
        # 7 - (3 - 5) = 9 via the intermediate -2; unary minus: -3 + 5 + 7 = 9.
        assert score_countdown("answer: 7-(3-5)", _example((3, 5, 7), 9)) == 1.0
        assert score_countdown("answer: -3+5+7", _example((3, 5, 7), 9)) == 1.0

    @pytest.mark.parametrize(
        "completion",
        [
            "",
            "no answer here",
            "answer:",
            "answer:   ",
            "answer: (5*3+7",  # unbalanced
            "answer: 5 3 7",  # no operators
            "answer: 5*3+7=22",  # '=' is not in the answer alphabet
            "answer: (5)(3)+7",  # a call
            "answer: 5**3+7",  # power: rejected by the walker
            "answer: 15//3+7",  # floor division
            "answer: 5.0*3+7",  # decimals
            "answer: 5*3+7_0",  # underscores in literals
            "answer: __import__('os').system('x')",
            "answer: 0x5*3+7",
            "answer: 05*3+7",  # leading zero: a SyntaxError in Python 3
            "answer: 5*3+7;",
            "answer: [5*3+7]",
        ],
    )
    def test_malformed_text_scores_zero(self, completion):
        assert score_countdown(completion, EX) == 0.0

    @pytest.mark.parametrize(
        "completion",
        [
            "answer: 99999999999999999999999999+5*3+7",  # a 26-digit literal
            "answer: " + "9" * 5000,  # over Python's int-parsing digit limit and our length limit
            "answer: " + "+".join(["7"] * 150),  # over 200 characters
            "answer: " + "(" * 500 + "5*3+7" + ")" * 500,  # deep nesting, over the length limit
        ],
    )
    def test_huge_inputs_score_zero(self, completion):
        assert score_countdown(completion, EX) == 0.0

    def test_nesting_within_the_length_limit_is_fine(self):
        # 90 redundant parentheses: 5 + 180 + 2 = 187 characters, parses and scores as usual.
        assert score_countdown("answer: " + "(" * 90 + "5*3" + ")" * 90 + "+7", EX) == 1.0

    def test_problem_is_read_from_the_question_without_metadata(self):
        ex = _example((3, 5, 7), 22, with_metadata=False)
        assert score_countdown("answer: 5*3+7", ex) == 1.0
        assert score_countdown("answer: 5*7-3", ex) == 0.0

    def test_never_raises(self):
        bad_meta = PromptExample("p", "q", "1", 0, metadata={"numbers": "abc", "target": 3})
        no_problem = PromptExample("p", "what is 2+2?", "4", 0)
        assert score_countdown("answer: 1+2", bad_meta) == 0.0
        assert score_countdown("answer: 1+2", no_problem) == 0.0
        assert score_countdown(None, EX) == 0.0  # type: ignore[arg-type]

    def test_registered_as_reward_and_template(self):
        assert REWARD_FUNCTIONS["countdown"] is score_countdown
        assert load_reward_fn("countdown") is score_countdown
        assert PROMPT_TEMPLATES["countdown"] == "{question}\n"


# ---------------------------------------------------------------------------- generator


def test_question_round_trips():
    p = CountdownProblem((3, 5, 7), 22)
    assert p.question == "numbers: 3 5 7 target: 22"
    assert parse_question(p.question) == p
    assert parse_question("hello") is None


def test_generator_is_deterministic():
    a = generate_problems(50, seed=3)
    assert a == generate_problems(50, seed=3)
    assert a != generate_problems(50, seed=4)
    assert generate_problems(20, seed=3, split="test") == generate_problems(20, seed=3, split="test")


def test_splits_are_disjoint_by_construction():
    train = generate_problems(3000, seed=0, split="train", unique=False)
    test = generate_problems(300, seed=0, split="test")
    assert all(problem_split(p) == "train" for p in train)
    assert all(problem_split(p) == "test" for p in test)
    assert not {p.canonical for p in train} & {p.canonical for p in test}
    # The split depends on the problem only, not on the order its numbers are shown in.
    p = test[0]
    assert problem_split(CountdownProblem(tuple(reversed(p.numbers)), p.target)) == "test"


@pytest.mark.parametrize("num_numbers", [3, 4, (3, 4)])
def test_problems_are_solvable_and_in_range(num_numbers):
    problems = generate_problems(40, seed=1, num_numbers=num_numbers)
    assert len({p.canonical for p in problems}) == 40  # unique by default
    counts = {num_numbers} if isinstance(num_numbers, int) else set(num_numbers)
    for p in problems:
        assert len(p.numbers) in counts
        assert all(1 <= n <= 15 for n in p.numbers) and 1 <= p.target <= 100
        expr = solution_expression(p)
        assert expr is not None
        assert score_countdown(f"answer: {expr}", problems_to_examples([p])[0]) == 1.0


def test_impossible_unique_request_raises():
    # Two numbers from 1..2 allow only a handful of problems.
    with pytest.raises(ValueError, match="distinct"):
        generate_problems(100, seed=0, num_numbers=2, max_number=2)


def test_examples_and_jsonl_load_back(tmp_path):
    problems = generate_problems(5, seed=0, split="test")
    path = write_problems_jsonl(tmp_path / "test.jsonl", problems)
    loaded = load_prompts(path, template="countdown")
    direct = problems_to_examples(problems)
    assert [e.prompt for e in loaded] == [e.prompt for e in direct] == [p.question + "\n" for p in problems]
    for ex, p in zip(loaded, problems):
        assert score_countdown(f"answer: {solution_expression(p)}", ex) == 1.0


# ---------------------------------------------------------------------------- solver traces

_STEP = re.compile(r"(\d+)([+\-*/])(\d+)=(\d+) (?:\[([\d ]+)\]|vs (\d+) (yes|no))")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}


def _replay(problem: CountdownProblem, text: str) -> tuple[bool, int]:
    """Check a trace line by line against the rules; returns (said yes, number of checked attempts)."""
    lines = text.split("\n")
    stack = [list(problem.numbers)]  # the numbers at each level of the current branch
    said_yes, leaves = False, 0
    for line in lines[:-1]:
        assert not said_yes, "nothing but the answer may follow 'yes'"
        if line == "back":
            stack.pop()
            assert stack, "'back' from the top level"
            continue
        m = _STEP.fullmatch(line)
        assert m, f"malformed line {line!r}"
        a, op, b, result = int(m[1]), m[2], int(m[3]), int(m[4])
        value = _OPS[op](Fraction(a), Fraction(b))
        assert a >= b and value == result > 0, line  # larger first, exact positive integer
        rest = list(stack[-1])
        rest.remove(a)
        rest.remove(b)
        rest.append(result)
        if m[5] is not None:  # a step: the remaining numbers, then one level down
            assert [int(x) for x in m[5].split()] == rest
            stack.append(rest)
        else:  # the last two numbers: checked against the target
            assert len(rest) == 1 and int(m[6]) == problem.target
            assert (m[7] == "yes") == (result == problem.target)
            said_yes, leaves = m[7] == "yes", leaves + 1
    assert lines[-1].startswith("answer: ")
    return said_yes, leaves


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer(countdown_vocab())


@pytest.mark.parametrize("num_numbers", [3, 4])
def test_traces_follow_the_format_and_answer_correctly_iff_solved(num_numbers):
    problems = generate_problems(150, seed=2, num_numbers=num_numbers, unique=False)
    rng = random.Random(0)
    settings = SolverSettings(max_leaves=5)
    outcomes = Counter()
    for p in problems:
        trace = noisy_solver_trace(p, rng, settings)
        said_yes, leaves = _replay(p, trace.text)
        example = problems_to_examples([p])[0]
        assert said_yes == trace.success == (score_countdown(trace.text, example) == 1.0)
        assert leaves == trace.num_leaves <= settings.max_leaves
        assert trace.text.endswith("answer: " + trace.answer)
        if not trace.success:  # it gives up when out of attempts, or out of moves at the top
            assert trace.num_leaves == settings.max_leaves or trace.text.endswith(f"back\nanswer: {trace.answer}")
        outcomes[trace.success] += 1
    assert outcomes[True] and outcomes[False]  # both kinds of trace occur


def test_solver_is_seeded():
    p = CountdownProblem((3, 5, 7), 22)
    texts = [noisy_solver_trace(p, random.Random(s)).text for s in (0, 0, 1, 2, 3)]
    assert texts[0] == texts[1] and len(set(texts)) > 2


def test_solver_knobs():
    problems = generate_problems(100, seed=5, unique=False)
    rng = random.Random(0)
    oracle = [noisy_solver_trace(p, rng, SolverSettings(p_good=1.0)) for p in problems]
    # Always picking a move that keeps the problem solvable reaches the target at the first attempt.
    assert all(t.success and t.num_leaves == 1 for t in oracle)
    one_shot = [noisy_solver_trace(p, rng, SolverSettings(max_leaves=1, p_good=0.0)) for p in problems]
    assert all(t.num_leaves == 1 and "back" not in t.text for t in one_shot)
    assert sum(t.success for t in one_shot) < 50


def test_golden_trace_and_its_options():
    # Seeded, uniform choices (p_good=0), 5 attempts: three failed branches, then it gives up.
    trace = noisy_solver_trace(CountdownProblem((3, 5, 7), 22), random.Random(5), SolverSettings(5, p_good=0.0))
    assert trace.text == (
        "7*3=21 [5 21]\n21*5=105 vs 22 no\nback\n"
        "7*5=35 [3 35]\n35+3=38 vs 22 no\nback\n"
        "5+3=8 [7 8]\n8+7=15 vs 22 no\n8-7=1 vs 22 no\n8*7=56 vs 22 no\n"
        "answer: (5+3)*7"
    )
    assert not trace.success and trace.num_leaves == 5 and trace.answer == "(5+3)*7"
    # Options by hand. From 3 5 7 the moves (larger operand first, positive integer results) are
    # 5+3 5-3 5*3 | 7+3 7-3 7*3 | 7+5 7-5 7*5: the line may open with 5 or 7 (2), after 7 come
    # + - * (3), after 7* comes 3 or 5 (2). From [5 21] only 21 can open and only 5 can follow (1),
    # with + - * (21/5 is not an integer). After a failed check below the top the line opens with
    # the same larger number or "back" (2). On the second visit to the top, 7*3 is gone: 7* can
    # only take 5 (1). From [7 8], after 8+7 and 8-7 failed, only * is left (1). Giving up after
    # the fifth failed attempt is forced (1).
    choices = [(text, n) for text, n in trace.segments if n > 1]
    assert choices == [
        ("7", 2), ("*", 3), ("3", 2), ("*", 3), ("back", 2),
        ("7", 2), ("*", 3), ("+", 3), ("back", 2),
        ("5", 2), ("+", 3), ("+", 3), ("8", 2), ("-", 2), ("8", 2),
    ]  # fmt: skip
    assert ("answer:", 1) in trace.segments and ("8", 1) in trace.segments  # 8* then 7: forced


def test_choice_mask_aligns_with_tokens(tokenizer):
    problems = generate_problems(30, seed=4, num_numbers=(3, 4))
    rng = random.Random(0)
    for p in problems:
        trace = noisy_solver_trace(p, rng)
        ids, mask = trace_token_choice_mask(trace, tokenizer)
        # Pieces are whole tokens: piecewise tokenization equals tokenizing the text at once.
        assert ids == tokenizer(trace.text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == trace.text
        tokens = tokenizer.convert_ids_to_tokens(ids)
        assert "<|unk|>" not in tokens and tokens.count("answer:") == 1  # keywords are single tokens
        chosen = {t for t, c in zip(tokens, mask) if c}
        assert chosen <= {"back", "+", "-", "*", "/"} | {str(v) for v in range(201)}
        assert sum(mask) == sum(n > 1 for _, n in trace.segments)  # every choice is one token


def test_trace_stats(tokenizer):
    problems = generate_problems(200, seed=0, unique=False)
    rng = random.Random(0)
    traces = [noisy_solver_trace(p, rng) for p in problems]
    stats = trace_stats(traces, tokenizer)
    assert stats.num_traces == 200
    assert stats.success_rate == sum(t.success for t in traces) / 200
    # About one response token in eight is a fork of the solver (measured 0.13 at defaults).
    assert 0.1 < stats.choice_fraction < 0.17
