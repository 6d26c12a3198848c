"""forkrl.train.inputs: what a run checks before its model loads, for the reward's options
(`reward.kwargs`) and the forecast rewards' outcomes (`check_source`)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from forkrl.cli import app
from forkrl.config import ConfigError, load_config
from forkrl.tasks.data import PromptDataError, PromptExample
from forkrl.train.inputs import checked_tokenizer, load_training_examples, make_rewarder
from tests.train.conftest import tiny_overrides

FORECAST_VALID = "rule, bins, brier_weight, log_eps, invalid_score, outcome_key"


def _config(tiny_model_dir, data, tmp_path, *extra: str):
    return load_config(None, [*tiny_overrides(tiny_model_dir, str(data), str(tmp_path / "run")), *extra])


def _forecast_rows(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ---------------------------------------------------------------------------- reward.kwargs: the config key


def test_kwargs_override_one_key_or_the_whole_mapping(tiny_model_dir, prompts_file, tmp_path):
    one = _config(tiny_model_dir, prompts_file, tmp_path, "reward.kwargs.bins=20", "reward.kwargs.brier_weight=0.0")
    whole = _config(tiny_model_dir, prompts_file, tmp_path, "reward.kwargs={bins: 20, brier_weight: 0.0}")
    assert one.reward.kwargs == whole.reward.kwargs == {"bins": 20, "brier_weight": 0.0}
    assert _config(tiny_model_dir, prompts_file, tmp_path).reward.kwargs == {}
    # Values stay as YAML gave them: lists and mappings too.
    nested = _config(tiny_model_dir, prompts_file, tmp_path, "reward.kwargs={w: [1, 2], m: {a: x}}")
    assert nested.reward.kwargs == {"w": [1, 2], "m": {"a": "x"}}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("reward.kwargs=3", "reward.kwargs: expected a mapping such as {name: value}, got 3"),
        ("reward.kwargs=[bins]", "reward.kwargs: expected a mapping such as {name: value}, got ['bins']"),
        ("reward.kwargs={1: 2}", "reward.kwargs: expected string keys, got 1"),
    ],
)
def test_kwargs_that_are_not_a_mapping(tiny_model_dir, prompts_file, tmp_path, override, message):
    with pytest.raises(ConfigError) as err:
        _config(tiny_model_dir, prompts_file, tmp_path, override)
    assert str(err.value) == message


# ---------------------------------------------------------------------------- reward.kwargs: make_rewarder


def test_registered_reward_scores_with_its_options(tiny_model_dir, prompts_file, tmp_path):
    cfg = _config(
        tiny_model_dir, prompts_file, tmp_path, "reward.function=forecast_winrate", "reward.kwargs.bins=2",
        "reward.kwargs.brier_weight=0.25",
    )  # fmt: skip
    rewarder = make_rewarder(cfg)
    examples = [PromptExample(f"p{i}", f"q{i}", str(y), i) for i, y in enumerate([0, 1, 1, 0])]
    # Hand-derived in tests/tasks/test_forecast.py (B = 2, λ = 0.25); the default B = 10 gives plain
    # Brier, 0.96, 0.64, 0.91, 0.19.
    scores = rewarder(["p=0.2", "p=0.4", "p=0.7", "p=0.9"], examples).scores
    assert scores == pytest.approx([0.9225, 0.9025, 0.9475, 0.6775])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["reward.function=forecast_winrate", "reward.kwargs.bns=20"],
            f"reward.kwargs: reward 'forecast_winrate': unknown key 'bns'; valid keys: {FORECAST_VALID}",
        ),
        (
            ["reward.function=forkrl.tasks.forecast:ForecastReward", "reward.kwargs={rule: brier, eps: 0.1}"],
            "reward.kwargs: reward 'forkrl.tasks.forecast:ForecastReward': unknown key 'eps'; "
            f"valid keys: {FORECAST_VALID}",
        ),
        (
            ["reward.kwargs.scale=2"],  # tiny_overrides' reward: vowel_fraction(completion, example)
            "reward.kwargs: reward 'tests.train.reward_fns:vowel_fraction': unknown key 'scale'; it takes no options",
        ),
        (
            ["reward.function=forecast_log", "reward.kwargs.log_eps=0.7"],
            "reward.kwargs: reward 'forecast_log': need bins >= 1, brier_weight in [0, 1], log_eps in (0, 0.5); "
            "got 10, 0.5, 0.7",
        ),
    ],
)
def test_a_bad_option_is_a_one_line_config_error(tiny_model_dir, prompts_file, tmp_path, extra, message):
    with pytest.raises(ConfigError) as err:
        make_rewarder(_config(tiny_model_dir, prompts_file, tmp_path, *extra))
    assert str(err.value) == message


def test_a_bad_option_stops_train_before_the_model_loads(tiny_model_dir, prompts_file, tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the reward options were checked")

    monkeypatch.setattr("forkrl.train.setup.load_policy", no_model)
    args = [*tiny_overrides(tiny_model_dir, prompts_file, str(tmp_path / "run")), "reward.function=forecast_winrate"]
    result = CliRunner().invoke(app, ["train", *args, "reward.kwargs.bns=20"])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        f"error: reward.kwargs: reward 'forecast_winrate': unknown key 'bns'; valid keys: {FORECAST_VALID}"
    ]
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------- outcomes checked early


def test_a_row_without_a_0_1_outcome_stops_loading(tiny_model_dir, tmp_path):
    data = _forecast_rows(
        tmp_path / "games.jsonl",
        [{"question": "a vs b", "outcome": 1}, {"question": "c vs d", "outcome": 0}, {"question": "e", "outcome": 0.7}],
    )
    cfg = _config(tiny_model_dir, data, tmp_path, "reward.function=forecast_brier", "data.answer_key=outcome")
    tokenizer = checked_tokenizer(cfg)
    with pytest.raises(PromptDataError, match=rf"^{data}: line 3: outcome field 'outcome': .*got 0\.7$"):
        load_training_examples(cfg, tokenizer)
    # The reward's own outcome_key (reward.kwargs) is the key checked: here a field row 2 lacks.
    data = _forecast_rows(
        tmp_path / "keyed.jsonl", [{"question": "a", "answer": "x", "won": 1}, {"question": "b", "answer": "y"}]
    )
    cfg = _config(tiny_model_dir, data, tmp_path, "reward.function=forecast_brier", "reward.kwargs.outcome_key=won")
    with pytest.raises(PromptDataError, match=rf"^{data}: line 2: row has no outcome field 'won'"):
        load_training_examples(cfg, tokenizer)
    # Good rows load, outcomes in any accepted form.
    good = _forecast_rows(
        tmp_path / "good.jsonl", [{"question": "a", "outcome": "true"}, {"question": "b", "outcome": 0}]
    )
    cfg = _config(tiny_model_dir, good, tmp_path, "reward.function=forecast_brier", "data.answer_key=outcome")
    assert [ex.answer for ex in load_training_examples(cfg, tokenizer)] == ["true", "0"]


def test_a_bad_outcome_stops_train_before_the_model_loads(tiny_model_dir, tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the outcomes were checked")

    monkeypatch.setattr("forkrl.train.setup.load_policy", no_model)
    data = _forecast_rows(
        tmp_path / "games.jsonl", [{"question": "a", "outcome": 1}, {"question": "b", "outcome": "maybe"}]
    )
    args = tiny_overrides(tiny_model_dir, data, str(tmp_path / "run"))
    result = CliRunner().invoke(app, ["train", *args, "reward.function=forecast_winrate", "data.answer_key=outcome"])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert f"{data}: line 2: outcome field 'outcome'" in errors[0] and "'maybe'" in errors[0]
    assert not (tmp_path / "run").exists()


def test_eval_reward_is_checked_before_the_model_loads(tmp_path):
    from forkrl.train.inputs import make_rewarder

    cfg = load_config(None, ["trainer.eval_reward=no_such_reward"], check_files=False)
    with pytest.raises(ConfigError, match=r"^trainer.eval_reward = 'no_such_reward': unknown reward"):
        make_rewarder(cfg)
