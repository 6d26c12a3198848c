"""forkrl.analysis.calibration: ECE, Brier, log loss, the Murphy decomposition (hand-computed), figures, CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from forkrl.analysis.calibration import (
    CalibrationInputError,
    brier_score,
    calibration_bins,
    calibration_summary,
    expected_calibration_error,
    load_forecasts,
    log_loss,
    murphy_decomposition,
    run_calibration,
)

# Five forecasts, two equal-width bins. Bin 0 ([0, 0.5)): 0.1 (y 0), 0.3 (y 1): mean forecast 0.2,
# win rate 1/2. Bin 1: 0.6 (y 1), 0.8 (y 1), 0.8 (y 0): mean forecast 2.2/3 = 0.7333, win rate 2/3.
# Overall win rate 3/5.
P = [0.1, 0.3, 0.6, 0.8, 0.8]
Y = [0, 1, 1, 1, 0]


def test_bins_and_ece_by_hand():
    table = calibration_bins(P, Y, bins=2)
    assert [b["count"] for b in table] == [2, 3]
    assert [b["mean_forecast"] for b in table] == pytest.approx([0.2, 2.2 / 3])
    assert [b["mean_target"] for b in table] == pytest.approx([0.5, 2 / 3])
    # ECE = 2/5 · |0.2 − 0.5| + 3/5 · |0.7333 − 0.6667| = 0.12 + 0.04
    assert expected_calibration_error(P, Y, bins=2) == pytest.approx(0.16)
    # Ten bins: 0.1 | 0.3 | 0.6 | 0.8, 0.8 → (0.1 + 0.7 + 0.4 + 2 · 0.3) / 5
    assert expected_calibration_error(P, Y, bins=10) == pytest.approx(1.8 / 5)
    # Against true probabilities: the same formula with mean true probabilities per bin.
    assert expected_calibration_error([0.6, 0.8], [0.5, 0.9], bins=10) == pytest.approx(0.1)


def test_brier_and_log_loss_by_hand():
    assert brier_score(P, Y) == pytest.approx((0.01 + 0.49 + 0.16 + 0.04 + 0.64) / 5)  # 0.268
    assert log_loss([0.9, 0.2], [1, 0]) == pytest.approx(-(math.log(0.9) + math.log(0.8)) / 2)  # 0.164252
    assert log_loss([1.0], [0]) == pytest.approx(math.log(1000))  # clipped to 0.999: 6.9078, not inf
    with pytest.raises(ValueError):
        brier_score([0.5], [1, 0])


def test_murphy_decomposition_by_hand():
    m = murphy_decomposition(P, Y, bins=2)
    # REL = 2/5 · 0.3² + 3/5 · (0.7333 − 0.6667)² = 0.036 + 0.0026667
    assert m.reliability == pytest.approx(0.036 + 0.6 / 225)
    # RES = 2/5 · (0.5 − 0.6)² + 3/5 · (0.6667 − 0.6)² = 0.004 + 0.0026667
    assert m.resolution == pytest.approx(0.004 + 0.6 / 225)
    assert m.uncertainty == pytest.approx(0.24)  # 0.6 · 0.4
    # Binned forecasts 0.2, 0.2, 0.7333 × 3: (0.04 + 0.64 + 2 · 0.071111 + 0.537778) / 5 = 1.36 / 5
    assert m.brier_binned == pytest.approx(0.272)
    assert m.reliability - m.resolution + m.uncertainty == pytest.approx(m.brier_binned, abs=1e-15)
    assert m.brier == pytest.approx(0.268) and m.within_bin == pytest.approx(-0.004)


def test_murphy_with_one_bin_per_value_decomposes_the_raw_brier():
    m = murphy_decomposition(P, Y, bins=0)
    # Values 0.1 {0}, 0.3 {1}, 0.6 {1}, 0.8 {1, 0}: REL = (0.01 + 0.49 + 0.16 + 2 · 0.09) / 5,
    # RES = (0.36 + 0.16 + 0.16 + 2 · 0.01) / 5.
    assert m.reliability == pytest.approx(0.168) and m.resolution == pytest.approx(0.14)
    assert m.brier_binned == pytest.approx(0.268) and m.within_bin == pytest.approx(0.0, abs=1e-15)
    with pytest.raises(ValueError, match="0/1 outcomes"):
        murphy_decomposition([0.5], [0.5])


def test_identity_holds_on_random_forecasts():
    rng = np.random.default_rng(0)
    p = rng.random(1000)
    y = (rng.random(1000) < p**1.5).astype(float)
    for bins in (1, 5, 10, 37, 0):
        m = murphy_decomposition(p, y, bins)
        assert m.reliability - m.resolution + m.uncertainty == pytest.approx(m.brier_binned, abs=1e-12)
        assert m.brier_binned + m.within_bin == pytest.approx(brier_score(p, y), abs=1e-12)


def test_summary_with_true_probabilities():
    s = calibration_summary([0.6, 0.8], [1, 0], true_p=[0.5, 0.9], bins=10)
    assert s["bayes_brier"] == pytest.approx((0.25 + 0.09) / 2)  # mean q(1 − q) = 0.17
    assert s["mse_to_true"] == pytest.approx(0.01) and s["ece_true"] == pytest.approx(0.1)
    assert s["expected_brier"] == pytest.approx(0.18)  # E[(p − y)²] = (p − q)² + q(1 − q), averaged
    assert s["brier"] == pytest.approx((0.16 + 0.64) / 2)
    assert s["sharpness"] == pytest.approx(0.01)  # variance of the forecasts


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_load_forecasts_schema_and_errors(tmp_path):
    f = _write(
        tmp_path / "f.jsonl",
        [
            {"completion": "edge 3\np=0.1", "outcome": 0, "true_p": 0.2},
            {"p": 0.3, "completion": "ignored: p is read first", "outcome": "1", "true_p": 0.4},
            {"text": "no forecast", "outcome": 1, "true_p": 0.5},
            {"completion": "\\boxed{0.6}", "outcome": True, "true_p": 0.6},
        ],
    )
    data = load_forecasts(f)
    assert data.p.tolist() == [0.1, 0.3, 0.6] and data.y.tolist() == [0, 1, 1]
    assert data.true_p.tolist() == [0.2, 0.4, 0.6] and data.num_rows == 4 and data.num_invalid == 1
    bad = _write(tmp_path / "bad.jsonl", [{"p": 0.3, "outcome": 1}, {"p": 0.3, "outcome": 0.5}])
    with pytest.raises(CalibrationInputError, match=r"bad.jsonl: line 2: field 'outcome': outcome must be 0 or 1"):
        load_forecasts(bad)
    none = _write(tmp_path / "none.jsonl", [{"p": 0.3}])
    with pytest.raises(CalibrationInputError, match=r"none.jsonl: line 1: no outcome field 'outcome'"):
        load_forecasts(none)
    with pytest.raises(CalibrationInputError, match=r"line 1: field 'p' must be a probability"):
        load_forecasts(_write(tmp_path / "p.jsonl", [{"p": 1.5, "outcome": 1}]))


def test_run_calibration_writes_figures(tmp_path):
    f = _write(tmp_path / "f.jsonl", [{"p": p, "outcome": y} for p, y in zip(P, Y)])
    s = run_calibration(f, tmp_path / "out", bins=2)
    assert s["brier"] == pytest.approx(0.268) and s["ece"] == pytest.approx(0.16) and "ece_true" not in s
    for name in ("calibration.json", "reliability.png", "sharpness.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    stored = json.loads((tmp_path / "out" / "calibration.json").read_text())
    assert stored["murphy"]["brier_binned"] == pytest.approx(0.272) and len(stored["table"]) == 2


def test_command_prints_the_summary_and_reports_errors_in_one_line(tmp_path):
    from forkrl.analysis.cli import calibration_command

    app = typer.Typer()
    app.command("calibration")(calibration_command)
    app.command("other")(lambda: None)  # two commands: typer then expects the command name
    f = _write(tmp_path / "f.jsonl", [{"p": p, "outcome": y} for p, y in zip(P, Y)])
    result = CliRunner().invoke(app, ["calibration", str(f), "--bins", "2", "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["murphy"]["reliability"] == pytest.approx(0.036 + 0.6 / 225)
    bad = _write(tmp_path / "bad.jsonl", [{"p": 0.3}])
    result = CliRunner().invoke(app, ["calibration", str(bad)])
    assert result.exit_code == 2 and "error: " in result.output and "no outcome field 'outcome'" in result.output
