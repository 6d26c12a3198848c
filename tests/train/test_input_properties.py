"""Property test (issue 13): any mix of config values and malformed data rows ends in either a
successful run or a one-line `error:` with exit code 2 — never a traceback, never a hang."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from forkrl.cli import app
from tests.train.conftest import tiny_overrides

# Valid values first in each list; the rest are wrong (or fail later) in a different way each.
CONFIG_VALUES = {
    "optim.lr": ["1e-3", "0", "-1", ".inf", ".nan", "abc", "[1]"],
    "selection.ratio": ["0.2", "1.0", "0", "1.5", ".nan", "true"],
    "rollout.group_size": ["4", "2", "1", "x"],
    "rollout.max_new_tokens": ["12", "4", "0", "3000"],
    "reward.timeout_s": ["2", "0", "-1", ".inf"],
    "reward.max_failed_fraction": ["0.5", "1", "2"],
    "data.max_prompt_tokens": ["null", "200", "3", "0"],
    "data.template": ["paper", "chat", "'Q: {question}'", "no_placeholder"],
    "reward.function": [
        "tests.train.reward_fns:vowel_fraction",
        "math",
        "tests.train.reward_fns:always_raises",
        "tests.train.reward_fns:returns_nan",
        "tests.train.reward_fns:nope",
        "nope_module_xyz:fn",
    ],
    "trainer.max_bad_steps": ["3", "1", "0"],
    "model.name": ["{tiny}", "nope_model", "./missing/model"],
}

ROWS = [
    json.dumps({"question": "what is 1 plus 2?", "answer": "3"}).encode(),
    json.dumps({"question": "what is 2 plus 2?", "answer": 4}).encode(),
    json.dumps({"question": 7, "answer": "2"}).encode(),
    json.dumps({"answer": "2"}).encode(),
    json.dumps({"question": "  ", "answer": "2"}).encode(),
    json.dumps({"question": "q?", "answer": None}).encode(),
    json.dumps([1, 2]).encode(),
    b"{not json",
    b"\xff\xfe bad bytes",
    b"",
]

HANG_LIMIT_S = 90


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang(f"no result within {HANG_LIMIT_S} s")


def test_any_config_and_data_ends_in_success_or_one_line_error(tiny_model_dir, tmp_path_factory):
    outcomes: list[int] = []

    @settings(max_examples=24, deadline=None, derandomize=True)  # derandomize: the same cases every run
    @given(
        # Up to two keys changed per case (valid or not), so that cases also reach the data, the
        # reward and the training step instead of all stopping at the first bad key.
        choices=st.lists(st.sampled_from([(k, v) for k, vs in CONFIG_VALUES.items() for v in vs]), max_size=2),
        rows=st.lists(st.sampled_from(ROWS), min_size=0, max_size=3),
        good_rows=st.integers(min_value=0, max_value=4),
    )
    def case(choices, rows, good_rows):
        outcomes.append(_run_case(tiny_model_dir, tmp_path_factory.mktemp("case"), choices, rows, good_rows))

    case()
    # A generator that only ever produced config errors, or only successes, would test much less.
    assert 0 in outcomes and 2 in outcomes, outcomes


def _run_case(tiny_model_dir: str, work: Path, choices, rows, good_rows) -> int:
    data = work / "train.jsonl"
    data.write_bytes(b"".join(row + b"\n" for row in [ROWS[0]] * good_rows + rows))
    overrides = tiny_overrides(tiny_model_dir, str(data), str(work / "run"), **{"trainer.total_steps": 1})
    overrides += [f"{key}={value.replace('{tiny}', tiny_model_dir)}" for key, value in choices]
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(HANG_LIMIT_S)
    try:
        result = CliRunner().invoke(app, ["train", *overrides, "rollout.max_sampling_rounds=1"])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    if isinstance(result.exception, _Hang):
        pytest.fail(f"hang: {choices}, rows {rows}")
    if result.exit_code != 0:
        assert result.exit_code == 2, (result.exit_code, result.exception, result.output, choices, rows)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return result.exit_code
