"""The forecasting toy: tokenizer, shipped model, a tiny build (determinism), `forkrl demo --task forecast`."""

from __future__ import annotations

import json
import random

import pytest
from typer.testing import CliRunner

from forkrl.cli import app
from forkrl.tasks.forecast import MatchUp, TraceSettings, forecast_trace, generate_rows
from forkrl.toy.forecast_build import _encode, build_forecast_model, build_forecast_tokenizer
from forkrl.toy.forecast_demo import SHIPPED_FORECAST_MODEL, forecast_sweep_setup
from forkrl.toy.task import BUILD_INFO_FILE


def test_tokenizer_makes_the_forecast_one_token():
    tok = build_forecast_tokenizer()
    text, _ = forecast_trace(MatchUp(44, 51, False), random.Random(0), TraceSettings(confidence=1.0, noise=0.0))
    pieces = tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"])
    assert pieces == ["diff", " ", "-", "7", "\n", "home", " ", "0", "\n", "edge", " ", "-", "7", "\n", "p=", "0.27"]
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert tok.unk_token_id not in tok("rating 40 vs 60 home yes\n1.00 0.00")["input_ids"]


def test_encoded_traces_mark_the_forecast_token():
    tok = build_forecast_tokenizer()
    (seq,) = _encode(tok, generate_rows(1, seed=0), random.Random(0), TraceSettings())
    response = seq.ids[seq.prompt_len :]
    assert response[-1] == tok.eos_token_id and len(seq.choice) == len(response)
    (forecast,) = [t for t, c in zip(response, seq.choice) if c]
    assert tok.convert_ids_to_tokens([forecast])[0].startswith("0.")
    assert response[-2] == forecast


def test_shipped_forecast_model_is_small_and_over_confident():
    for name in ("config.json", "model.safetensors", "tokenizer.json", BUILD_INFO_FILE):
        assert (SHIPPED_FORECAST_MODEL / name).is_file(), name
    assert sum(p.stat().st_size for p in SHIPPED_FORECAST_MODEL.iterdir()) <= 15 * 2**20
    info = json.loads((SHIPPED_FORECAST_MODEL / BUILD_INFO_FILE).read_text())
    assert info["task"] == "forecast" and info["config"]["confidence"] > 1
    ev = info["eval"]
    # Over-confident on held-out games: far from calibrated against the truth, Brier above the limit.
    assert ev["ece_true"] > 0.05 and ev["brier"] > ev["bayes_brier"] and ev["invalid_fraction"] < 0.05


def test_tiny_build_is_deterministic(tmp_path):
    settings = dict(steps=3, num_traces=64, batch_size=16, eval_rows=0, threads=1, log_every=0)
    a = build_forecast_model(tmp_path / "a", seed=5, **settings)
    b = build_forecast_model(tmp_path / "b", seed=5, **settings)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert json.loads((a / BUILD_INFO_FILE).read_text())["config"]["seed"] == 5
    with pytest.raises(FileExistsError):
        build_forecast_model(tmp_path / "a", seed=5, **settings)


def test_forecast_demo_two_steps(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(
        app, ["demo", "--task", "forecast", "--steps", "2", "--eval-problems", "64", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["task"] == "forecast" and report["steps"] == 2 and report["reward"] == "forecast_winrate"
    for when in ("before", "after"):
        figures = report[when]
        assert 0.0 <= figures["ece_true"] <= 1.0 and figures["bayes_brier"] == pytest.approx(
            report["limits"]["bayes_brier"]
        )
        m = figures["murphy"]
        assert m["reliability"] - m["resolution"] + m["uncertainty"] == pytest.approx(m["brier_binned"], abs=1e-12)
    steps = [json.loads(line)["step"] for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    for name in ("reliability.png", "sharpness.png", "reward.png", "forecasts_before.jsonl", "forecasts_after.jsonl"):
        assert (out / name).stat().st_size > 0, name
    assert len((out / "forecasts_after.jsonl").read_text().splitlines()) == 64
    assert "ECE vs true probabilities" in (out / "report.md").read_text()


def test_demo_rejects_an_unknown_task(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--task", "chess", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "countdown or forecast" in result.output


def test_sweep_setup_writes_the_games_once(tmp_path):
    overrides = forecast_sweep_setup(tmp_path, seed=2)
    path, test = tmp_path / "forecast_train_seed_2.jsonl", tmp_path / "forecast_test.jsonl"
    assert overrides == [
        f"model.name={SHIPPED_FORECAST_MODEL}",
        f"data.train_files=[{path.resolve()}]",
        f"data.eval_files=[{test.resolve()}]",
    ]
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 4096 and rows[0]["outcome"] == generate_rows(1, seed=2)[0].outcome
    # the demo's held-out games: test split, the shipped model's eval seed, the same for every seed
    held_out = [json.loads(line) for line in test.read_text().splitlines()]
    assert len(held_out) == 2048 and held_out[0]["true_p"] == generate_rows(1, 1234, "test")[0].matchup.true_probability
    assert forecast_sweep_setup(tmp_path, seed=3)[2] == overrides[2]
    assert forecast_sweep_setup(tmp_path, seed=2) == overrides  # again: the same file is fine
    path.write_text(path.read_text().replace('"outcome": 1', '"outcome": 0', 1))
    with pytest.raises(FileExistsError, match="other games"):
        forecast_sweep_setup(tmp_path, seed=2)
