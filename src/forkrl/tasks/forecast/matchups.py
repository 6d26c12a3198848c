"""The forecasting toy task: synthetic match-ups whose true win probability is known exactly.

A match-up is two team ratings and a home flag; the question asks for the probability that the
first team wins, and the response is a short trace, then the forecast::

    rating 52 vs 47 home yes        <- the question (prompt)
    diff 5                          <- rating difference (determined by the prompt)
    home 4                          <- home advantage in rating points (HOME_ADVANTAGE, or 0)
    edge 9                          <- their sum
    p=0.93                          <- the forecast

The truth is a fixed logistic model: P(first team wins) = σ(edge / POINTS_PER_LOGIT), and a row's
outcome is drawn from it. So calibration can be measured against outcomes, as with real games,
and also against the true probabilities (the "market" this toy knows exactly).

`forecast_trace` writes the traces the toy base model is built from: deliberately over-confident,
``p = σ(confidence · edge / POINTS_PER_LOGIT + noise)``, noise ~ N(0, noise²) in logit units, rounded
to two decimals within [0.01, 0.99]. With the default confidence 2 the traces say 0.93 where the
truth is 0.78 (the example above); the noise gives each prompt a spread of forecasts for RL to choose among.

Splits: a match-up's split is decided by a hash of (rating, opponent, home), 20% test, so a
held-out match-up never appears in training. Everything is drawn from seeded `random.Random`
streams: the same seed gives the same rows, outcomes and traces on any machine.

Importing this module registers the prompt template ``"forecast"`` (the question, then a newline).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from forkrl.tasks.data import PROMPT_TEMPLATES, PromptExample, render_prompt

__all__ = [
    "FORECAST_TEMPLATE",
    "HOME_ADVANTAGE",
    "POINTS_PER_LOGIT",
    "ForecastRow",
    "MatchUp",
    "TraceSettings",
    "forecast_trace",
    "forecast_vocab",
    "generate_rows",
    "matchup_split",
    "rows_to_examples",
    "trace_is_correct",
    "write_rows_jsonl",
]

FORECAST_TEMPLATE = "{question}\n"
"""The toy prompt: the question on one line; the trace starts on the next."""
PROMPT_TEMPLATES.setdefault("forecast", FORECAST_TEMPLATE)

MIN_RATING, MAX_RATING = 40, 60
"""Ratings are drawn uniformly from this range (inclusive)."""
HOME_ADVANTAGE = 4
"""Rating points added to the first team's edge when it plays at home."""
POINTS_PER_LOGIT = 7.0
"""Rating points per unit of log-odds: the true probability is σ(edge / POINTS_PER_LOGIT)."""
TEST_PERCENT = 20
"""Share of match-ups (by hash) in the test split."""

KEYWORDS = ("rating", "vs", "home", "yes", "no", "diff", "edge", "p=")
SYMBOLS = (" ", "\n", "-")


def forecast_vocab() -> list[str]:
    """Token strings of the toy tokenizer: keywords, symbols, the integers 0..100 and every
    two-decimal probability 0.00..1.00 (one token each, so a forecast is one sampled token)."""
    return [*KEYWORDS, *SYMBOLS, *(str(v) for v in range(101)), *(f"{v / 100:.2f}" for v in range(101))]


@dataclass(frozen=True)
class MatchUp:
    """The first team (`rating`) against the second (`opponent`); `home`: the first plays at home."""

    rating: int
    opponent: int
    home: bool

    @property
    def edge(self) -> int:
        """Rating difference plus the home advantage, in rating points."""
        return self.rating - self.opponent + (HOME_ADVANTAGE if self.home else 0)

    @property
    def true_probability(self) -> float:
        """P(the first team wins) = σ(edge / POINTS_PER_LOGIT)."""
        return 1.0 / (1.0 + math.exp(-self.edge / POINTS_PER_LOGIT))

    @property
    def question(self) -> str:
        return f"rating {self.rating} vs {self.opponent} home {'yes' if self.home else 'no'}"


def matchup_split(m: MatchUp) -> str:
    """``"test"`` for TEST_PERCENT % of match-ups, chosen by a hash; else ``"train"``."""
    digest = hashlib.blake2b(f"{m.rating},{m.opponent},{int(m.home)}".encode(), digest_size=8).digest()
    return "test" if int.from_bytes(digest, "big") % 100 < TEST_PERCENT else "train"


@dataclass(frozen=True)
class ForecastRow:
    """One game: a match-up and its drawn outcome (1: the first team won)."""

    matchup: MatchUp
    outcome: int


def generate_rows(n: int, seed: int, split: str = "train") -> list[ForecastRow]:
    """`n` games of `split`, i.i.d. (match-ups may repeat, each game with its own outcome).

    Per game, from one stream seeded by (seed, split): the two ratings uniform on
    [MIN_RATING, MAX_RATING], the home flag a fair coin (match-ups of the other split are drawn
    again), then the outcome 1 with the true probability. Same arguments, same rows.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    # A string seed is hashed with SHA-512 by `random.Random`: stable across runs and platforms.
    rng = random.Random(f"forecast:{seed}:{split}")
    rows = []
    while len(rows) < n:
        m = MatchUp(rng.randint(MIN_RATING, MAX_RATING), rng.randint(MIN_RATING, MAX_RATING), rng.random() < 0.5)
        if matchup_split(m) != split:
            continue
        rows.append(ForecastRow(m, int(rng.random() < m.true_probability)))
    return rows


@dataclass
class TraceSettings:
    """How the toy's training traces are miscalibrated."""

    confidence: float = 2.0
    """Multiplies the true log-odds: > 1 is over-confident (forecasts too close to 0 and 1)."""
    noise: float = 0.5
    """Standard deviation of the Gaussian noise added to the log-odds, per trace."""


def _signed(v: int) -> str:
    return str(v) if v >= 0 else f"-{-v}"


def forecast_trace(m: MatchUp, rng: random.Random, settings: TraceSettings | None = None) -> tuple[str, float]:
    """(response text, written forecast) of one miscalibrated trace for `m` (module docstring)."""
    settings = settings or TraceSettings()
    logit = settings.confidence * m.edge / POINTS_PER_LOGIT + rng.gauss(0.0, settings.noise)
    p = min(max(round(1.0 / (1.0 + math.exp(-logit)), 2), 0.01), 0.99)
    home = HOME_ADVANTAGE if m.home else 0
    text = f"diff {_signed(m.rating - m.opponent)}\nhome {home}\nedge {_signed(m.edge)}\np={p:.2f}"
    return text, p


def trace_is_correct(text: str, m: MatchUp) -> bool:
    """Whether the trace's three lines state `m`'s true difference, home advantage and edge (the
    forecast itself is not judged): how a demo sees a policy bend its reasoning to move its forecast."""
    home = HOME_ADVANTAGE if m.home else 0
    expected = f"diff {_signed(m.rating - m.opponent)}\nhome {home}\nedge {_signed(m.edge)}\n"
    return text.startswith(expected)


def rows_to_examples(rows: Sequence[ForecastRow], template: str = "forecast") -> list[PromptExample]:
    """`PromptExample`s: answer = the outcome ("0"/"1"), metadata = the row as `write_rows_jsonl` writes it."""
    return [
        PromptExample(
            prompt=render_prompt(r.matchup.question, template),
            question=r.matchup.question,
            answer=str(r.outcome),
            index=i,
            metadata=_row_dict(r),
        )
        for i, r in enumerate(rows)
    ]


def _row_dict(r: ForecastRow) -> dict:
    m = r.matchup
    return {
        "question": m.question,
        "outcome": r.outcome,
        "true_p": m.true_probability,
        "rating": m.rating,
        "opponent": m.opponent,
        "home": m.home,
    }


def write_rows_jsonl(path: str | os.PathLike, rows: Sequence[ForecastRow]) -> Path:
    """One JSON row per game: ``question``, ``outcome`` (0/1), ``true_p``, ``rating``, ``opponent``,
    ``home``; train with ``data.answer_key=outcome``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(_row_dict(r)) + "\n")
    return path
