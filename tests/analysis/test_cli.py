"""Every `forkrl analyze` subcommand end to end through the CLI on a tiny model and a tiny run."""

import json

from typer.testing import CliRunner

from forkrl.cli import app
from forkrl.train.trainer import run_training
from tests.train.conftest import tiny_overrides


def _ok(*args):
    result = CliRunner().invoke(app, ["analyze", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_analyze_commands(tiny_model_dir, prompts_file, tmp_path):
    run = tmp_path / "run"
    run_training(None, tiny_overrides(tiny_model_dir, prompts_file, str(run), **{"trainer.total_steps": 3}))
    checkpoint = str(run / "checkpoints" / "step_000003")
    store = str(tmp_path / "store")
    summary = _ok(
        "store",
        "--model",
        tiny_model_dir,
        "--data",
        prompts_file,
        "-k",
        "2",
        "--max-new-tokens",
        "8",
        "--out",
        store,
        "--device",
        "cpu",
    )
    assert summary
    _ok("score", store, "--model", checkpoint, "--name", "trained", "--device", "cpu")
    _ok("entropy", store, "--out", str(tmp_path / "entropy"), "--min-count", "2")
    assert (tmp_path / "entropy" / "responses.html").is_file()
    _ok("overlap", store, "--out", str(tmp_path / "overlap"), "--column", "entropy", "--column", "entropy_trained")
    _ok("shift", store, "--out", str(tmp_path / "shift"), "--before", "entropy", "--after", "entropy_trained")
    _ok("evolution", str(run), "--out", str(tmp_path / "evolution"))
    _ok("law", str(run), "--out", str(tmp_path / "law"))
    _ok("compare", str(run), "--out", str(tmp_path / "compare"))
    _ok(
        "temperature",
        "--model",
        tiny_model_dir,
        "--data",
        prompts_file,
        "--out",
        str(tmp_path / "temp"),
        "--t-high",
        "1.0,1.5",
        "--t-low",
        "1.0",
        "--threshold",
        "0.5",
        "-k",
        "2",
        "--max-new-tokens",
        "6",
        "--reward",
        "tests.train.reward_fns:vowel_fraction",
        "--device",
        "cpu",
    )
    for name in (
        "overlap/overlap.png",
        "shift/shift.png",
        "evolution/evolution.png",
        "law/law.png",
        "compare/compare.png",
        "temp/temperature.png",
        "entropy/entropy_hist.png",
    ):
        assert (tmp_path / name).stat().st_size > 0, name


def test_analyze_bad_input_is_one_clear_line(tmp_path):
    result = CliRunner().invoke(app, ["analyze", "evolution", str(tmp_path / "nope"), "--out", str(tmp_path)])
    assert result.exit_code == 2 and "nope" in result.output
