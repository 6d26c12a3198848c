"""Probability forecasts as a verifiable task: parsing, proper-scoring and calibration rewards, a toy.

- `scoring`: read a forecast (``p=0.73``, ``73%``, ``\\boxed{0.73}``) and a 0/1 outcome; Brier,
  clipped log score and the empirical-win-rate reward, all as batch rewards (`ForecastReward`).
- `matchups`: the synthetic match-up task with known true probabilities (the forecasting toy).

The registered rewards (`forkrl.tasks.rewards` names them by import path, `FORECAST_REWARDS`):

| name | reward |
|---|---|
| ``forecast_brier`` | 1 − (p − y)² |
| ``forecast_log`` | clipped log score, ε = 0.01 |
| ``forecast_winrate`` | empirical win rate, 10 bins, Brier weight λ = 0.5 |
| ``forecast_winrate_pure`` | empirical win rate, 10 bins, λ = 0 (calibration only) |
| ``forecast_winrate_b5`` / ``forecast_winrate_b20`` | 5 / 20 bins, λ = 0.5 |
| ``forecast_truth`` | 1 − (p − q)² against the row's true probability ``true_p`` (evaluation only) |

Other settings: ``reward.kwargs`` replaces options of the named reward (`ForecastReward.with_options`),
e.g. ``reward.function=forecast_winrate reward.kwargs.bins=20`` or
``reward.kwargs={bins: 20, brier_weight: 0.0}``; the options are ``rule``, ``bins``,
``brier_weight``, ``log_eps``, ``invalid_score`` and ``outcome_key``. The class itself works too:
``reward.function=forkrl.tasks.forecast:ForecastReward reward.kwargs={rule: log, log_eps: 0.05}``.
"""

from forkrl.tasks.forecast.matchups import (
    FORECAST_TEMPLATE,
    ForecastRow,
    MatchUp,
    TraceSettings,
    forecast_trace,
    forecast_vocab,
    generate_rows,
    matchup_split,
    rows_to_examples,
    trace_is_correct,
    write_rows_jsonl,
)
from forkrl.tasks.forecast.scoring import (
    FORECAST_REWARDS,
    ForecastReward,
    ParsedForecast,
    brier_reward,
    check_outcomes,
    empirical_winrate_rewards,
    equal_width_bin,
    log_score_reward,
    outcome_of,
    parse_forecast,
    parse_outcome,
    truth_score,
)

__all__ = [
    "FORECAST_REWARDS",
    "FORECAST_TEMPLATE",
    "ForecastReward",
    "ForecastRow",
    "MatchUp",
    "ParsedForecast",
    "TraceSettings",
    "brier_reward",
    "check_outcomes",
    "empirical_winrate_rewards",
    "equal_width_bin",
    "forecast_trace",
    "forecast_vocab",
    "generate_rows",
    "log_score_reward",
    "matchup_split",
    "outcome_of",
    "parse_forecast",
    "parse_outcome",
    "rows_to_examples",
    "trace_is_correct",
    "truth_score",
    "write_rows_jsonl",
]
