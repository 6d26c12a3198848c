"""`forkrl sweep` end to end on the tiny model: a 2 × 2 sweep with --jobs 2 killed midway and re-run gives the
clean sweep's report without re-running finished runs; the same runs through submitit's local executor."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from forkrl.config import config_from_dict, dump_config
from forkrl.sweep.run import plan_from_options, run_sweep
from tests.train.conftest import tiny_overrides

CELLS = ["selection.strategy=top", "selection.strategy=all"]


@pytest.fixture(scope="module")
def sweep_config(tiny_model_dir, prompts_file, tmp_path_factory):
    """Two steps of 2 prompts × 4 responses, a checkpoint after each step, a 2-sample held-out eval."""
    extra = {
        "data.eval_files": f"[{prompts_file}]",
        "trainer.eval_samples": 2,
        "trainer.eval_max_new_tokens": 6,
        "trainer.save_every": 1,
    }
    overrides = [o for o in tiny_overrides(tiny_model_dir, prompts_file, "unused", **extra) if "output_dir" not in o]
    path = tmp_path_factory.mktemp("sweep_config") / "tiny.yaml"
    path.write_text(dump_config(config_from_dict({}, overrides)))
    return str(path)


def _args(config, out, seeds="0,1", launcher=None):
    return dict(
        config=config,
        grid=[f"selection.strategy={','.join(c.split('=')[1] for c in CELLS)}"],
        cells=[],
        seeds=seeds,
        out=str(out),
        overrides=[],
        baseline="selection.strategy=all",
        setup=None,
        jobs=2,
        launcher=launcher,
    )


def _numbers(summary):
    """What must not depend on how the sweep got there: per-run Acc/Len, intervals, paired differences."""
    rows = {}
    for row in summary["cells"]:
        rows[row["name"]] = {
            "acc": row["acc_at_k"]["values"],
            "len": row["len_at_k"]["values"],
            "acc_ci": (row["acc_at_k"]["mean"], row["acc_at_k"]["half_width"]),
            "vs": {m: (v["mean"], v["half_width"]) for m, v in row.get("vs_baseline", {}).items()},
        }
    return {"cells": rows, "base": summary["base_model"]["acc_at_k"]["values"], "missing": summary["missing"]}


@pytest.fixture(scope="module")
def clean_sweep(sweep_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "sweep"
    summary = run_sweep(plan_from_options(**_args(sweep_config, out)), echo=lambda *a: None)
    assert summary["failed"] == [] and summary["missing"] == []
    return out, json.loads((out / "summary.json").read_text())


def _result_files(out: Path) -> list[Path]:
    return sorted(out.glob("selection.strategy=*/seed_*/sweep_result.json"))


def test_killed_sweep_resumes_without_rerunning_finished_runs(clean_sweep, sweep_config, tmp_path):
    clean_out, clean = clean_sweep
    out = tmp_path / "sweep"
    a = _args(sweep_config, out)
    cmd = [sys.executable, "-m", "forkrl.cli", "sweep", sweep_config, "--grid", a["grid"][0], "--seeds", "0,1"]
    cmd += ["--jobs", "2", "--baseline", a["baseline"], "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not _result_files(out) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # the sweep passes it on; its running trainers checkpoint and stop
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 130, output
    finished = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in _result_files(out)}
    assert 1 <= len(finished) < 4, output
    logs = {p: p.read_text().count("\n==== ") for p in out.glob("selection.strategy=*/seed_*.log")}

    summary = run_sweep(plan_from_options(**a), echo=lambda *a: None)

    assert summary["failed"] == []
    for path, (mtime, content) in finished.items():  # finished runs were not touched, nor started again
        assert path.stat().st_mtime_ns == mtime and path.read_bytes() == content
        log = path.parent.with_suffix(".log")
        assert log.read_text().count("\n==== ") == logs[log]
    assert len(_result_files(out)) == 4
    assert _numbers(json.loads((out / "summary.json").read_text())) == _numbers(clean)
    assert (out / "summary.md").read_text().count("| `selection.strategy=") == 2
    assert all((out / f"figures/{k}.png").stat().st_size > 0 for k in ("accuracy", "entropy", "kept_frac"))

    # a third invocation with one more cell adds it and leaves the four finished runs alone
    before = {p: p.stat().st_mtime_ns for p in _result_files(out)}
    more = run_sweep(
        plan_from_options(**{**a, "grid": ["selection.strategy=top,all,random"], "seeds": "0"}),
        echo=lambda *a: None,
    )
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert [c["name"] for c in more["cells"]] == [*CELLS, "selection.strategy=random"]
    assert more["missing"] == ["selection.strategy=random/seed_1"]


def test_submitit_local_executor_gives_the_local_launchers_runs(clean_sweep, sweep_config, tmp_path):
    clean_out, clean = clean_sweep
    out = tmp_path / "sweep"
    summary = run_sweep(
        plan_from_options(**_args(sweep_config, out, seeds="0", launcher="submitit")),
        cluster="local",
        echo=lambda *a: None,
    )
    assert summary["failed"] == [] and summary["missing"] == []
    assert list((out / "submitit").glob("*_result.pkl")), "the runs did not go through submitit"
    for cell in CELLS:
        ours = json.loads((out / cell / "seed_0" / "sweep_result.json").read_text())
        theirs = json.loads((clean_out / cell / "seed_0" / "sweep_result.json").read_text())
        assert (ours["acc_at_k"], ours["len_at_k"]) == (theirs["acc_at_k"], theirs["len_at_k"])
    config = yaml.safe_load((out / CELLS[0] / "seed_0" / "config.yaml").read_text())
    assert config["selection"]["strategy"] == "top" and config["seed"] == 0
    assert config["output_dir"] == os.fspath((out / CELLS[0] / "seed_0").resolve())


def test_exported_results_continue_as_a_sweep_without_run_directories(clean_sweep, sweep_config, tmp_path):
    """`forkrl sweep export`: what a repository commits (no checkpoints) rebuilds the same report, and a
    sweep started from it trains only the runs it lacks."""
    from typer.testing import CliRunner

    from forkrl.cli import app
    from forkrl.sweep.report import write_report

    clean_out, clean = clean_sweep
    exported = tmp_path / "results"
    result = CliRunner().invoke(app, ["sweep", "export", str(clean_out), str(exported)])
    assert result.exit_code == 0, result.output
    assert not list(exported.rglob("*.safetensors")) and not list(exported.rglob("checkpoints"))
    assert len(list(exported.glob("selection.strategy=*/seed_*/sweep_result.json"))) == 4
    write_report(exported)
    assert _numbers(json.loads((exported / "summary.json").read_text())) == _numbers(clean)
    # drop one run's result: continuing from the export trains that run only
    dropped = exported / "selection.strategy=top" / "seed_1"
    for f in dropped.rglob("*"):
        if f.is_file():
            f.unlink()
    kept = {p: p.read_bytes() for p in _result_files(exported)}
    summary = run_sweep(plan_from_options(**_args(sweep_config, exported)), echo=lambda *a: None)
    assert summary["failed"] == [] and summary["missing"] == []
    assert all(p.read_bytes() == content for p, content in kept.items())
    assert _numbers(json.loads((exported / "summary.json").read_text())) == _numbers(clean)
