"""Issue 23, one test (or a few) per numbered defect that the bad-input table (test_bad_input.py) does not
show alone: sweep exports (1), a failed start leaving nothing (3), a full disk during a checkpoint save
(4), checkpoints that never run code (5), and the CLI's import-time side effects (issue 24's share).
The table holds the rest: `analyze score` with a model that does not fit the store (2), the one-line
errors of item 4 and `--jobs 0` (6)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from forkrl.cli import app
from forkrl.train.checkpoint import CheckpointError, list_checkpoints, load_state_file, read_checkpoint
from forkrl.train.trainer import run_training
from tests.cli.helpers import one_error_line, snapshot
from tests.train.conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[2]


def _cli(*args):
    return CliRunner().invoke(app, list(args))


# ---------------------------------------------------------------------------- 1: sweep export


def _sweep(directory: Path, overrides: list[str], seeds: list[int], accuracy: float) -> Path:
    """A finished-looking sweep directory: its record, a report and one result per seed."""
    cell = {"name": "selection.strategy=top", "slug": "selection.strategy=top", "assignments": [["a", "b"]]}
    record = {"config": "cfg.yaml", "overrides": overrides, "setup": None, "cells": [cell], "seeds": seeds}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sweep.json").write_text(json.dumps(record))
    (directory / "summary.md").write_text(f"{len(seeds)} seeds, accuracy {accuracy}\n")
    for seed in seeds:
        run = directory / "selection.strategy=top" / f"seed_{seed}"
        run.mkdir(parents=True, exist_ok=True)
        (run / "sweep_result.json").write_text(json.dumps({"seed": seed, "acc_at_k": accuracy}))
        (run / "metrics.jsonl").write_text('{"step": 1}\n')
    return directory


def test_export_refuses_another_sweep_and_takes_a_newer_state_of_its_own(tmp_path):
    a = _sweep(tmp_path / "A", ["seed=0"], [0], 0.5)
    out = tmp_path / "results"
    assert _cli("sweep", "export", str(a), str(out)).exit_code == 0
    # The same sweep, continued (one more seed, a new report): the export takes it.
    _sweep(a, ["seed=0"], [0, 1], 0.6)
    result = _cli("sweep", "export", str(a), str(out))
    assert result.exit_code == 0, result.output
    assert (out / "summary.md").read_text() == "2 seeds, accuracy 0.6\n"
    assert (out / "selection.strategy=top" / "seed_1" / "sweep_result.json").is_file()
    before = snapshot(out)
    # Another sweep (other overrides) into the same folder used to replace sweep.json and the report.
    b = _sweep(tmp_path / "B", ["seed=1"], [0], 0.9)
    line = one_error_line(_cli("sweep", "export", str(b), str(out)))
    assert f"{out} holds the results of another sweep" in line and str(b / "sweep.json") in line
    assert "overrides = ['seed=0']" in line and "overrides = ['seed=1']" in line
    # An older state of the same sweep (seed 1 missing) would put an older report over a newer one.
    old = _sweep(tmp_path / "A_old", ["seed=0"], [0], 0.5)
    line = one_error_line(_cli("sweep", "export", str(old), str(out)))
    assert f"{out} holds more of this sweep than {old} (seed 1)" in line
    assert snapshot(out) == before


# ---------------------------------------------------------------------------- 3: a failed start


def test_a_start_that_fails_late_leaves_nothing_behind(tiny_model_dir, prompts_file, tmp_path, monkeypatch):
    from forkrl.train.logging import RunLogger

    def logger_fails(run_dir, *args, **kwargs):
        RunLogger(run_dir, *args, **kwargs).close()  # metrics.jsonl and samples.jsonl, opened empty
        (Path(run_dir) / "wandb").mkdir()  # as wandb.init does before it fails
        raise RuntimeError("wandb.init: no API key configured")

    monkeypatch.setattr("forkrl.train.trainer.RunLogger", logger_fails)
    run = tmp_path / "run"
    overrides = tiny_overrides(tiny_model_dir, prompts_file, str(run), **{"trainer.total_steps": 1})
    with pytest.raises(RuntimeError, match="no API key"):
        run_training(None, overrides)
    # It used to leave config.yaml, metrics.jsonl and samples.jsonl: "not empty" for a rerun, "no
    # checkpoint" for --resume.
    assert not run.exists()
    assert not list(tmp_path.glob(".run.lock.owner"))
    # --overwrite moved the earlier run aside before the failure: it is put back where it was.
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(RuntimeError, match="no API key"):
        run_training(None, overrides, overwrite=True)
    assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n' and not list(tmp_path.glob("run.old-*"))
    monkeypatch.undo()
    # The same command now just works.
    (run / "metrics.jsonl").unlink()
    assert run_training(None, overrides)
    assert [p.name for p in list_checkpoints(run)] == ["step_000001"]


def test_a_run_that_fails_in_step_one_can_be_started_again(tiny_model_dir, prompts_file, tmp_path):
    run = tmp_path / "run"
    fails = tiny_overrides(
        tiny_model_dir,
        prompts_file,
        str(run),
        **{"reward.function": "tests.train.reward_fns:always_raises", "trainer.total_steps": 1},
    )
    one_error_line(_cli("train", *fails))
    assert not run.exists()  # nothing logged, nothing saved: nothing to keep
    works = tiny_overrides(tiny_model_dir, prompts_file, str(run), **{"trainer.total_steps": 1})
    assert _cli("train", *works).exit_code == 0


# ---------------------------------------------------------------------------- 4: a full disk while saving


def test_full_disk_during_a_checkpoint_save(tiny_model_dir, prompts_file, tmp_path, monkeypatch):
    common = {"trainer.save_every": 1, "trainer.total_steps": 2}
    straight = tmp_path / "straight"
    run_training(None, tiny_overrides(tiny_model_dir, prompts_file, str(straight), **common))
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == 2:  # the disk fills up while step 2 is written
            f.write(b"PK\x03\x04 half a zip")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    run = tmp_path / "run"
    line = one_error_line(_cli("train", *tiny_overrides(tiny_model_dir, prompts_file, str(run), **common)))
    assert "no space left on device" in line and "step_000002 not saved" in line
    assert f"forkrl train --resume {run}" in line
    # Step 1's checkpoint is whole, and the half-written step 2 is gone.
    assert [p.name for p in list_checkpoints(run)] == ["step_000001"]
    assert not list((run / "checkpoints").glob(".tmp-*"))
    read_checkpoint(run / "checkpoints" / "step_000001")
    monkeypatch.undo()
    # Space freed: the resume ends where the uninterrupted run did, bit for bit.
    assert _cli("train", "--resume", str(run)).exit_code == 0
    final, expected = (load_file(str(d / "checkpoints" / "step_000002" / "model.safetensors")) for d in (run, straight))
    assert final.keys() == expected.keys()
    for key, value in final.items():
        assert torch.equal(value, expected[key]), key


# ---------------------------------------------------------------------------- 5: checkpoints never run code


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_trainer_state_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    file = tmp_path / "trainer_state.pt"
    torch.save({"step": 1, "rng": _RunsCode(marker)}, file)
    with pytest.raises(CheckpointError, match=r"trainer_state\.pt: refused: loading it would need posix\.system"):
        load_state_file(file)
    assert not marker.exists()  # torch.load(weights_only=False) used to run it


def test_checkpoints_of_older_versions_still_load(tmp_path):
    """Before this change numpy's RNG state went in as numpy's own tuple (an ndarray inside): what
    rebuilds that array is allowed, nothing else."""
    from forkrl.train.checkpoint import restore_rng_state

    np.random.seed(7)
    legacy = {"python": __import__("random").getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    file = tmp_path / "trainer_state.pt"
    torch.save({"rng": legacy}, file)
    expected = np.random.rand(3)
    np.random.seed(0)
    restore_rng_state(load_state_file(file)["rng"])
    np.testing.assert_array_equal(np.random.rand(3), expected)


# ---------------------------------------------------------------------------- issue 24: imports


def _fresh_python(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO)])
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)


def test_importing_the_cli_does_no_work():
    code = (
        "import os, sys, time\n"
        "def no_sleep(s): raise AssertionError('slept at import')\n"
        "time.sleep = no_sleep\n"
        "env = dict(os.environ)\n"
        "import forkrl.cli\n"
        "assert dict(os.environ) == env, 'the environment changed at import'\n"
        "assert 'torch' not in sys.modules\n"
    )
    result = _fresh_python(code)
    assert result.returncode == 0, result.stderr


def test_the_analysis_and_sweep_commands_do_not_import_the_root_cli():
    code = (
        "import sys\n"
        "import forkrl.analysis.cli, forkrl.sweep.cli\n"
        "assert 'forkrl.cli' not in sys.modules and 'forkrl.train.trainer' not in sys.modules\n"
        "from forkrl.errors import ConfigError, TrainingInterrupted, TrainingStopped, user_errors\n"
        "from forkrl.train.trainer import TrainingStopped as Same\n"
        "from forkrl.config import ConfigError as SameConfig\n"
        "assert Same is TrainingStopped and SameConfig is ConfigError\n"
    )
    result = _fresh_python(code)
    assert result.returncode == 0, result.stderr
