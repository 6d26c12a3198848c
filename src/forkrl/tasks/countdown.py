"""The Countdown toy task: reach a target from a few numbers with + − × ÷, verified exactly.

A problem is a handful of small numbers and a target, e.g. ``numbers: 3 5 7 target: 22``. The
response is a short search trace followed by ``answer: <expression>``::

    numbers: 3 5 7 target: 22        <- the question (prompt)
    7+5=12 [3 12]                    <- combine two numbers; the remaining numbers in brackets
    12*3=36 vs 22 no                 <- last two numbers combined: compared with the target
    12-3=9 vs 22 no
    back                             <- give up this branch, return to the numbers before it
    5*3=15 [7 15]
    15+7=22 vs 22 yes
    answer: (5*3)+7

Each step line is a *choice* (which pair, which operation) followed by *determined* work (the
result, the remaining numbers, the check). The check restates the target next to the result, as
Stream-of-Search traces do, so that a tiny model compares two neighbouring tokens instead of
looking back to the prompt. So the trace has real forks between stretches of determined text.
`CountdownTrace.segments` records, for every piece of text, how many different tokens the solver
could have written there: more than one at the first operand, the operation and the second operand
when the untried moves allow several, and at the token opening a line after a failed check
(another move from the same numbers, or ``back``); exactly one everywhere else, e.g. both operands
of a line combining the last two numbers (larger first), and ``answer:`` (written after a success or
once the attempt budget is spent, both functions of the text so far).

Rules (one rule for everything here):
- **Every given number is used exactly once** (as a multiset; the rule of the TinyZero Countdown
  task used in RLVR work, and the one that makes the search depth fixed). A correct expression
  that leaves a number out scores 0.
- The verifier (`score_countdown`) accepts any expression of ``+ - * /``, parentheses and unary
  minus over the given numbers whose exact rational value (`fractions.Fraction`) equals the
  target; intermediate fractions and negatives are allowed.
- The solver and the generator are stricter, as in classic Countdown: every intermediate result is
  a positive integer no larger than `max_value` (``a-b`` only when ``a > b``, ``a/b`` only when
  ``b`` divides ``a``), and each step writes the larger operand first. Problems are solvable under
  these strict rules, hence under the verifier's.

Splits: a problem's split is decided by a hash of its canonical form (sorted numbers and target),
so a problem is in the train split or in the test split, never both, whatever the seed.

Importing this module registers the reward ``"countdown"`` (`register_reward`) and the prompt
template ``"countdown"`` (`PROMPT_TEMPLATES`, the question followed by a newline).
"""

from __future__ import annotations

import ast
import hashlib
import json
import operator
import os
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

from forkrl.tasks.data import PROMPT_TEMPLATES, PromptExample, render_prompt
from forkrl.tasks.rewards import register_reward

__all__ = [
    "COUNTDOWN_TEMPLATE",
    "DEFAULT_MAX_VALUE",
    "CountdownProblem",
    "CountdownTrace",
    "SolverSettings",
    "countdown_vocab",
    "format_question",
    "generate_problems",
    "noisy_solver_trace",
    "parse_question",
    "problem_split",
    "problems_to_examples",
    "score_countdown",
    "solution_expression",
    "TraceStats",
    "trace_stats",
    "trace_token_choice_mask",
    "write_problems_jsonl",
]

COUNTDOWN_TEMPLATE = "{question}\n"
"""The toy prompt: the question on one line; the trace starts on the next."""
PROMPT_TEMPLATES.setdefault("countdown", COUNTDOWN_TEMPLATE)

DEFAULT_MAX_VALUE = 200
"""Largest intermediate result the solver and generator allow (and the largest number token)."""

TEST_PERCENT = 10
"""Share of all problems (by canonical hash) that belong to the test split."""

KEYWORDS = ("numbers:", "target:", "answer:", "yes", "no", "back", "vs")
SYMBOLS = (" ", "\n", "+", "-", "*", "/", "(", ")", "=", "[", "]")


def countdown_vocab(max_value: int = DEFAULT_MAX_VALUE) -> list[str]:
    """Token strings of the toy tokenizer: keywords, symbols and every integer 0..max_value.

    With longest-first matching (`build_tiny_tokenizer`) each keyword and each number up to
    `max_value` is one token, so a choice of operand is one token and the arithmetic is a lookup.
    """
    return [*KEYWORDS, *SYMBOLS, *(str(v) for v in range(max_value + 1))]


# ---------------------------------------------------------------------------- problems


@dataclass(frozen=True)
class CountdownProblem:
    """Reach `target` using each of `numbers` exactly once with + − × ÷."""

    numbers: tuple[int, ...]
    """The given numbers, in prompt order."""
    target: int

    @property
    def question(self) -> str:
        return format_question(self.numbers, self.target)

    @property
    def canonical(self) -> str:
        """Order-free identity: ``"3,5,7->22"`` (sorted numbers)."""
        return ",".join(map(str, sorted(self.numbers))) + f"->{self.target}"


def format_question(numbers: Sequence[int], target: int) -> str:
    return "numbers: " + " ".join(map(str, numbers)) + f" target: {target}"


_QUESTION_RE = re.compile(r"numbers:((?:\s+\d{1,6})+)\s+target:\s*(\d{1,6})")


def parse_question(question: str) -> CountdownProblem | None:
    """The problem stated in `question` (``numbers: 3 5 7 target: 22``); None if there is none."""
    m = _QUESTION_RE.search(question)
    if m is None:
        return None
    return CountdownProblem(tuple(int(x) for x in m.group(1).split()), int(m.group(2)))


def problem_split(problem: CountdownProblem) -> str:
    """``"test"`` for TEST_PERCENT % of problems, chosen by a hash of the canonical form; else ``"train"``."""
    digest = hashlib.blake2b(problem.canonical.encode(), digest_size=8).digest()
    return "test" if int.from_bytes(digest, "big") % 100 < TEST_PERCENT else "train"


class _Move(NamedTuple):
    """Combine positions i and j of the current numbers: ``a op b = result`` with ``a >= b``."""

    i: int
    j: int
    op: str
    a: int
    b: int
    result: int


def _moves(values: tuple[int, ...], max_value: int) -> list[_Move]:
    """Strict-rule moves from `values`; moves with the same text ``a op b`` (equal values) are listed once."""
    out, seen = [], set()
    for i in range(len(values)):
        for j in range(len(values)):
            if i == j or values[i] < values[j] or (values[i] == values[j] and i > j):
                continue
            a, b = values[i], values[j]
            for op, result in (("+", a + b), ("-", a - b), ("*", a * b), ("/", a // b if a % b == 0 else 0)):
                if 0 < result <= max_value and (a, op, b) not in seen:
                    seen.add((a, op, b))
                    out.append(_Move(i, j, op, a, b, result))
    return out


def _apply(values: tuple, i: int, j: int, result) -> tuple:
    """The numbers after combining positions i and j: the others in order, then the result."""
    return tuple(v for k, v in enumerate(values) if k not in (i, j)) + (result,)


@lru_cache(maxsize=200_000)
def _reachable(sorted_values: tuple[int, ...], max_value: int) -> frozenset[int]:
    """All values reachable from `sorted_values` using every number once, under the strict rules."""
    if len(sorted_values) == 1:
        return frozenset(sorted_values)
    out: set[int] = set()
    for m in _moves(sorted_values, max_value):
        out |= _reachable(tuple(sorted(_apply(sorted_values, m.i, m.j, m.result))), max_value)
    return frozenset(out)


def _solvable(values: Sequence[int], target: int, max_value: int) -> bool:
    return target in _reachable(tuple(sorted(values)), max_value)


def generate_problems(
    n: int,
    seed: int,
    split: str = "train",
    num_numbers: int | Sequence[int] = 3,
    max_number: int = 15,
    max_target: int = 100,
    max_value: int = DEFAULT_MAX_VALUE,
    unique: bool = True,
) -> list[CountdownProblem]:
    """`n` solvable problems of `split`, the same for the same arguments.

    Each problem draws its count of numbers from `num_numbers`, the numbers uniformly from
    1..max_number, and then the target uniformly among the values in 1..max_target reachable
    under the strict rules. Problems of the other split are skipped (see `problem_split`), so the
    train and test lists never share a problem. `unique=False` allows repeats (i.i.d. draws, for
    training data); with `unique=True` an impossible request raises ValueError.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    counts = [num_numbers] if isinstance(num_numbers, int) else list(num_numbers)
    if not counts or min(counts) < 2:
        raise ValueError(f"num_numbers must be >= 2, got {num_numbers}")
    # A string seed is hashed with SHA-512 by `random.Random`: stable across runs and platforms.
    rng = random.Random(f"countdown:{seed}:{split}")
    problems, seen = [], set()
    attempts, max_attempts = 0, 200 * n + 10_000
    while len(problems) < n:
        attempts += 1
        if attempts > max_attempts:
            raise ValueError(f"could not draw {n} distinct {split} problems (found {len(problems)})")
        numbers = tuple(rng.randint(1, max_number) for _ in range(rng.choice(counts)))
        targets = sorted(t for t in _reachable(tuple(sorted(numbers)), max_value) if t <= max_target)
        if not targets:
            continue
        problem = CountdownProblem(numbers, rng.choice(targets))
        if problem_split(problem) != split or (unique and problem.canonical in seen):
            continue
        seen.add(problem.canonical)
        problems.append(problem)
    return problems


def solution_expression(problem: CountdownProblem, max_value: int = DEFAULT_MAX_VALUE) -> str | None:
    """One strict-rule solution as text (first found by a fixed-order search); None if unsolvable."""

    def search(items: tuple[tuple[int, str], ...]) -> str | None:
        values = tuple(v for v, _ in items)
        if len(items) == 1:
            return items[0][1] if values[0] == problem.target else None
        for m in _moves(values, max_value):
            merged = (m.result, f"{_wrap(items[m.i][1])}{m.op}{_wrap(items[m.j][1])}")
            if (found := search(_apply(items, m.i, m.j, merged))) is not None:
                return found
        return None

    return search(tuple((v, str(v)) for v in problem.numbers))


def _wrap(expr: str) -> str:
    return expr if expr.isdigit() else f"({expr})"


def problems_to_examples(problems: Sequence[CountdownProblem], template: str = "countdown") -> list[PromptExample]:
    """`PromptExample`s for the trainer and evaluator: answer = the target, metadata = numbers + target."""
    return [
        PromptExample(
            prompt=render_prompt(p.question, template),
            question=p.question,
            answer=str(p.target),
            index=i,
            metadata={"question": p.question, "answer": str(p.target), "numbers": list(p.numbers), "target": p.target},
        )
        for i, p in enumerate(problems)
    ]


def write_problems_jsonl(path: str | os.PathLike, problems: Sequence[CountdownProblem]) -> Path:
    """One JSON row per problem (``question``, ``answer`` = target, ``numbers``, ``target``), for
    `load_prompts` / `forkrl eval` with ``reward="countdown"``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for p in problems:
            row = {"question": p.question, "answer": str(p.target), "numbers": list(p.numbers), "target": p.target}
            f.write(json.dumps(row) + "\n")
    return path


# ---------------------------------------------------------------------------- verifier

MAX_ANSWER_CHARS = 200
"""Longer answers score 0 without being parsed (also bounds the parser's nesting depth)."""
MAX_LITERAL_DIGITS = 6
"""Integer literals with more digits score 0."""
MAX_MAGNITUDE = 10**18
"""An intermediate numerator or denominator beyond this scores 0 (cannot happen with small inputs)."""

_ANSWER_CHARS = re.compile(r"[0-9+\-*/() ]*")
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


class _Reject(Exception):
    """The answer breaks a rule; it scores 0."""


def score_countdown(completion: str, example: PromptExample) -> float:
    """1.0 if the expression after the last ``answer:`` uses each given number exactly once and its
    exact value is the target; 0.0 otherwise (never raises).

    The problem comes from ``example.metadata`` (``numbers`` and ``target``) when present, else from
    ``example.question``. The answer is the rest of that line. It may contain only digits,
    ``+ - * /``, parentheses and spaces (no ``**``, ``//``, decimals, underscores or names), is
    parsed with `ast` and evaluated over `Fraction` by a walker that knows only those operators
    (never `eval`). Scored 0: no ``answer:``, malformed text, a number used twice or missing or not
    given, division by zero, a literal over MAX_LITERAL_DIGITS digits, an answer over
    MAX_ANSWER_CHARS characters, an intermediate value over MAX_MAGNITUDE, a value off target.
    """
    try:
        problem = _problem_of(example)
        if problem is None:
            return 0.0
        return 1.0 if _answer_is_correct(completion, problem) else 0.0
    except Exception:  # a verifier bug must not end a run; a wrong answer is the safe reading
        return 0.0


def _problem_of(example: PromptExample) -> CountdownProblem | None:
    meta = example.metadata or {}
    if "numbers" in meta and "target" in meta:
        return CountdownProblem(tuple(int(x) for x in meta["numbers"]), int(meta["target"]))
    return parse_question(example.question)


def _answer_is_correct(completion: str, problem: CountdownProblem) -> bool:
    at = completion.rfind("answer:")
    if at < 0:
        return False
    text = completion[at + len("answer:") :].split("\n", 1)[0].strip()
    if not text or len(text) > MAX_ANSWER_CHARS or not _ANSWER_CHARS.fullmatch(text):
        return False
    try:
        tree = ast.parse(text, mode="eval")
        literals: list[int] = []
        value = _evaluate(tree.body, literals)
    except (_Reject, SyntaxError, ValueError, ZeroDivisionError, RecursionError, MemoryError):
        return False
    return Counter(literals) == Counter(problem.numbers) and value == problem.target


def _evaluate(node: ast.AST, literals: list[int]) -> Fraction:
    if isinstance(node, ast.Constant):
        # The character whitelist already excludes floats, complex and strings; bool is an int subclass.
        if type(node.value) is not int or len(str(node.value)) > MAX_LITERAL_DIGITS:
            raise _Reject
        literals.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _evaluate(node.operand, literals)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _evaluate(node.left, literals), _evaluate(node.right, literals)
        value = _BINOPS[type(node.op)](left, right)  # Fraction / Fraction(0) raises ZeroDivisionError
        if abs(value.numerator) > MAX_MAGNITUDE or value.denominator > MAX_MAGNITUDE:
            raise _Reject
        return value
    raise _Reject  # names, calls, **, //, comparisons, ...


register_reward("countdown", score_countdown)


# ---------------------------------------------------------------------------- noisy solver


@dataclass
class SolverSettings:
    """How the noisy solver searches; its success rate sets how good the toy base model is."""

    max_leaves: int = 5
    """Complete attempts (last two numbers combined and checked) before giving up with a wrong answer."""
    p_good: float = 0.3
    """At each choice, probability of picking (uniformly) among the untried moves that keep the
    problem solvable (when there is one); otherwise a uniform pick among all untried moves."""
    p_stay: float = 0.5
    """After a failed attempt below the top level, probability of trying another move from the same
    numbers rather than writing ``back`` (forced ``back`` when none is left)."""
    max_value: int = DEFAULT_MAX_VALUE
    """Largest intermediate result the solver considers."""


@dataclass
class CountdownTrace:
    """One solver response to `problem`, as text pieces with the solver's number of options at each."""

    problem: CountdownProblem
    segments: list[tuple[str, int]]
    """Pieces of the response in order, each a whole number of tokens of the toy tokenizer, with the
    number of distinct tokens the solver could have written there (1: determined by the text before
    it; > 1: a choice, always a single-token piece). The EOS token is not included."""
    success: bool
    """Whether the trace ends with a correct answer."""
    answer: str
    """The final expression."""
    num_leaves: int
    """Complete attempts made."""

    @property
    def text(self) -> str:
        return "".join(text for text, _ in self.segments)


class _Search:
    """Randomised depth-first search that writes its own trace (see `noisy_solver_trace`)."""

    def __init__(self, problem: CountdownProblem, rng: random.Random, settings: SolverSettings):
        self.problem, self.rng, self.settings = problem, rng, settings
        self.segments: list[tuple[str, int]] = []
        self.leaves = 0
        self.last_expr = ""

    def write(self, text: str, options: int = 1) -> None:
        self.segments.append((text, options))

    def node(self, items: tuple[tuple[int, str], ...], top: bool) -> bool | None:
        """Search from `items` ((value, expression) pairs). True: solved; None: budget spent (the
        answer is written); False: this branch was abandoned (``back`` is written)."""
        values = tuple(v for v, _ in items)
        moves = _moves(values, self.settings.max_value)
        tried: set[tuple[int, str, int]] = set()
        while True:
            untried = [m for m in moves if (m.a, m.op, m.b) not in tried]
            can_back = bool(tried) and not top  # after a failure below the top: stay or go back
            # Tokens that may open this line: the larger operand of any untried move, or "back".
            openers = len({m.a for m in untried}) + can_back
            if can_back and (not untried or self.rng.random() >= self.settings.p_stay):
                self.write("back", openers)
                self.write("\n")
                return False
            if not untried:  # the top level is exhausted (branches were left early): give up
                return self.give_up()
            i, j, op, a, b, result = self.pick(values, untried)
            tried.add((a, op, b))
            expr = f"{_wrap(items[i][1])}{op}{_wrap(items[j][1])}"
            self.write(str(a), openers)
            self.write(op, len({m.op for m in untried if m.a == a}))
            self.write(str(b), len({m.b for m in untried if m.a == a and m.op == op}))
            rest = _apply(items, i, j, (result, expr))
            if len(rest) == 1:
                self.leaves += 1
                self.last_expr = expr
                if result == self.problem.target:
                    self.write(f"={result} vs {result} yes\n")
                    self.write("answer:")
                    self.write(f" {expr}")
                    return True
                self.write(f"={result} vs {self.problem.target} no\n")
                if self.leaves >= self.settings.max_leaves:
                    return self.give_up()
            else:
                self.write(f"={result} [" + " ".join(str(v) for v, _ in rest) + "]\n")
                outcome = self.node(rest, top=False)
                if outcome is not False:
                    return outcome

    def pick(self, values: tuple[int, ...], untried: list[_Move]) -> _Move:
        if self.rng.random() < self.settings.p_good:
            target, max_value = self.problem.target, self.settings.max_value
            good = [m for m in untried if _solvable(_apply(values, m.i, m.j, m.result), target, max_value)]
            if good:
                return self.rng.choice(good)
        return self.rng.choice(untried)

    def give_up(self) -> None:
        self.write("answer:")  # forced: the budget is spent, or no move is left at the top
        self.write(f" {self.last_expr}")
        return None


def noisy_solver_trace(
    problem: CountdownProblem, rng: random.Random, settings: SolverSettings | None = None
) -> CountdownTrace:
    """A search trace for `problem` by a solver that guesses, checks and backtracks (module docstring).

    The arithmetic, the remaining numbers and the checks are exact; only the choices are random
    (`SolverSettings`). A move is never repeated from the same numbers on the same branch. The trace
    ends with ``answer: <expression>``: correct when the search found the target, otherwise the last
    attempt (a wrong answer), written after `max_leaves` failed attempts or when every move from the
    given numbers has been tried (possible because branches are left early with ``back``).
    """
    settings = settings or SolverSettings()
    if len(problem.numbers) < 2:
        raise ValueError("a problem needs at least two numbers")
    search = _Search(problem, rng, settings)
    solved = search.node(tuple((v, str(v)) for v in problem.numbers), top=True)
    return CountdownTrace(problem, search.segments, bool(solved), search.last_expr, search.leaves)


def trace_token_choice_mask(trace: CountdownTrace, tokenizer: Any) -> tuple[list[int], list[bool]]:
    """Token ids of `trace.text` (no EOS) and whether each is a choice token (solver options > 1).

    Tokenizes piece by piece, which equals tokenizing the whole text because every piece boundary
    is a token boundary of the toy tokenizer (numbers and keywords never touch another number).
    """
    ids: list[int] = []
    mask: list[bool] = []
    for text, options in trace.segments:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        mask += [options > 1] * len(piece)
    return ids, mask


@dataclass
class TraceStats:
    """Aggregate statistics of a set of traces."""

    num_traces: int = 0
    success_rate: float = 0.0
    mean_leaves: float = 0.0
    mean_tokens: float = 0.0
    """Response tokens per trace, EOS included."""
    choice_fraction: float = 0.0
    """Share of response tokens (EOS included) where the solver had more than one option."""


def trace_stats(traces: Sequence[CountdownTrace], tokenizer: Any) -> TraceStats:
    """Success rate, length and choice-token share of `traces` (tokens of `tokenizer`, +1 EOS each)."""
    if not traces:
        return TraceStats()
    tokens = choices = 0
    for t in traces:
        _, mask = trace_token_choice_mask(t, tokenizer)
        tokens += len(mask) + 1
        choices += sum(mask)
    n = len(traces)
    return TraceStats(
        num_traces=n,
        success_rate=sum(t.success for t in traces) / n,
        mean_leaves=sum(t.num_leaves for t in traces) / n,
        mean_tokens=tokens / n,
        choice_fraction=choices / tokens,
    )
