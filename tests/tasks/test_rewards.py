"""Tests for forkrl.tasks.rewards: loading reward functions, safe batch scoring, overlong shaping."""

from __future__ import annotations

import logging
import textwrap
import threading
import time

import numpy as np
import pytest
import torch

from forkrl.tasks.data import PromptExample
from forkrl.tasks.math import MathVerifier
from forkrl.tasks.rewards import (
    REWARD_FUNCTIONS,
    MathReward,
    RewardComputer,
    RewardOptionsError,
    configure_reward,
    load_reward_fn,
    overlong_penalty,
    register_reward,
)

REWARD_MODULE = textwrap.dedent(
    """
    def exact(completion, example):
        return float(completion.strip() == example.answer)

    class Scorer:
        @staticmethod
        def length(completion, example):
            return len(completion)

    NOT_CALLABLE = 3
    """
)


def _examples(n: int, answer: str = "7") -> list[PromptExample]:
    return [PromptExample(prompt=f"p{i}", question=f"q{i}", answer=answer, index=10 + i) for i in range(n)]


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    path = tmp_path / "my_rewards_mod.py"
    path.write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return path


# ---------------------------------------------------------------------------- loading


def test_load_by_import_path_and_file(reward_module):
    exact = load_reward_fn("my_rewards_mod:exact")
    assert exact("7", _examples(1)[0]) == 1.0 and exact("8", _examples(1)[0]) == 0.0
    from_file = load_reward_fn(f"{reward_module}:exact")
    assert from_file(" 7 ", _examples(1)[0]) == 1.0
    assert load_reward_fn("my_rewards_mod:Scorer.length")("abc", _examples(1)[0]) == 3


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_module_xyz:fn", "module 'no_such_module_xyz' not found"),
        ("my_rewards_mod:missing", "has no attribute 'missing'"),
        ("my_rewards_mod:NOT_CALLABLE", "'NOT_CALLABLE' is a int, not callable"),
        ("/no/such/file.py:fn", "file '/no/such/file.py' not found"),
        ("nonsense", r"unknown reward 'nonsense'; registered: \[.*'math'\] \(or an import path"),
    ],
)
def test_load_errors(reward_module, spec, message):
    with pytest.raises(ValueError, match=message):
        load_reward_fn(spec)


def test_registry():
    assert isinstance(load_reward_fn("math"), MathReward)

    @register_reward("always_one")
    def always_one(completion, example):
        return 1.0

    try:
        assert load_reward_fn("always_one") is always_one
    finally:
        del REWARD_FUNCTIONS["always_one"]


# ---------------------------------------------------------------------------- scoring


def test_scores_and_counters_for_bad_returns(caplog):
    returns = {"a": 0.5, "b": True, "c": np.float32(0.25), "d": torch.tensor(2.0),
               "e": "1.0", "f": float("nan"), "g": float("inf"), "h": None}  # fmt: skip

    def reward(completion, example):
        return returns[completion]

    computer = RewardComputer(reward, timeout_s=5.0)
    with caplog.at_level(logging.WARNING, logger="forkrl.tasks.rewards"):
        batch = computer(list(returns), _examples(len(returns)))
    assert batch.scores == [0.5, 1.0, 0.25, 2.0, 0.0, 0.0, 0.0, 0.0]
    assert (batch.num_invalid, batch.num_errors, batch.num_timeouts) == (4, 0, 0)
    assert "batch item 4 (prompt index 14) returned '1.0', not a finite number" in caplog.text


def test_raising_function_scores_zero_and_is_logged(caplog):
    def reward(completion, example):
        return 1 / int(completion)  # "0" raises ZeroDivisionError

    computer = RewardComputer(reward, max_logged_errors=1)
    with caplog.at_level(logging.WARNING, logger="forkrl.tasks.rewards"):
        batch = computer(["2", "0", "4", "0"], _examples(4))
    assert batch.scores == [0.5, 0.0, 0.25, 0.0]
    assert batch.num_errors == 2
    assert "batch item 1 (prompt index 11) raised" in caplog.text and "ZeroDivisionError" in caplog.text
    assert "batch item 3" not in caplog.text  # only the first problem is logged
    assert "further problems are counted, not logged" in caplog.text


def test_hanging_function_times_out():
    release = threading.Event()

    def reward(completion, example):
        if completion == "hang":
            release.wait(60)  # stands in for time.sleep(60); released at the end of the test
        return 1.0

    def reward_threads() -> set:
        return {t for t in threading.enumerate() if t.name == "forkrl-reward"}

    # Threads of earlier tests may still be finishing; count only the ones this test starts.
    before = reward_threads()
    computer = RewardComputer(reward, timeout_s=0.3, max_concurrency=2)
    result: list = []
    worker = threading.Thread(target=lambda: result.append(computer(["ok", "hang", "hang", "ok"], _examples(4))))
    worker.start()
    worker.join(15)
    release.set()
    assert not worker.is_alive(), "a hung reward hung the batch"
    (batch,) = result
    assert batch.scores == [1.0, 0.0, 0.0, 1.0]
    assert batch.num_timeouts == 2
    # the stuck threads were replaced: the next batch runs normally...
    assert computer(["ok", "ok"], _examples(2)).scores == [1.0, 1.0]
    # ...and, once their calls return, the written-off threads exit instead of piling up
    for _ in range(100):
        if len(reward_threads() - before) == 2:
            break
        time.sleep(0.05)
    assert len(reward_threads() - before) == 2


def test_math_reward_batch_path():
    with MathVerifier(num_workers=1) as verifier:
        computer = RewardComputer(MathReward(verifier))
        examples = _examples(3, answer="0.5")
        batch = computer(["\\boxed{\\frac{1}{2}}", "\\boxed{2}", "Answer: 1/2"], examples)
    assert batch.scores == [1.0, 0.0, 1.0]
    assert (batch.num_errors, batch.num_timeouts, batch.num_invalid) == (0, 0, 0)


# ---------------------------------------------------------------------------- options (reward.kwargs)

OPTIONS_MODULE = textwrap.dedent(
    """
    def scaled_length(completion, example, scale=1.0, offset=0.0):
        return scale * len(completion) + offset

    class Prefix:
        def __init__(self, prefix):
            self.prefix = prefix

        def __call__(self, completion, example):
            return float(completion.startswith(self.prefix))
    """
)


@pytest.fixture
def options_file(tmp_path):
    path = tmp_path / "option_rewards.py"
    path.write_text(OPTIONS_MODULE)
    return path


def test_a_function_gets_its_kwargs_in_the_worker_processes(options_file):
    # scale * len + offset with scale 0.5, offset 1: "abcd" -> 0.5 * 4 + 1 = 3, "" -> 1, "ab" -> 2.
    computer = RewardComputer(f"{options_file}:scaled_length", reward_kwargs={"scale": 0.5, "offset": 1})
    try:
        assert computer._pool is not None  # a file.py:function spec runs in worker processes
        batch = computer(["abcd", "", "ab"], _examples(3))
    finally:
        computer.close()
    assert batch.scores == [3.0, 1.0, 2.0] and batch.num_failed == 0
    # The same options reach a Python callable, which runs on threads: scale 2, offset 0 -> 2 * len.
    fn = load_reward_fn(f"{options_file}:scaled_length")
    assert RewardComputer(fn, reward_kwargs={"scale": 2.0})(["abc"], _examples(1)).scores == [6.0]


def test_a_class_is_instantiated_with_its_kwargs(options_file):
    computer = RewardComputer(f"{options_file}:Prefix", reward_kwargs={"prefix": "ok"})
    try:
        batch = computer(["ok fine", "not ok", "ok"], _examples(3))
    finally:
        computer.close()
    assert batch.scores == [1.0, 0.0, 1.0] and batch.num_failed == 0


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        (
            "scaled_length",
            {"scael": 2},
            "reward '{file}:scaled_length': unknown key 'scael'; valid keys: scale, offset",
        ),
        ("Prefix", {"prefx": "a"}, "reward '{file}:Prefix': unknown key 'prefx'; valid keys: prefix"),
        ("Prefix", {}, "reward '{file}:Prefix': missing a required argument: 'prefix'; valid keys: prefix"),
    ],
)
def test_unknown_or_missing_options_name_the_valid_ones(options_file, name, options, message):
    with pytest.raises(RewardOptionsError) as err:
        configure_reward(f"{options_file}:{name}", options)
    assert str(err.value) == message.format(file=options_file)


def test_options_for_a_reward_that_takes_none():
    with pytest.raises(RewardOptionsError, match=r"^reward 'math': unknown key 'x'; it takes no options$"):
        configure_reward("math", {"x": 1})
    assert configure_reward("math") == (REWARD_FUNCTIONS["math"], {})


# ---------------------------------------------------------------------------- overlong shaping


def test_overlong_penalty_hand_computed():
    # max 20, cache 4: the ramp starts after 16 tokens, -1/4 per token, and is -1 from 20 on
    lengths = torch.tensor([0, 16, 17, 18, 20, 25])
    expected = torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0, -1.0])
    torch.testing.assert_close(overlong_penalty(lengths, max_len=20, cache_len=4), expected)
    # the factor scales the whole ramp; plain lists work too
    torch.testing.assert_close(
        overlong_penalty([18, 30], max_len=20, cache_len=4, penalty_factor=0.5), torch.tensor([-0.25, -0.5])
    )


def test_overlong_penalty_rejects_bad_cache():
    with pytest.raises(ValueError, match="0 < cache_len <= max_len"):
        overlong_penalty([1], max_len=20, cache_len=0)
    with pytest.raises(ValueError, match="0 < cache_len <= max_len"):
        overlong_penalty([1], max_len=20, cache_len=21)
