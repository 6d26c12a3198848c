"""Entropy percentiles over training (paper 1, Fig. 5) from metrics.jsonl or a per-checkpoint table."""

import json
import math

import numpy as np
import pytest

from forkrl.analysis.evolution import load_percentile_table, percentiles_from_run, run_evolution
from forkrl.analysis.runs import RunError, load_run


def percentile_record(step: int) -> dict:
    # Percentile p at step s is (p / 100) · s / 10: easy to check by hand, and p0 is exactly 0
    # (as it often is in real runs), which forces the symlog axis.
    return {"step": step, **{f"entropy_p{p}": p / 100 * step / 10 for p in range(0, 101, 10)}}


def write_metrics(path, records):
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_series_from_metrics(tmp_path):
    records = [percentile_record(s) for s in (1, 2, 3)]
    records[1]["entropy_p50"] = None  # NaN logged as null: missing at that step, not zero
    records[2]["entropy_frac_below_0.01"] = 0.5
    records.insert(1, {"step": 5, "accuracy": 0.2})  # a step without percentiles, out of order
    run = write_metrics(tmp_path / "run", records)

    evo = percentiles_from_run(load_run(run))
    assert evo.x == [1, 2, 3]
    assert sorted(evo.values) == [float(p) for p in range(0, 101, 10)]
    np.testing.assert_allclose(evo.values[80.0], [0.08, 0.16, 0.24])
    assert evo.values[50.0][0] == pytest.approx(0.05)
    assert math.isnan(evo.values[50.0][1])
    np.testing.assert_array_equal(np.isnan(evo.frac_below), [True, True, False])

    summary = run_evolution(run, tmp_path / "out", percentiles=[0, 80, 100])
    assert (tmp_path / "out" / "evolution.png").is_file()
    saved = json.loads((tmp_path / "out" / "evolution.json").read_text())
    assert saved["x"] == [1, 2, 3]
    assert saved["percentiles"]["p100"] == pytest.approx([0.1, 0.2, 0.3])
    assert set(saved["percentiles"]) == {"p0", "p80", "p100"}
    # p80 goes 0.08 -> 0.24: range and change 0.16
    assert summary["summary"]["p80"]["range"] == pytest.approx(0.16)
    assert summary["summary"]["p80"]["change"] == pytest.approx(0.16)


def test_missing_keys_are_named(tmp_path):
    run = write_metrics(tmp_path / "run", [{"step": 1, "entropy": 0.3}])
    with pytest.raises(RunError, match=r"metrics\.jsonl: no entropy percentiles.*entropy_p0"):
        run_evolution(run, tmp_path / "out")
    run = write_metrics(tmp_path / "run2", [percentile_record(1)])
    with pytest.raises(RunError, match=r"metrics\.jsonl: no percentile p55; available: p0, p10"):
        run_evolution(run, tmp_path / "out", percentiles=[55])
    with pytest.raises(RunError, match="no such run directory"):
        run_evolution(tmp_path / "absent", tmp_path / "out")


def test_table_of_checkpoints(tmp_path):
    table = tmp_path / "percentiles.csv"
    table.write_text("checkpoint,p0,p50,entropy_p100\nbase,0.0,0.01,2.5\nstep_100,0.0,0.02,3.0\n")
    evo = load_percentile_table(table)
    assert evo.x_label == "checkpoint" and evo.x == ["base", "step_100"]
    np.testing.assert_allclose(evo.values[100.0], [2.5, 3.0])

    rows = [{"step": 0, "percentiles": {"50": 0.01, "90": 1.0}}, {"step": 50, "percentiles": {"50": 0.02, "90": 1.2}}]
    (tmp_path / "p.json").write_text(json.dumps(rows))
    summary = run_evolution(tmp_path / "p.json", tmp_path / "out")
    assert summary["x_label"] == "step" and summary["points"] == 2
    assert summary["summary"]["p90"]["change"] == pytest.approx(0.2)
