"""Forecast rewards: a probability parsed from the response, scored against the row's 0/1 outcome.

Parsing (`parse_forecast`, never raises). Three written forms are read:

- ``p=0.73`` (also ``P = .73``; ``p=73%`` is read as a percentage); the ``p`` must not follow a
  letter, digit or underscore (``top=0.5`` is not a forecast);
- a percentage ``73%`` or ``73.5 %`` (LaTeX ``73\\%`` too), the number not glued to a digit or dot before it;
- ``\\boxed{0.73}`` (or ``\\boxed{73%}``), the box holding nothing but the number.

**The last forecast in the text wins**, whatever its form: the text is scanned left to right for
non-overlapping matches of the three forms and the one that starts last decides (a model that
revises itself ends with its final answer). If that last match is out of range (a decimal
outside [0, 1], a percentage above 100) the response is *invalid*, even when an earlier match
was fine: no falling back to an answer the response moved away from. No match at all is
invalid too. A bare decimal (``0.73`` alone) is not a forecast.

Outcomes (`parse_outcome`): 0 or 1, as a number (``1``, ``0.0``), a bool, or the text ``"0"``,
``"1"``, ``"0.0"``, ``"1.0"``, ``"true"``, ``"false"``. By default the rewards read it from
`example.answer`, i.e. the row's field named by ``data.answer_key``: forecast recipes set
``data.answer_key: outcome``, so the data loader already stops, naming the file, the row and the
key, on a row without one; the trainer also checks every value of each training file before the
model loads (`ForecastReward.check_source`, i.e. `check_outcomes`).

Rewards, each a function of the forecast p ∈ [0, 1] and the outcome y ∈ {0, 1}; an *invalid*
forecast scores `invalid_score` (default 0.0, the worst any valid forecast can score), and is
counted in `RewardBatch.num_invalid_format`, not as a failure:

- Brier: ``1 − (p − y)²`` ∈ [0, 1].
- clipped log score: ``1 + ln(q) / |ln ε|`` with ``q = p_c`` if y = 1 else ``1 − p_c``, where
  ``p_c = clip(p, ε, 1 − ε)`` (default ε = 0.01): 0 for a forecast of ε on what happened, 1 − 0.0022
  for 1 − ε. An affine map of the log score, so proper (strictly for forecasts in [ε, 1 − ε];
  forecasts beyond are scored as the nearest edge, never better than it).
- empirical win rate (`empirical_winrate_rewards`): how close each forecast is to the observed win
  rate of the step's forecasts in its probability bin, mixed with Brier (formula there).

For evaluation where the true probability q of each row is known (the forecasting toy's `true_p`),
`truth_score` is ``1 − (p − q)²`` (invalid: 0): its mean is 1 − the mean squared error to the truth.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

from forkrl.tasks.data import MISSING, PromptDataError, PromptExample, get_field, read_file_rows
from forkrl.tasks.rewards import BatchReward, RewardBatch

__all__ = [
    "DEFAULT_BINS",
    "DEFAULT_BRIER_WEIGHT",
    "DEFAULT_LOG_EPS",
    "ForecastReward",
    "ParsedForecast",
    "brier_reward",
    "check_outcomes",
    "empirical_winrate_rewards",
    "equal_width_bin",
    "log_score_reward",
    "outcome_of",
    "parse_forecast",
    "parse_outcome",
    "truth_score",
]

DEFAULT_BINS = 10
"""Equal-width probability bins of the empirical-win-rate reward."""
DEFAULT_BRIER_WEIGHT = 0.5
"""λ of the empirical-win-rate reward: the weight of the Brier term, which rewards sharpness."""
DEFAULT_LOG_EPS = 0.01
"""ε of the clipped log score: forecasts are clipped to [ε, 1 − ε] and the score scaled by 1/|ln ε|."""

# ---------------------------------------------------------------------------- parsing

# A number: digits with an optional fraction, or a bare fraction (".73"), not glued to a digit or
# dot before it (so "1.2.3" and "12345" are read from their start, never from the middle).
_NUM = r"(?<![\d.])(?:\d+(?:\.\d+)?|\.\d+)"
_PERCENT = r"\s*\\?%"
_FORECAST_RE = re.compile(
    rf"\\boxed\{{\s*(?P<box>{_NUM})(?P<box_pct>{_PERCENT})?\s*\}}"
    rf"|(?<![A-Za-z0-9_])[pP]\s*=\s*(?P<p>{_NUM})(?P<p_pct>{_PERCENT})?"
    rf"|(?P<pct>{_NUM}){_PERCENT}"
)


class ParsedForecast(NamedTuple):
    """What `parse_forecast` read: the probability, or None with the reason it is invalid."""

    p: float | None
    """The forecast in [0, 1]; None when the response has no valid forecast."""
    form: str | None
    """Which form decided: ``"p="``, ``"percent"`` or ``"boxed"``; None when nothing matched."""
    problem: str | None = None
    """Why it is invalid (None when valid)."""

    @property
    def valid(self) -> bool:
        return self.p is not None


def parse_forecast(text: str) -> ParsedForecast:
    """The last forecast written in `text` (module docstring); never raises."""
    if not isinstance(text, str):
        return ParsedForecast(None, None, f"not text: {type(text).__name__}")
    last = None
    for last in _FORECAST_RE.finditer(text):  # noqa: B007 -- the last match is the one wanted
        pass
    if last is None:
        return ParsedForecast(None, None, "no forecast (p=0.xx, xx% or \\boxed{0.xx})")
    if last.group("box") is not None:
        form, number, percent = "boxed", last.group("box"), last.group("box_pct") is not None
    elif last.group("p") is not None:
        form, number, percent = "p=", last.group("p"), last.group("p_pct") is not None
    else:
        form, number, percent = "percent", last.group("pct"), True
    value = float(number) / (100.0 if percent else 1.0)
    if not 0.0 <= value <= 1.0:  # also catches inf from an absurdly long digit string
        return ParsedForecast(None, form, f"{last.group(0).strip()!r} is outside [0, 1]")
    return ParsedForecast(value, form)


_OUTCOME_TEXT = {"0": 0, "1": 1, "0.0": 0, "1.0": 1, "false": 0, "true": 1}


def parse_outcome(value: Any) -> int:
    """0 or 1 from a number, bool or text (module docstring); ValueError naming the value otherwise."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return int(value)
    if isinstance(value, str) and value.strip().lower() in _OUTCOME_TEXT:
        return _OUTCOME_TEXT[value.strip().lower()]
    raise ValueError(f"outcome must be 0 or 1 (or true/false), got {value!r}")


def outcome_of(example: PromptExample, key: str | None = None) -> int:
    """The 0/1 outcome of `example`: its `answer` (key None) or the row field `key` (dots reach nested
    fields). ValueError naming the prompt and the key when it is missing or not 0/1."""
    if key is None:
        value, source = example.answer, "answer (data.answer_key)"
    else:
        value, source = get_field(example.metadata or {}, key), f"field {key!r}"
        if value is MISSING:
            raise ValueError(f"prompt index {example.index}: the row has no outcome {source}")
    try:
        return parse_outcome(value)
    except ValueError as err:
        raise ValueError(f"prompt index {example.index}: {source}: {err}") from None


def check_outcomes(source: str, key: str = "outcome") -> int:
    """Check that every row of the file `source` (jsonl/json/parquet) has a 0/1 outcome in `key`.

    Returns the number of rows. Raises `PromptDataError` naming the file, the row and the key, so a
    bad row stops a run before the model loads rather than as reward errors mid-training.
    """
    if not os.path.isfile(source):
        raise PromptDataError(f"{source}: not a file (outcomes are checked in jsonl, json or parquet files)")
    rows = read_file_rows(source, None)
    for where, row in rows:
        value = get_field(row, key)
        if value is MISSING or value is None:
            raise PromptDataError(f"{where}: row has no outcome field {key!r} (its fields: {sorted(row)})")
        try:
            parse_outcome(value)
        except ValueError as err:
            raise PromptDataError(f"{where}: outcome field {key!r}: {err}") from None
    return len(rows)


# ---------------------------------------------------------------------------- scoring rules


def truth_score(completion: str, example: PromptExample, key: str = "true_p") -> float:
    """``1 − (p − q)²`` with p the response's forecast and q the row's true probability (field `key`);
    an invalid forecast scores 0. An *evaluation* score for data whose q is known (the forecasting
    toy): since E[(p − y)²] = E[(p − q)²] + E[q(1 − q)] for y ~ Bernoulli(q), the mean ranks models
    as their expected Brier does, without the outcome noise. ValueError (counted as a failed call)
    when the row has no q in [0, 1]."""
    q = get_field(example.metadata or {}, key)
    if q is MISSING or isinstance(q, bool) or not isinstance(q, (int, float)) or not 0.0 <= q <= 1.0:
        shown = "no such field" if q is MISSING else repr(q)
        raise ValueError(f"prompt index {example.index}: field {key!r} must be a probability in [0, 1], got {shown}")
    p = parse_forecast(completion).p
    return 0.0 if p is None else 1.0 - (p - float(q)) ** 2


def brier_reward(p: float, y: int) -> float:
    """1 − (p − y)²: 1 for a certain, right forecast, 0 for a certain, wrong one, 0.75 for p = 0.5."""
    return 1.0 - (p - y) ** 2


def log_score_reward(p: float, y: int, eps: float = DEFAULT_LOG_EPS) -> float:
    """1 + ln(q)/|ln ε|, q the clipped forecast's probability of what happened (module docstring)."""
    if not 0.0 < eps < 0.5:
        raise ValueError(f"eps must be in (0, 0.5), got {eps}")
    p_c = min(max(p, eps), 1.0 - eps)
    q = p_c if y == 1 else 1.0 - p_c
    return 1.0 + math.log(q) / -math.log(eps)


def equal_width_bin(p: float, bins: int) -> int:
    """The bin of `p` among `bins` equal-width bins of [0, 1]: ⌊p·B⌋, with p = 1 in the last bin.

    A forecast within 1e-9 below an edge counts in the upper bin, so that decimal forecasts land
    where they are written (0.57 · 100 is 56.99999999999999 in floating point; it goes to bin 57).
    """
    return min(int(math.floor(p * bins + 1e-9)), bins - 1)


def empirical_winrate_rewards(
    forecasts: Sequence[float | None],
    outcomes: Sequence[int | None],
    bins: int = DEFAULT_BINS,
    brier_weight: float = DEFAULT_BRIER_WEIGHT,
    invalid_score: float = 0.0,
) -> list[float]:
    """The empirical-win-rate reward of every forecast of one batch.

    With B = `bins`, λ = `brier_weight`, and V the valid items (forecast and outcome both not None):

        b(i)    = equal_width_bin(p_i, B)                       (bin k is [k/B, (k+1)/B), the last one closed)
        ȳ_k     = mean of y_j over j ∈ V with b(j) = k          (the observed win rate of bin k, item i included)
        r_i     = (1 − λ) · (1 − (p_i − ȳ_{b(i)})²)  +  λ · (1 − (p_i − y_i)²)          for i ∈ V
        r_i     = invalid_score                                                         otherwise

    A forecast is rewarded for matching the win rate of the forecasts that said about the same
    thing (calibration), and, with λ > 0, for being close to its own outcome (Brier, which also
    rewards sharpness: a forecaster that always says the base rate is calibrated but gains nothing
    there). A bin holding a single forecast has ȳ = that forecast's own outcome, so its reward is
    plain Brier. Invalid items neither get nor influence a bin's rate. Every r_i is in [0, 1].
    """
    if len(forecasts) != len(outcomes):
        raise ValueError(f"{len(forecasts)} forecasts but {len(outcomes)} outcomes")
    if bins < 1 or not 0.0 <= brier_weight <= 1.0:
        raise ValueError(f"need bins >= 1 and brier_weight in [0, 1], got {bins}, {brier_weight}")
    valid = [i for i, (p, y) in enumerate(zip(forecasts, outcomes)) if p is not None and y is not None]
    wins, counts = [0.0] * bins, [0] * bins
    for i in valid:
        k = equal_width_bin(forecasts[i], bins)
        wins[k] += outcomes[i]
        counts[k] += 1
    rewards = [float(invalid_score)] * len(forecasts)
    for i in valid:
        p, y = forecasts[i], outcomes[i]
        k = equal_width_bin(p, bins)
        rate = wins[k] / counts[k]
        rewards[i] = (1.0 - brier_weight) * (1.0 - (p - rate) ** 2) + brier_weight * brier_reward(p, y)
    return rewards


# ---------------------------------------------------------------------------- the rewards

RULES = ("brier", "log", "winrate")


class ForecastReward(BatchReward):
    """A forecast reward over whole batches: parse each response, read each row's outcome, score.

    Args:
        rule: ``"brier"``, ``"log"`` (clipped log score) or ``"winrate"`` (empirical win rate mixed
            with Brier); formulas in the module docstring and `empirical_winrate_rewards`.
        bins: B of ``winrate``.
        brier_weight: λ of ``winrate``.
        log_eps: ε of ``log``.
        invalid_score: the score of a response without a valid forecast (counted in
            `RewardBatch.num_invalid_format`).
        outcome_key: None reads the outcome from `example.answer` (the row field named by
            ``data.answer_key``); a key reads that field of the row (`example.metadata`).

    A row whose outcome is missing or not 0/1 scores 0 and counts as an error (`num_errors`,
    `first_failure` naming the batch item, the prompt and the key); the other rows are scored
    without it (it is in no bin).

    `with_options(bins=20, ...)` (what `reward.kwargs` calls on a registered forecast reward) returns
    a new reward with those of the six arguments above replaced; `check_source` checks a training
    file's outcomes before the model loads.
    """

    def __init__(
        self,
        rule: str = "winrate",
        bins: int = DEFAULT_BINS,
        brier_weight: float = DEFAULT_BRIER_WEIGHT,
        log_eps: float = DEFAULT_LOG_EPS,
        invalid_score: float = 0.0,
        outcome_key: str | None = None,
    ):
        if rule not in RULES:
            raise ValueError(f"unknown forecast rule {rule!r}; choose one of {', '.join(RULES)}")
        numbers = {"brier_weight": brier_weight, "log_eps": log_eps, "invalid_score": invalid_score}
        for name, value in {"bins": bins, **numbers}.items():
            if isinstance(value, bool) or not isinstance(value, int if name == "bins" else (int, float)):
                kind = "an integer" if name == "bins" else "a number"
                raise ValueError(f"{name} must be {kind}, got {value!r}")
        if outcome_key is not None and not isinstance(outcome_key, str):
            raise ValueError(f"outcome_key must be a field name or None, got {outcome_key!r}")
        if bins < 1 or not 0.0 <= brier_weight <= 1.0 or not 0.0 < log_eps < 0.5:
            raise ValueError(
                f"need bins >= 1, brier_weight in [0, 1], log_eps in (0, 0.5); got {bins}, {brier_weight}, {log_eps}"
            )
        self.rule, self.bins, self.brier_weight, self.log_eps = rule, bins, brier_weight, log_eps
        self.invalid_score, self.outcome_key = float(invalid_score), outcome_key
        self.name = f"forecast_{rule}"

    def __repr__(self) -> str:
        extra = {"winrate": f", bins={self.bins}, brier_weight={self.brier_weight}", "log": f", eps={self.log_eps}"}
        return f"ForecastReward({self.rule!r}{extra.get(self.rule, '')})"

    def check_source(self, source: str, answer_key: str) -> None:
        """Before training: every row of the prompt file `source` must have a 0/1 outcome (in
        `outcome_key`, else the data's `answer_key`); `PromptDataError` naming file, row and key.
        A source that is not a file (a `datasets` directory or hub id) is left to the per-row errors."""
        if os.path.isfile(source):
            check_outcomes(source, self.outcome_key or answer_key)

    def score_all(self, completions: Sequence[str], examples: Sequence[PromptExample]) -> RewardBatch:
        forecasts = [parse_forecast(text).p for text in completions]
        outcomes: list[int | None] = []
        errors, first_failure = 0, None
        for i, example in enumerate(examples):
            try:
                outcomes.append(outcome_of(example, self.outcome_key))
            except ValueError as err:
                outcomes.append(None)
                errors += 1
                first_failure = first_failure or f"batch item {i} {err}"
        if self.rule == "winrate":
            scores = empirical_winrate_rewards(forecasts, outcomes, self.bins, self.brier_weight, self.invalid_score)
        else:
            rule = brier_reward if self.rule == "brier" else lambda p, y: log_score_reward(p, y, self.log_eps)
            scores = [
                rule(p, y) if p is not None and y is not None else self.invalid_score
                for p, y in zip(forecasts, outcomes)
            ]
        for i, y in enumerate(outcomes):
            if y is None:
                scores[i] = 0.0  # an error scores 0, like a per-response reward that raised
        invalid_format = sum(p is None and y is not None for p, y in zip(forecasts, outcomes))
        return RewardBatch(scores, num_errors=errors, first_failure=first_failure, num_invalid_format=invalid_format)


# The registered forecast rewards (`forkrl.tasks.rewards` names them by import path, so they are
# imported only when first used).
forecast_brier = ForecastReward("brier")
forecast_log = ForecastReward("log")
forecast_winrate = ForecastReward("winrate")
forecast_winrate_pure = ForecastReward("winrate", brier_weight=0.0)
forecast_winrate_b5 = ForecastReward("winrate", bins=5)
forecast_winrate_b20 = ForecastReward("winrate", bins=20)
FORECAST_REWARDS = {
    "forecast_brier": forecast_brier,
    "forecast_log": forecast_log,
    "forecast_winrate": forecast_winrate,
    "forecast_winrate_pure": forecast_winrate_pure,
    "forecast_winrate_b5": forecast_winrate_b5,
    "forecast_winrate_b20": forecast_winrate_b20,
}
"""The registered forecast rewards, by name (the same objects `REWARD_FUNCTIONS` holds)."""
