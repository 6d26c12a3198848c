"""Issue 13: nothing lost, nothing hangs, nothing silently wrong.

One test (or a few) per numbered defect of the issue: run directories reused silently (1), no
lock (2), a reward stuck in C code (3), runs that train nothing exiting 0 (4), a corrupt newest
checkpoint blocking resume (5), and user errors as late tracebacks (6). Tiny CPU runs throughout.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from forkrl.cli import app
from forkrl.tasks.data import PromptSampler
from forkrl.train.checkpoint import list_checkpoints, save_checkpoint
from forkrl.train.trainer import TrainingStopped, run_training
from tests.train.conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[2]


def _train(*args):
    return CliRunner().invoke(app, ["train", *args])


def _start_train(args: list[str]) -> subprocess.Popen:
    """`forkrl train ARGS` in a child process (1 thread), its output captured as text."""
    return subprocess.Popen(
        [sys.executable, "-m", "forkrl.cli", "train", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def _steps(run: Path, name: str = "metrics.jsonl") -> list[int]:
    return [json.loads(line)["step"] for line in (run / name).read_text().splitlines()]


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint / "model.safetensors"))


def _assert_one_line_error(result, *fragments: str) -> str:
    """Exit code 2, one `error:` line on stderr naming every fragment, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


# ---------------------------------------------------------------------------- 1: run directories


def test_new_run_refuses_a_used_run_directory(tiny_model_dir, prompts_file, tmp_path):
    run = tmp_path / "A"
    first = tiny_overrides(tiny_model_dir, prompts_file, str(run), **{"trainer.save_every": 1})
    assert _train(*first).exit_code == 0
    config_before = (run / "config.yaml").read_text()
    # The second run (other seed, fewer steps) used to append to metrics.jsonl, replace
    # config.yaml and let checkpoint rotation delete its own checkpoints.
    result = _train(*first, "seed=3", "trainer.total_steps=1")
    _assert_one_line_error(result, str(run), "is not empty", "--resume", "--overwrite")
    assert _steps(run) == [1, 2]
    assert (run / "config.yaml").read_text() == config_before
    assert [p.name for p in list_checkpoints(run)] == ["step_000001", "step_000002"]


def test_overwrite_moves_the_old_run_aside(tiny_model_dir, prompts_file, tmp_path):
    run = tmp_path / "A"
    assert _train(*tiny_overrides(tiny_model_dir, prompts_file, str(run))).exit_code == 0
    old_weights = _weights(run / "checkpoints" / "step_000002")
    result = _train(*tiny_overrides(tiny_model_dir, prompts_file, str(run)), "seed=3", "--overwrite")
    assert result.exit_code == 0, result.output
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("A.old-")]
    assert f"moved the previous contents of {run} to {aside}" in result.stderr
    # The old run is whole where it was moved; the new one starts from step 1 with its own config.
    assert _steps(aside) == [1, 2] and _steps(run) == [1, 2]
    for key, value in _weights(aside / "checkpoints" / "step_000002").items():
        assert torch.equal(value, old_weights[key])
    assert "seed: 3" in (run / "config.yaml").read_text() and "seed: 0" in (aside / "config.yaml").read_text()


def test_a_failed_start_writes_nothing(tiny_model_dir, prompts_file, tmp_path):
    no_tokenizer = tmp_path / "model_without_tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes((Path(tiny_model_dir) / name).read_bytes())
    run = tmp_path / "run"
    result = _train(*tiny_overrides(str(no_tokenizer), prompts_file, str(run)))
    _assert_one_line_error(result, "model.name", str(no_tokenizer), "has no tokenizer")
    assert not run.exists()  # no config.yaml for a later --resume to pick up
    # A resume whose override fails validation leaves the run's config as it was.
    assert _train(*tiny_overrides(tiny_model_dir, prompts_file, str(run))).exit_code == 0
    config = (run / "config.yaml").read_text()
    result = _train("--resume", str(run), "reward.function=tests.train.reward_fns:no_such_fn")
    _assert_one_line_error(result, "reward.function", "no_such_fn")
    assert (run / "config.yaml").read_text() == config and _steps(run) == [1, 2]


def test_resume_refuses_a_config_file_or_another_output_dir(tiny_model_dir, prompts_file, tmp_path):
    run = tmp_path / "run"
    assert _train(*tiny_overrides(tiny_model_dir, prompts_file, str(run))).exit_code == 0
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("seed: 5\n")
    _assert_one_line_error(_train(str(recipe), "--resume", str(run)), "give no config file", str(recipe))
    _assert_one_line_error(
        _train("--resume", str(run), f"output_dir={tmp_path / 'elsewhere'}"), "stays in its directory"
    )
    # Overrides on the saved config are applied and reported; the old config.yaml is kept aside.
    result = _train("--resume", str(run), "trainer.total_steps=3")
    assert result.exit_code == 0, result.output
    assert "resume: overrides change trainer.total_steps 2 -> 3" in result.stdout
    assert _steps(run) == [1, 2, 3]
    (old_config,) = run.glob("config.yaml.old-*")
    assert "total_steps: 2" in old_config.read_text() and "total_steps: 3" in (run / "config.yaml").read_text()


# ---------------------------------------------------------------------------- 2: the lock


def test_concurrent_train_into_one_directory(tiny_model_dir, prompts_file, tmp_path):
    run = tmp_path / "run"
    args = tiny_overrides(
        tiny_model_dir,
        prompts_file,
        str(run),
        **{
            "reward.function": "tests.train.reward_fns:slow_vowel_fraction",
            "trainer.total_steps": 6,
            "trainer.save_every": 2,
        },
    )
    first = _start_train(args)
    try:
        owner = tmp_path / ".run.lock.owner"
        deadline = time.monotonic() + 120
        while not owner.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert owner.exists(), first.communicate()
        started = time.monotonic()
        second = _train(*args, "seed=1")
        assert time.monotonic() - started < 5  # at once, not after loading a model
        _assert_one_line_error(second, f"'{run}' is in use by another forkrl run", f"PID {first.pid}", ".run.lock")
        out, err = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, err
    # The first run's metrics and checkpoints are its own, whole.
    assert _steps(run) == [1, 2, 3, 4, 5, 6]
    assert [p.name for p in list_checkpoints(run)] == ["step_000004", "step_000006"]
    assert "seed: 0" in (run / "config.yaml").read_text()
    assert not owner.exists()  # released on exit


def test_a_save_removes_only_its_own_or_dead_processes_temp_dirs(tmp_path):
    from tests.train.test_checkpoint import _parts, _state

    model, tokenizer, optimizer, scheduler = _parts(seed=0)
    root = tmp_path / "checkpoints"
    root.mkdir()
    host = socket.gethostname()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    live_other = root / f".tmp-step_000005-{host}-{os.getppid()}"  # a live process that is not us
    other_host = root / ".tmp-step_000005-some-other-host-123"
    dead_here = root / f".tmp-step_000005-{host}-{dead.stdout.strip()}"
    for tmp in (live_other, other_host, dead_here):
        tmp.mkdir()
    save_checkpoint(tmp_path, 1, model, tokenizer, _state(optimizer, scheduler, {}))
    assert live_other.is_dir() and other_host.is_dir()  # another writer's save in progress is left alone
    assert not dead_here.exists()  # left by a process killed mid-save


# ---------------------------------------------------------------------------- 3: a reward stuck in C code


def test_reward_stuck_in_c_code_is_killed_at_the_timeout(tiny_model_dir, prompts_file, tmp_path):
    timeout_s, workers = 0.5, min(4, os.cpu_count() or 1)
    overrides = tiny_overrides(
        tiny_model_dir,
        prompts_file,
        str(tmp_path / "run"),
        **{
            "reward.function": "tests.train.reward_fns:stuck_in_c_on_first_prompt",
            "reward.timeout_s": timeout_s,
            "rollout.max_sampling_rounds": 1,
            "trainer.total_steps": 2,
        },
    )
    threads_before = threading.active_count()
    run_training(None, overrides)  # used to make no progress for minutes
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # Seed 0 draws prompts [4, 0] in step 1 and [7, 3] in step 2 (each with 4 responses).
    assert PromptSampler(8, seed=0).next_batch(4) == [4, 0, 7, 3]
    assert [r["reward_timeouts"] for r in records] == [4, 0]
    # The 4 stuck calls run `workers` at a time, each killed at the limit; the slack covers
    # starting the worker processes on a loaded 2-core machine.
    assert records[0]["reward_s"] < timeout_s * math.ceil(4 / workers) + 5.0, records[0]
    assert records[1]["reward_s"] < 5.0, records[1]  # replaced workers, nothing left spinning
    # Nothing left running: no spinning threads, no worker processes.
    import multiprocessing

    assert threading.active_count() <= threads_before
    assert not [p for p in multiprocessing.active_children() if p.name == "forkrl-reward"]


# ---------------------------------------------------------------------------- 4: runs that cannot learn


def test_steps_without_a_trainable_group_stop_the_run(tiny_model_dir, prompts_file, tmp_path):
    run = tmp_path / "run"
    overrides = tiny_overrides(
        tiny_model_dir,
        prompts_file,
        str(run),
        **{
            "reward.function": "tests.train.reward_fns:constant_one",
            "trainer.max_bad_steps": 2,
            "trainer.total_steps": 5,
        },
    )
    result = _train(*overrides)
    _assert_one_line_error(result, "2 consecutive training steps had no trainable group", "trainer.max_bad_steps = 2")
    assert _steps(run) == [1, 2]


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "inf"])
def test_config_rejects_non_finite_numbers(tiny_model_dir, prompts_file, tmp_path, value):
    result = _train(*tiny_overrides(tiny_model_dir, prompts_file, str(tmp_path / "run")), f"optim.lr={value}")
    _assert_one_line_error(result, "optim.lr: expected a finite number")
    assert not (tmp_path / "run").exists()


def test_nan_weights_are_never_checkpointed(tiny_model_dir, prompts_file, tmp_path, monkeypatch):
    real_step = torch.optim.AdamW.step

    def poisoned_step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(float("nan"))  # finite gradient, NaN weights
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned_step)
    run = tmp_path / "run"
    with pytest.raises(TrainingStopped, match="the weights hold NaN/inf after step 1 and were not checkpointed"):
        run_training(None, tiny_overrides(tiny_model_dir, prompts_file, str(run), **{"trainer.total_steps": 1}))
    assert list_checkpoints(run) == []


# ---------------------------------------------------------------------------- 5: corrupt checkpoints


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("broken", ["model.safetensors", "trainer_state.pt"])
def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tiny_model_dir, prompts_file, tmp_path, broken):
    common = {"trainer.save_every": 1, "trainer.keep_checkpoints": 3}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_training(
        None, tiny_overrides(tiny_model_dir, prompts_file, str(straight), **common, **{"trainer.total_steps": 4})
    )
    run_training(
        None, tiny_overrides(tiny_model_dir, prompts_file, str(resumed), **common, **{"trainer.total_steps": 3})
    )
    bad = resumed / "checkpoints" / "step_000003" / broken
    _truncate(bad)
    result = _train("--resume", str(resumed), "trainer.total_steps=4")
    assert result.exit_code == 0, result.output
    assert f"warning: corrupt checkpoint skipped: {bad}" in result.stderr
    assert "resuming from" in result.stderr and "step_000002" in result.stderr
    # Steps 3 and 4 were redone from step 2: the same weights as the straight run, bit for bit.
    assert _steps(resumed) == [1, 2, 3, 4]
    a, b = _weights(straight / "checkpoints" / "step_000004"), _weights(resumed / "checkpoints" / "step_000004")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The corrupt checkpoint is kept aside for inspection, out of the rotation.
    assert len(list((resumed / "checkpoints").glob("step_000003.old-*"))) == 1


def test_resume_from_a_chosen_step_and_all_corrupt(tiny_model_dir, prompts_file, tmp_path):
    run = tmp_path / "run"
    run_training(None, tiny_overrides(tiny_model_dir, prompts_file, str(run), **{"trainer.save_every": 1}))
    result = _train("--resume", str(run / "checkpoints" / "step_000001"))
    assert result.exit_code == 0, result.output
    assert _steps(run) == [1, 2]
    # the abandoned step 2 (its checkpoint and its metrics record) is kept, not deleted
    assert len(list((run / "checkpoints").glob("step_000002.old-*"))) == 1
    (dropped,) = run.glob("metrics.after_step_000001.old-*.jsonl")
    assert [json.loads(line)["step"] for line in dropped.read_text().splitlines()] == [2]
    for checkpoint in list_checkpoints(run):
        _truncate(checkpoint / "model.safetensors")
    _assert_one_line_error(_train("--resume", str(run)), "every checkpoint is corrupt", "truncated")
    _assert_one_line_error(_train("--resume", str(run / "checkpoints" / "step_000009")), "no such checkpoint")


# ---------------------------------------------------------------------------- 6: user errors, early, one line


BAD_DATA = {
    "empty.jsonl": (b"", "file is empty"),
    "bad_json.jsonl": (b'{"question": "1+1", "answer": "2"}\n{"question": oops}\n', "line 2: invalid JSON"),
    "no_field.jsonl": (b'{"q": "1+1", "answer": "2"}\n', "line 1: row has no question field 'question'"),
    "latin1.jsonl": ('{"question": "caf\xe9", "answer": "2"}\n'.encode("latin-1"), "line 1: not valid UTF-8"),
}


@pytest.mark.parametrize("name", sorted(BAD_DATA))
def test_data_errors_are_one_line_before_the_model_loads(tiny_model_dir, tmp_path, monkeypatch, name):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr("forkrl.train.setup.load_policy", no_model)
    content, expected = BAD_DATA[name]
    data = tmp_path / name
    data.write_bytes(content)
    result = _train(*tiny_overrides(tiny_model_dir, str(data), str(tmp_path / "run")))
    _assert_one_line_error(result, str(data), expected)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("data.template=no placeholder", "data.template = 'no placeholder'"),
        ("reward.function=nope_module_xyz:fn", "reward.function = 'nope_module_xyz:fn': module"),
        ("model.name=nope_model", "model path 'nope_model' does not exist"),
        ("model.name=./no/such/dir", "model path './no/such/dir' does not exist"),
    ],
)
def test_setup_errors_are_one_line_before_the_model_loads(
    tiny_model_dir, prompts_file, tmp_path, monkeypatch, override, expected
):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr("forkrl.train.setup.load_policy", no_model)
    started = time.monotonic()
    result = _train(*tiny_overrides(tiny_model_dir, prompts_file, str(tmp_path / "run")), override)
    _assert_one_line_error(result, expected)
    assert time.monotonic() - started < 10  # a local-looking name is never sent to the Hub


def test_debug_shows_the_traceback(tiny_model_dir, tmp_path):
    data = tmp_path / "empty.jsonl"
    data.write_bytes(b"")
    result = CliRunner().invoke(
        app, ["--debug", "train", *tiny_overrides(tiny_model_dir, str(data), str(tmp_path / "run"))]
    )
    assert result.exit_code != 0 and "file is empty" in str(result.exception)


def test_long_prompts_are_filtered_with_a_count(tiny_model_dir, tmp_path):
    from forkrl.config import load_config
    from forkrl.train.inputs import prompt_token_limit

    data = tmp_path / "train.jsonl"
    rows = [{"question": f"what is {i} plus {i}?", "answer": str(2 * i)} for i in range(8)]
    rows.append({"question": "long " * 300, "answer": "0"})
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = tiny_overrides(tiny_model_dir, str(data), str(tmp_path / "run"), **{"data.max_prompt_tokens": 200})
    result = _train(*overrides)
    assert result.exit_code == 0, result.output
    assert "data: left out 1 of 9 prompts longer than 200 tokens (data.max_prompt_tokens)" in result.stdout
    # By default the limit is the model's positions (2048 for the tiny Qwen3) minus the responses'.
    cfg = load_config(None, tiny_overrides(tiny_model_dir, str(data), str(tmp_path / "x")))
    assert prompt_token_limit(cfg) == 2048 - 12
    _assert_one_line_error(
        _train(*tiny_overrides(tiny_model_dir, str(data), str(tmp_path / "y")), "data.max_prompt_tokens=2"),
        "every prompt is longer than 2 tokens",
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--data", "nope.jsonl"], "--data 'nope.jsonl': file not found"),
        (["--data", "{empty}"], "file is empty"),
        (["--data", "{good}", "-k", "0"], "-k 0: expected >= 1"),
        (["--data", "{good}", "--out", "{good}"], "is a file; expected a directory"),
        (["--data", "{good}", "--reward", "nope_module_xyz:fn"], "--reward 'nope_module_xyz:fn'"),
    ],
)
def test_eval_errors_are_one_line_before_the_model_loads(
    tiny_model_dir, prompts_file, tmp_path, monkeypatch, args, expected
):
    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr("forkrl.models.loading.load_policy", no_model)
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    args = [a.format(empty=empty, good=prompts_file) for a in args]
    result = CliRunner().invoke(app, ["eval", "--model", tiny_model_dir, *args])
    _assert_one_line_error(result, expected.format(good=prompts_file))


def test_eval_model_path_that_does_not_exist(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "q", "answer": "1"}\n')
    result = CliRunner().invoke(app, ["eval", "--model", "nope_model", "--data", str(data)])
    _assert_one_line_error(result, "--model 'nope_model'", "does not exist")


def test_analyze_wrong_column_is_one_line(tmp_path):
    from tests.analysis.crafted_store import write_store

    store = tmp_path / "store"
    write_store(store, [[(1, "a", 0.5), (2, "b", 0.1)]], extra={"entropy_base": [0.4, 0.2]})
    result = CliRunner().invoke(
        app, ["analyze", "overlap", str(store), "--column", "entropy", "--column", "nope", "--out", str(tmp_path / "o")]
    )
    _assert_one_line_error(result, "no entropy column 'nope'", "entropy_base")
    result = CliRunner().invoke(
        app, ["analyze", "shift", str(store), "--before", "nope", "--after", "entropy", "--out", str(tmp_path / "s")]
    )
    _assert_one_line_error(result, "no entropy column 'nope'")


def test_analyze_output_is_moved_aside_not_overwritten(tmp_path):
    from tests.analysis.crafted_store import write_store

    store = tmp_path / "store"
    write_store(store, [[(1, "a", 0.5), (2, "b", 0.1), (3, "c", 0.9)]], extra={"entropy_base": [0.4, 0.2, 0.3]})
    out = tmp_path / "shift"
    args = ["analyze", "shift", str(store), "--before", "entropy_base", "--after", "entropy", "--out", str(out)]
    assert CliRunner().invoke(app, args).exit_code == 0
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (aside,) = tmp_path.glob("shift.old-*")
    assert {p.name: p.read_bytes() for p in aside.iterdir()} == first
    # A failing analysis puts the earlier results back where they were.
    bad = ["analyze", "shift", str(store), "--before", "nope", "--after", "entropy", "--out", str(out)]
    assert CliRunner().invoke(app, bad).exit_code == 2
    assert sorted(p.name for p in out.iterdir()) == sorted(first) and len(list(tmp_path.glob("shift.old-*"))) == 1


# ---------------------------------------------------------------------------- acceptance: SIGTERM mid-run


def test_sigterm_mid_run_checkpoints_and_resume_is_bit_exact(tiny_model_dir, prompts_file, tmp_path):
    common = {"reward.function": "tests.train.reward_fns:slow_vowel_fraction", "trainer.total_steps": 5}
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run_training(None, tiny_overrides(tiny_model_dir, prompts_file, str(straight), **common))
    proc = _start_train(tiny_overrides(tiny_model_dir, prompts_file, str(stopped), **common))
    try:
        metrics = stopped / "metrics.jsonl"
        deadline = time.monotonic() + 120
        # Step 2 logged: step 3 is under way (each step spends >= 0.2 s in the slow reward).
        while proc.poll() is None and time.monotonic() < deadline:
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    done = _steps(stopped)
    last = done[-1]
    assert done == list(range(1, last + 1)) and last in (2, 3)  # 3 unless the signal beat step 3's start
    assert f"stopped by SIGTERM after step {last}" in err and f"--resume {stopped}" in err
    assert [p.name for p in list_checkpoints(stopped)] == [f"step_{last:06d}"]
    result = _train("--resume", str(stopped))
    assert result.exit_code == 0, result.output
    assert _steps(stopped) == [1, 2, 3, 4, 5]
    a, b = _weights(straight / "checkpoints" / "step_000005"), _weights(stopped / "checkpoints" / "step_000005")
    assert all(torch.equal(a[k], b[k]) for k in a)
