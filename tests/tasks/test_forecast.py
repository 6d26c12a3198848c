"""forkrl.tasks.forecast: forecast parsing, outcomes, proper scores, the empirical-win-rate reward,
batch-reward accounting, and the synthetic match-up task's determinism."""

from __future__ import annotations

import math
import random
import re
import threading

import pytest

from forkrl.tasks.data import PromptDataError, PromptExample
from forkrl.tasks.forecast import (
    FORECAST_REWARDS,
    ForecastReward,
    MatchUp,
    TraceSettings,
    brier_reward,
    check_outcomes,
    empirical_winrate_rewards,
    equal_width_bin,
    forecast_trace,
    generate_rows,
    log_score_reward,
    matchup_split,
    outcome_of,
    parse_forecast,
    parse_outcome,
    rows_to_examples,
    trace_is_correct,
)
from forkrl.tasks.rewards import REWARD_FUNCTIONS, BatchReward, RewardBatch, RewardComputer


def _examples(outcomes) -> list[PromptExample]:
    return [PromptExample(f"p{i}", f"q{i}", str(y), 10 + i) for i, y in enumerate(outcomes)]


# ---------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("text", "p", "form"),
    [
        ("p=0.73", 0.73, "p="),
        ("so P = .5", 0.5, "p="),
        ("p=1", 1.0, "p="),
        ("p=73%", 0.73, "p="),  # a percentage after p= is read as one
        ("about 73% likely", 0.73, "percent"),
        ("73.5 %", 0.735, "percent"),
        ("100%", 1.0, "percent"),
        ("\\boxed{0.73}", 0.73, "boxed"),
        ("\\boxed{ 0.25 }", 0.25, "boxed"),
        ("\\boxed{73\\%}", 0.73, "boxed"),  # LaTeX's escaped percent sign
        ("p=0.5.", 0.5, "p="),  # sentence-ending dot is not part of the number
        # Several forecasts: the one that starts last wins, whatever its form.
        ("p=0.2 ... on reflection 90%", 0.9, "percent"),
        ("30% first, then \\boxed{0.6}", 0.6, "boxed"),
        ("\\boxed{0.6} but finally p=0.4", 0.4, "p="),
    ],
)
def test_parse_valid_forecasts(text, p, form):
    parsed = parse_forecast(text)
    assert parsed.valid and parsed.p == pytest.approx(p, abs=1e-12) and parsed.form == form
    assert parsed.problem is None


@pytest.mark.parametrize(
    ("text", "form"),
    [
        ("no number here", None),
        ("0.73", None),  # a bare decimal is not a forecast
        ("top=0.5", None),  # `p` glued to a word is not the forecast's p
        ("1.2.3%", None),  # the percent's number is glued to a dot before it
        ("p=1.3", "p="),  # out of range
        ("120%", "percent"),
        ("\\boxed{2}", "boxed"),
        ("p=0.6 then p=1.5", "p="),  # the last one decides, even when out of range
        ("9" * 400 + "%", "percent"),  # a number too long for a float is out of range, not an error
    ],
)
def test_parse_invalid_forecasts_never_raise(text, form):
    parsed = parse_forecast(text)
    assert not parsed.valid and parsed.p is None and parsed.form == form and parsed.problem


def test_parse_non_text_is_invalid():
    assert parse_forecast(None).p is None and parse_forecast(b"p=0.5").p is None  # type: ignore[arg-type]


def test_parse_is_linear_on_long_digit_runs():
    # A regex with overlapping quantifiers would take minutes here; the parser's takes milliseconds.
    result = {}
    thread = threading.Thread(target=lambda: result.update(p=parse_forecast("1" * 200_000 + " p=0.3")))
    thread.start()
    thread.join(timeout=5.0)
    assert not thread.is_alive() and result["p"].p == 0.3


@pytest.mark.parametrize(("value", "y"), [(1, 1), (0, 0), (1.0, 1), (True, 1), (False, 0), ("1", 1), (" 0 ", 0),
                                          ("0.0", 0), ("TRUE", 1), ("false", 0)])  # fmt: skip
def test_parse_outcome(value, y):
    assert parse_outcome(value) == y


@pytest.mark.parametrize("value", [0.5, 2, -1, "yes", "", None, [1]])
def test_parse_outcome_rejects(value):
    with pytest.raises(ValueError, match="outcome must be 0 or 1"):
        parse_outcome(value)


def test_outcome_of_names_the_prompt_and_the_key():
    ex = PromptExample("p", "q", "maybe", 7, {"result": {"won": 1}})
    with pytest.raises(ValueError, match=r"prompt index 7: answer \(data.answer_key\).*'maybe'"):
        outcome_of(ex)
    assert outcome_of(ex, "result.won") == 1
    with pytest.raises(ValueError, match="prompt index 7: the row has no outcome field 'outcome'"):
        outcome_of(ex, "outcome")


def test_check_outcomes_names_file_row_and_key(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"question": "a", "outcome": 1}\n\n{"question": "b", "outcome": 0}\n')
    assert check_outcomes(str(good)) == 2
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"question": "a", "outcome": 1}\n{"question": "b"}\n')
    with pytest.raises(PromptDataError, match=r"missing.jsonl: line 2: row has no outcome field 'outcome'"):
        check_outcomes(str(missing))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a", "outcome": 0.7}\n')
    with pytest.raises(PromptDataError, match=r"bad.jsonl: line 1: outcome field 'outcome'.*got 0.7"):
        check_outcomes(str(bad))
    with pytest.raises(PromptDataError, match="not a file"):
        check_outcomes(str(tmp_path / "absent.jsonl"))
    # The hook a trainer can call for a forecast reward: the data's answer key, or the reward's own key.
    with pytest.raises(PromptDataError, match="line 1: outcome field 'outcome'"):
        FORECAST_REWARDS["forecast_brier"].check_source(str(bad), "outcome")
    ForecastReward("brier", outcome_key="question").check_source(str(tmp_path / "absent"), "outcome")  # not a file


# ---------------------------------------------------------------------------- scoring rules


def test_brier_reward():
    assert brier_reward(0.7, 1) == pytest.approx(0.91)  # 1 - 0.3²
    assert brier_reward(0.7, 0) == pytest.approx(0.51)  # 1 - 0.7²
    assert brier_reward(0.5, 1) == 0.75 and brier_reward(1.0, 1) == 1.0 and brier_reward(1.0, 0) == 0.0


def test_log_score_reward_hand_values():
    # 1 + ln(q)/|ln ε|, ε = 0.01, |ln ε| = ln 100.
    assert log_score_reward(0.9, 0) == pytest.approx(0.5)  # q = 0.1: ln 0.1 / ln 100 = 1/2
    assert log_score_reward(0.9, 1) == pytest.approx(1 - math.log(1 / 0.9) / math.log(100))  # 0.977121
    assert log_score_reward(0.9, 1) == pytest.approx(0.9771213, abs=1e-7)
    assert log_score_reward(0.5, 1) == pytest.approx(1 - math.log10(2) / 2)  # 0.849485
    assert log_score_reward(0.0, 1) == 0.0  # clipped to ε: the worst score, not -inf
    assert log_score_reward(0.001, 1) == 0.0  # beyond the clip: scored as the edge
    assert log_score_reward(1.0, 1) == pytest.approx(0.9978176, abs=1e-7)  # q = 0.99
    assert log_score_reward(0.5, 1, eps=0.1) == pytest.approx(1 - math.log(2) / math.log(10))  # 0.69897


def test_equal_width_bins():
    assert [equal_width_bin(p, 10) for p in (0.0, 0.09, 0.1, 0.3, 0.29999, 0.95, 1.0)] == [0, 0, 1, 3, 2, 9, 9]
    assert equal_width_bin(0.57, 100) == 57  # 0.57 * 100 = 56.99999999999999 in floats
    assert equal_width_bin(0.5, 1) == 0


def test_empirical_winrate_hand_computed_batch():
    # B = 2 bins, λ = 0.25. Bin 0 = [0, 0.5): forecasts 0.2 (y 0), 0.4 (y 1): win rate 1/2.
    # Bin 1 = [0.5, 1]: 0.7 (y 1), 0.9 (y 0), 0.55 (y 1): win rate 2/3. The invalid item is in no bin.
    forecasts = [0.2, 0.4, 0.7, 0.9, None, 0.55]
    outcomes = [0, 1, 1, 0, 1, 1]
    r = empirical_winrate_rewards(forecasts, outcomes, bins=2, brier_weight=0.25)
    expected = [
        0.75 * (1 - 0.09) + 0.25 * (1 - 0.04),  # 0.9225
        0.75 * (1 - 0.01) + 0.25 * (1 - 0.36),  # 0.9025
        0.75 * (1 - 1 / 900) + 0.25 * (1 - 0.09),  # (0.7 - 2/3)² = 1/900: 0.976667
        0.75 * (1 - 0.49 / 9) + 0.25 * (1 - 0.81),  # (0.9 - 2/3)² = 0.49/9: 0.756667
        0.0,  # invalid forecast: invalid_score
        0.75 * (1 - 0.1225 / 9) + 0.25 * (1 - 0.2025),  # (0.55 - 2/3)² = 0.1225/9: 0.939167
    ]
    assert r == pytest.approx(expected, abs=1e-12)
    assert r[:4] == pytest.approx([0.9225, 0.9025, 0.9766667, 0.7566667], abs=1e-7)


def test_winrate_single_forecast_bin_is_brier_and_calibrated_bin_scores_one():
    # A bin with one forecast: its win rate is its own outcome, so the reward is Brier.
    assert empirical_winrate_rewards([0.05, 0.95], [1, 1], bins=10, brier_weight=0.0) == pytest.approx([0.0975, 0.9975])
    # Four forecasts of 0.5 with half of them won: perfectly calibrated, λ = 0 gives 1 each ...
    assert empirical_winrate_rewards([0.5] * 4, [1, 0, 1, 0], bins=10, brier_weight=0.0) == [1.0] * 4
    # ... and λ = 1 is plain Brier (0.75 each).
    assert empirical_winrate_rewards([0.5] * 4, [1, 0, 1, 0], bins=10, brier_weight=1.0) == [0.75] * 4


def test_winrate_missing_outcome_and_bad_arguments():
    # An item without an outcome scores invalid_score and does not count in its bin.
    r = empirical_winrate_rewards([0.8, 0.8, 0.8], [1, None, 0], bins=10, brier_weight=0.0, invalid_score=-1.0)
    assert r == pytest.approx([1 - 0.09, -1.0, 1 - 0.09])  # bin win rate 1/2 from the two valid items
    with pytest.raises(ValueError):
        empirical_winrate_rewards([0.5], [1, 0])
    with pytest.raises(ValueError):
        empirical_winrate_rewards([0.5], [1], brier_weight=1.5)


# ---------------------------------------------------------------------------- the rewards as batch rewards


def test_forecast_rewards_are_registered_batch_rewards():
    for name, reward in FORECAST_REWARDS.items():
        assert REWARD_FUNCTIONS[name] is reward and isinstance(reward, BatchReward)
    assert FORECAST_REWARDS["forecast_winrate"].bins == 10 and FORECAST_REWARDS["forecast_winrate"].brier_weight == 0.5
    assert FORECAST_REWARDS["forecast_winrate_pure"].brier_weight == 0.0


def test_reward_computer_scores_a_batch_and_counts_invalid_formats():
    texts = ["diff 3\np=0.7", "p=0.7", "no idea", "p=1.5", "\\boxed{0.2}"]
    examples = _examples([1, 0, 1, 1, 0])
    computer = RewardComputer("forecast_brier")
    batch = computer(texts, examples)
    assert batch.scores == pytest.approx([0.91, 0.51, 0.0, 0.0, 0.96])
    # Two responses without a valid forecast: scored 0 and counted, but not failures.
    assert batch.num_invalid_format == 2 and batch.num_failed == 0 and batch.first_failure is None
    log_batch = RewardComputer("forecast_log")(["p=0.9", "p=0.9"], _examples([0, 1]))
    assert log_batch.scores == pytest.approx([0.5, 0.9771213], abs=1e-7)


def test_winrate_reward_through_reward_computer_matches_the_formula():
    texts = ["p=0.2", "p=0.4", "p=0.7", "p=0.9", "none", "p=0.55"]
    reward = ForecastReward("winrate", bins=2, brier_weight=0.25)
    batch = RewardComputer(reward)(texts, _examples([0, 1, 1, 0, 1, 1]))
    assert batch.scores == pytest.approx([0.9225, 0.9025, 0.9766667, 0.7566667, 0.0, 0.9391667], abs=1e-7)
    assert batch.num_invalid_format == 1 and batch.num_failed == 0
    # One response alone is a batch of one: its bin's win rate is its own outcome, i.e. Brier.
    assert reward("p=0.7", _examples([1])[0]) == pytest.approx(0.91)


def test_with_options_copies_a_registered_reward_with_options_replaced():
    texts, examples = ["p=0.2", "p=0.4", "p=0.7", "p=0.9"], _examples([0, 1, 1, 0])
    registered = FORECAST_REWARDS["forecast_winrate"]
    # B = 10, λ = 0.5: each forecast alone in its bin, ȳ = its own outcome, so plain Brier 1 − (p − y)².
    assert RewardComputer(registered)(texts, examples).scores == pytest.approx([0.96, 0.64, 0.91, 0.19])
    # B = 2, λ = 0.25: bins [0, .5) = {0.2, 0.4} and [.5, 1] = {0.7, 0.9}, each with ȳ = 1/2, so
    # r = 0.75 · (1 − (p − 0.5)²) + 0.25 · (1 − (p − y)²):
    #   0.2, y 0: 0.75 · 0.91 + 0.25 · 0.96 = 0.9225      0.4, y 1: 0.75 · 0.99 + 0.25 · 0.64 = 0.9025
    #   0.7, y 1: 0.75 · 0.96 + 0.25 · 0.91 = 0.9475      0.9, y 0: 0.75 · 0.84 + 0.25 · 0.19 = 0.6775
    changed = registered.with_options(bins=2, brier_weight=0.25)
    assert RewardComputer(changed)(texts, examples).scores == pytest.approx([0.9225, 0.9025, 0.9475, 0.6775])
    assert (registered.bins, registered.brier_weight) == (10, 0.5)  # the registered object is untouched
    assert changed.options() == {
        "rule": "winrate", "bins": 2, "brier_weight": 0.25, "log_eps": 0.01, "invalid_score": 0.0, "outcome_key": None,
    }  # fmt: skip
    # The class by import path, instantiated with the options: the log score with ε = 0.1 is
    # 1 + log10(q); 0.95 is clipped to 0.9. q = 0.9: 1 − 0.0457575; q = 0.5: 1 − 0.30103.
    batch = RewardComputer("forkrl.tasks.forecast:ForecastReward", reward_kwargs={"rule": "log", "log_eps": 0.1})(
        ["p=0.9", "p=0.95", "p=0.5"], _examples([1, 1, 0])
    )
    assert batch.scores == pytest.approx([0.9542425, 0.9542425, 0.6989700], abs=1e-7)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"bns": 2}, "unknown key 'bns'; valid keys: rule, bins, brier_weight, log_eps, invalid_score, outcome_key"),
        ({"bins": 0}, "need bins >= 1"),
        ({"bins": 2.5}, "bins must be an integer, got 2.5"),
        ({"rule": "crps"}, "unknown forecast rule 'crps'"),
    ],
)
def test_with_options_rejects_unknown_keys_and_bad_values(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        FORECAST_REWARDS["forecast_winrate"].with_options(**options)


def test_a_bad_outcome_row_is_one_error_and_leaves_the_bins():
    texts = ["p=0.8", "p=0.8", "p=0.8"]
    examples = _examples([1, "maybe", 0])
    batch = RewardComputer(ForecastReward("winrate", brier_weight=0.0))(texts, examples)
    assert batch.scores == pytest.approx([0.91, 0.0, 0.91])  # bin rate 1/2 from the two good rows
    assert batch.num_errors == 1 and batch.num_failed == 1 and batch.num_invalid_format == 0
    assert batch.first_failure.startswith("batch item 1 prompt index 11: answer (data.answer_key): outcome must be")


class _Slow(BatchReward):
    def score_all(self, completions, examples):
        threading.Event().wait(2.0)
        return RewardBatch([1.0] * len(completions))


class _Raises(BatchReward):
    def score_all(self, completions, examples):
        raise RuntimeError("reward bug")


class _NaN(BatchReward):
    def score_all(self, completions, examples):
        return RewardBatch([1.0, float("nan"), "x"], num_invalid_format=1)


class _Short(BatchReward):
    def score_all(self, completions, examples):
        return RewardBatch([1.0])


def test_batch_reward_timeout_error_and_invalid_accounting():
    examples = _examples([1, 0, 1])
    texts = ["a", "b", "c"]
    timed_out = _Slow().score_batch(texts, examples, timeout_s=0.2)
    assert timed_out.scores == [0.0] * 3 and timed_out.num_timeouts == 3 and timed_out.num_failed == 3
    assert timed_out.first_failure == "the batch call (3 responses) timed out after 0.2 s"
    raised = _Raises().score_batch(texts, examples, timeout_s=5.0)
    assert raised.scores == [0.0] * 3 and raised.num_errors == 3
    assert raised.first_failure == "the batch call (3 responses) raised RuntimeError: reward bug"
    bad = _NaN().score_batch(texts, examples, timeout_s=5.0)
    assert bad.scores == [1.0, 0.0, 0.0] and bad.num_invalid == 2 and bad.num_invalid_format == 1
    assert bad.first_failure == "batch item 1 (prompt index 11) scored nan, not a finite number"
    short = _Short().score_batch(texts, examples, timeout_s=5.0)
    assert short.num_errors == 3 and "returned 1 scores, not a RewardBatch of 3 scores" in short.first_failure
    assert _Raises().score_batch([], [], timeout_s=1.0).scores == []


def test_trainer_stops_on_a_broken_batch_reward_like_on_a_broken_plain_one():
    # What the trainer's check reads: num_failed over the number of calls.
    batch = RewardComputer(_Raises())(["a", "b"], _examples([1, 0]))
    assert batch.num_failed == 2


# ---------------------------------------------------------------------------- the synthetic task


def test_matchup_truth_by_hand():
    m = MatchUp(52, 47, True)
    assert m.edge == 5 + 4 and m.question == "rating 52 vs 47 home yes"
    assert m.true_probability == pytest.approx(1 / (1 + math.exp(-9 / 7)))  # σ(9/7) = 0.783421
    assert m.true_probability == pytest.approx(0.783421, abs=1e-6)
    assert MatchUp(44, 51, False).edge == -7
    assert MatchUp(44, 51, False).true_probability == pytest.approx(1 / (1 + math.e))  # σ(-1) = 0.268941


def test_forecast_trace_format_and_overconfidence():
    rng = random.Random(0)
    calibrated, p = forecast_trace(MatchUp(52, 47, True), rng, TraceSettings(confidence=1.0, noise=0.0))
    assert calibrated == "diff 5\nhome 4\nedge 9\np=0.78" and p == 0.78  # σ(9/7) = 0.7834
    text, p = forecast_trace(MatchUp(52, 47, True), rng, TraceSettings(confidence=2.0, noise=0.0))
    assert text.endswith("p=0.93") and p == 0.93  # σ(18/7) = 0.9290: over-confident
    text, p = forecast_trace(MatchUp(44, 51, False), rng, TraceSettings(confidence=1.0, noise=0.0))
    assert text == "diff -7\nhome 0\nedge -7\np=0.27"  # σ(-1) = 0.2689
    assert forecast_trace(MatchUp(40, 60, False), rng, TraceSettings(confidence=1.0, noise=0.0))[1] == 0.05
    text, p = forecast_trace(MatchUp(40, 60, False), rng, TraceSettings(confidence=2.0, noise=0.0))
    assert p == 0.01 and parse_forecast(text).p == 0.01  # σ(-40/7) = 0.0033, kept within [0.01, 0.99]


def test_trace_is_correct_judges_the_reasoning_not_the_forecast():
    m = MatchUp(52, 47, True)
    assert trace_is_correct("diff 5\nhome 4\nedge 9\np=0.10", m)
    assert not trace_is_correct("diff 5\nhome 4\nedge 7\np=0.78", m)  # a bent edge, to move the forecast
    assert not trace_is_correct("diff 5\nhome 0\nedge 9\np=0.78", m)
    assert trace_is_correct(forecast_trace(MatchUp(44, 51, False), random.Random(1))[0], MatchUp(44, 51, False))


def test_rows_are_determined_by_the_seed():
    a, b = generate_rows(200, seed=3), generate_rows(200, seed=3)
    assert a == b
    assert a != generate_rows(200, seed=4)
    assert generate_rows(50, seed=3) == a[:50]  # a longer draw extends a shorter one
    rng1, rng2 = random.Random("t"), random.Random("t")
    assert [forecast_trace(r.matchup, rng1) for r in a] == [forecast_trace(r.matchup, rng2) for r in a]


def test_splits_are_disjoint_and_outcomes_follow_the_truth():
    train, test = generate_rows(20_000, seed=0, split="train"), generate_rows(2_000, seed=0, split="test")
    assert {matchup_split(r.matchup) for r in train} == {"train"}
    assert {matchup_split(r.matchup) for r in test} == {"test"}
    assert not {r.matchup for r in train} & {r.matchup for r in test}
    # Outcomes are Bernoulli(true p): the win rate matches the mean true probability (s.e. 0.003).
    wins = sum(r.outcome for r in train) / len(train)
    assert abs(wins - sum(r.matchup.true_probability for r in train) / len(train)) < 0.01
    with pytest.raises(ValueError):
        generate_rows(1, seed=0, split="valid")


def test_examples_carry_the_outcome_as_answer_and_the_row_as_metadata():
    rows = generate_rows(3, seed=0)
    ex = rows_to_examples(rows)
    assert [e.answer for e in ex] == [str(r.outcome) for r in rows]
    assert ex[0].prompt == rows[0].matchup.question + "\n"
    assert ex[1].metadata["true_p"] == rows[1].matchup.true_probability and ex[2].index == 2
    assert [outcome_of(e) for e in ex] == [r.outcome for r in rows]


def test_truth_score_against_the_true_probability():
    from forkrl.tasks.forecast import truth_score
    from forkrl.tasks.rewards import load_reward_fn

    ex = PromptExample(prompt="q", question="q", answer="1", index=3, metadata={"true_p": 0.6})
    assert load_reward_fn("forecast_truth") is truth_score
    assert truth_score("so p=0.9", ex) == pytest.approx(1 - 0.3**2)  # 0.91, whatever the outcome
    assert truth_score("p=0.6", ex) == pytest.approx(1.0)
    assert truth_score("no forecast here", ex) == 0.0
    with pytest.raises(
        ValueError, match=r"prompt index 3: field 'true_p' must be a probability in \[0, 1\], got no such field"
    ):
        truth_score("p=0.5", PromptExample(prompt="q", question="q", answer="1", index=3, metadata={}))
    with pytest.raises(ValueError, match="got 1.5"):
        truth_score("p=0.5", PromptExample(prompt="q", question="q", answer="1", index=3, metadata={"true_p": 1.5}))
