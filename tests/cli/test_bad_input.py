"""The bad-input table (issue 23): every command of the CLI against what a user gets wrong.

For every row: exit code 2, exactly one `error:` line on stderr (nothing else there) that names the
file, row, key or value, no traceback, no model loaded, and nothing written or moved in the
workspace (a snapshot before and after; see `helpers.LOCK_FILE_NOTE` for the one exception). Rows run
in-process through typer's CliRunner; a row is `(id, argv, expected fragments of the error line)`
plus what it needs in the workspace. Placeholders: {ws} the workspace, {model} the tiny model, {good}
a valid prompt file, {cfg} a valid training config (eval files set, as a sweep needs), {other_model}
a model of the same vocabulary size with another tokenizer, {small_model} a smaller vocabulary.
"""

from __future__ import annotations

import errno
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from forkrl.cli import app
from forkrl.config import dump_config, load_config
from forkrl.models.tiny import build_tiny_tokenizer
from tests.analysis.crafted_store import write_store
from tests.cli.helpers import forbid_model_loading, hide_packages, one_error_line, refuse_writes, snapshot
from tests.train.conftest import tiny_overrides

LATIN1 = "caf\xe9".encode("latin-1")  # 0xe9 alone is not UTF-8
MARKER = "pwned"  # a file that a `!!python` tag or a crafted pickle would create if it ran


@dataclass
class Row:
    id: str
    argv: list[str]
    expect: list[str]
    files: dict[str, bytes | str] = field(default_factory=dict)
    """Files written into the workspace before the row runs (text is formatted with the placeholders)."""
    setup: Callable[[Path, dict], None] | None = None
    patch: Callable[[pytest.MonkeyPatch, Path], None] | None = None


def _train_args(*extra: str, out: str = "{ws}/run") -> list[str]:
    return [*tiny_overrides("{model}", "{good}", out), *extra]


# ---------------------------------------------------------------------------- setups


def _store(ws: Path, ctx: dict) -> None:
    """A store the tiny tokenizer made: ids and pieces as it encodes and decodes them."""
    tok = build_tiny_tokenizer()
    responses = []
    for text in ("what is 3 plus 4? 7", "wait, 12 - 5 = 7"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        responses.append([(i, tok.decode([i]), 0.1 * (k % 5)) for k, i in enumerate(ids)])
    write_store(ws / "store", responses, vocab_size=len(tok))


def _truncated_store(ws: Path, ctx: dict) -> None:
    _store(ws, ctx)
    tokens = ws / "store" / "tokens.parquet"
    tokens.write_bytes(tokens.read_bytes()[: tokens.stat().st_size // 2])


def _store_json(content: bytes):
    def setup(ws: Path, ctx: dict) -> None:
        _store(ws, ctx)
        (ws / "store" / "store.json").write_bytes(content)

    return setup


def _run_dir(state: Callable[[Path], None]):
    """A run directory whose one checkpoint has the tiny model's weights and `state` as trainer_state.pt."""

    def setup(ws: Path, ctx: dict) -> None:
        run = ws / "run"
        step = run / "checkpoints" / "step_000001"
        step.mkdir(parents=True)
        for f in Path(ctx["model"]).iterdir():
            shutil.copy(f, step / f.name)
        cfg = load_config(None, tiny_overrides(ctx["model"], ctx["good"], str(run)))
        (run / "config.yaml").write_text(dump_config(cfg))
        (run / "metrics.jsonl").write_text('{"step": 1}\n')
        state(step / "trainer_state.pt")

    return setup


class _RunsCode:
    """A pickle that runs a shell command when it is loaded (`__reduce__`), as an attacker would craft it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def _crafted_state(file: Path) -> None:
    torch.save({"step": 1, "optimizer": {}, "scheduler": {}, "rng": _RunsCode(file.parents[3] / MARKER)}, file)


def _truncated_state(file: Path) -> None:
    torch.save({"step": 1, "optimizer": {}, "scheduler": {}, "rng": {}, "trainer": {}}, file)
    file.write_bytes(file.read_bytes()[:40])


def _sweep_dirs(ws: Path, ctx: dict) -> None:
    """Two sweeps (A: `seed=0`, B: `seed=1` overrides) and B exported to `out`."""
    for name, seed in (("A", 0), ("B", 1)):
        d = ws / name
        d.mkdir()
        record = {"config": "cfg.yaml", "overrides": [f"seed={seed}"], "setup": None, "cells": [], "seeds": [0]}
        (d / "sweep.json").write_text(json.dumps(record))
        (d / "summary.md").write_text(f"sweep {name}\n")
    (ws / "out").mkdir()
    for name in ("sweep.json", "summary.md"):
        shutil.copy(ws / "B" / name, ws / "out" / name)


def _used_run_dir(ws: Path, ctx: dict) -> None:
    (ws / "run").mkdir()
    (ws / "run" / "notes.txt").write_text("an earlier run's notes\n")


def _read_only(monkeypatch, ws: Path) -> None:
    refuse_writes(monkeypatch, ws / "ro", errno.EROFS)


def _full(monkeypatch, ws: Path) -> None:
    refuse_writes(monkeypatch, ws / "full", errno.ENOSPC)


def _hide(*names: str):
    return lambda monkeypatch, ws: hide_packages(monkeypatch, *names)


# ---------------------------------------------------------------------------- the table

ROWS = [
    # ------------------------------------------------------------ config
    Row("config-missing-file", ["config", "show", "{ws}/nope.yaml"], ["config file not found", "{ws}/nope.yaml"]),
    Row(
        "config-not-utf8",
        ["config", "show", "{ws}/latin1.yaml"],
        ["{ws}/latin1.yaml: not UTF-8", "0xe9"],
        files={"latin1.yaml": b"seed: 0\n# " + LATIN1 + b"\n"},
    ),
    Row(
        "config-bad-yaml",
        ["config", "show", "{ws}/bad.yaml"],
        ["{ws}/bad.yaml: not valid YAML", "line 2"],
        files={"bad.yaml": "seed: 0\nselection: [ratio\n"},
    ),
    Row(
        "config-top-level-list",
        ["config", "show", "{ws}/list.yaml"],
        ["{ws}/list.yaml: expected a mapping"],
        files={"list.yaml": "- seed\n- 0\n"},
    ),
    Row(
        "config-python-tag-in-file",
        ["config", "show", "{ws}/tag.yaml"],
        ["{ws}/tag.yaml: not valid YAML", "python/object/apply:os.system"],
        files={"tag.yaml": "seed: !!python/object/apply:os.system ['touch {ws}/" + MARKER + "']\n"},
    ),
    Row(
        "config-override-no-equals",
        ["config", "show", "{cfg}", "selection.ratio"],
        ["override 'selection.ratio'", "key=value"],
    ),
    Row(
        "config-override-bad-yaml",
        ["config", "show", "data.train_files=[train.jsonl"],
        ["override data.train_files=[train.jsonl", "not valid YAML"],
    ),
    Row(
        "config-override-python-tag",
        ["config", "show", "seed=!!python/object/apply:os.system ['touch {ws}/" + MARKER + "']"],
        ["override seed=!!python/object/apply:os.system", "not valid YAML"],
    ),
    Row("config-unknown-key", ["config", "show", "selection.ratoi=0.1"], ["selection.ratoi", "selection.ratio"]),
    Row("config-wrong-type", ["config", "show", "optim.lr=fast"], ["optim.lr", "'fast'"]),
    Row("config-out-of-range", ["config", "show", "rollout.group_size=1"], ["rollout.group_size = 1", ">= 2"]),
    Row("config-not-finite", ["config", "show", "optim.lr=.nan"], ["optim.lr", "finite"]),
    Row("config-value-is-a-section", ["config", "show", "seed.x=1"], ["seed: expected an integer", "{'x': 1}"]),
    # ------------------------------------------------------------ train
    Row("train-no-input", ["train"], ["give a config file", "--resume"]),
    Row("train-missing-config", ["train", "{ws}/nope.yaml"], ["config file not found: {ws}/nope.yaml"]),
    Row(
        "train-config-not-utf8",
        ["train", "{ws}/latin1.yaml"],
        ["{ws}/latin1.yaml: not UTF-8"],
        files={"latin1.yaml": b"model:\n  name: " + LATIN1 + b"\n"},
    ),
    Row(
        "train-override-bad-yaml",
        ["train", *_train_args("data.train_files=[{good}")],
        ["override data.train_files=[{good}", "not valid YAML"],
    ),
    Row(
        "train-override-python-tag",
        ["train", *_train_args("seed=!!python/object/apply:os.system ['touch {ws}/" + MARKER + "']")],
        ["override seed=!!python/object/apply:os.system", "not valid YAML"],
    ),
    Row(
        "train-data-missing",
        ["train", *_train_args("data.train_files=[{ws}/nope.jsonl]")],
        ["data.train_files[0] = '{ws}/nope.jsonl': file not found"],
    ),
    Row(
        "train-data-empty",
        ["train", *_train_args("data.train_files=[{ws}/empty.jsonl]")],
        ["{ws}/empty.jsonl", "file is empty"],
        files={"empty.jsonl": b""},
    ),
    Row(
        "train-data-wrong-column",
        ["train", *_train_args("data.train_files=[{ws}/q.jsonl]")],
        ["{ws}/q.jsonl", "line 1", "no question field 'question'"],
        files={"q.jsonl": '{"q": "1+1", "answer": "2"}\n'},
    ),
    Row(
        "train-data-not-utf8",
        ["train", *_train_args("data.train_files=[{ws}/latin1.jsonl]")],
        ["{ws}/latin1.jsonl", "line 1", "not valid UTF-8"],
        files={"latin1.jsonl": b'{"question": "' + LATIN1 + b'", "answer": "2"}\n'},
    ),
    Row(
        "train-data-bad-json-row",
        ["train", *_train_args("data.train_files=[{ws}/bad.jsonl]")],
        ["{ws}/bad.jsonl", "line 2", "invalid JSON"],
        files={"bad.jsonl": '{"question": "1+1", "answer": "2"}\n{"question": oops}\n'},
    ),
    Row(
        "train-output-is-a-file",
        ["train", *_train_args(out="{ws}/taken")],
        ["output_dir = '{ws}/taken' is a file"],
        files={"taken": "not a directory\n"},
    ),
    Row(
        "train-output-not-empty",
        ["train", *_train_args()],
        ["'{ws}/run' is not empty", "notes.txt"],
        setup=_used_run_dir,
    ),
    Row(
        "train-output-read-only",
        ["train", *_train_args(out="{ws}/ro/run")],
        ["output_dir = '{ws}/ro/run'", "lock file", "read-only file system"],
        files={"ro/keep": "x\n"},
        patch=_read_only,
    ),
    Row(
        "train-wandb-missing",
        ["train", *_train_args("trainer.wandb_project=x")],
        ["trainer.wandb_project = 'x' needs the wandb package", "forkrl[wandb]"],
        patch=_hide("wandb"),
    ),
    Row(
        "train-lora-without-peft",
        ["train", *_train_args("model.lora_rank=4")],
        ["model.lora_rank = 4 needs the peft package", "forkrl[lora]"],
        patch=_hide("peft"),
    ),
    Row("train-vllm-backend-missing", ["train", *_train_args("rollout.backend=vllm")], ["rollout.backend", "vllm"]),
    Row(
        "train-model-missing",
        ["train", *_train_args("model.name={ws}/no/such/model")],
        ["model path '{ws}/no/such/model' does not exist"],
    ),
    Row(
        "train-reward-missing",
        ["train", *_train_args("reward.function=nope_module_xyz:fn")],
        ["reward.function = 'nope_module_xyz:fn'"],
    ),
    Row(
        "train-batch-not-divisible",
        ["train", *_train_args("rollout.prompts_per_step=3")],
        ["optim.mini_batch_size", "rollout.prompts_per_step (3)"],
    ),
    Row("train-resume-and-overwrite", ["train", "--resume", "{ws}/run", "--overwrite"], ["--resume", "--overwrite"]),
    Row("train-resume-not-a-run", ["train", "--resume", "{ws}"], ["--resume {ws}", "config.yaml not found"]),
    Row(
        "train-resume-crafted-pickle",
        ["train", "--resume", "{ws}/run"],
        ["{ws}/run/checkpoints/step_000001/trainer_state.pt: refused", "need posix.system", "weights_only=True"],
        setup=_run_dir(_crafted_state),
    ),
    Row(
        "train-resume-truncated-state",
        ["train", "--resume", "{ws}/run"],
        ["{ws}/run/checkpoints/step_000001/trainer_state.pt: cannot be loaded"],
        setup=_run_dir(_truncated_state),
    ),
    Row(
        "train-resume-elsewhere",
        ["train", "--resume", "{ws}/run", "output_dir={ws}/other"],
        ["output_dir = '{ws}/other'", "stays in its directory {ws}/run"],
        setup=_run_dir(_truncated_state),
    ),
    Row("train-unknown-option", ["train", "--resum", "{ws}/run"], ["--resum", "forkrl train --help"]),
    # ------------------------------------------------------------ eval
    Row(
        "eval-data-missing",
        ["eval", "--model", "{model}", "--data", "{ws}/nope.jsonl"],
        ["--data '{ws}/nope.jsonl': file not found"],
    ),
    Row(
        "eval-data-empty",
        ["eval", "--model", "{model}", "--data", "{ws}/empty.jsonl"],
        ["{ws}/empty.jsonl", "file is empty"],
        files={"empty.jsonl": b""},
    ),
    Row(
        "eval-data-wrong-column",
        ["eval", "--model", "{model}", "--data", "{good}", "--question-key", "problem"],
        ["{good}", "line 1", "no question field 'problem'"],
    ),
    Row(
        "eval-data-not-utf8",
        ["eval", "--model", "{model}", "--data", "{ws}/latin1.jsonl"],
        ["{ws}/latin1.jsonl", "line 1", "not valid UTF-8"],
        files={"latin1.jsonl": b'{"question": "' + LATIN1 + b'", "answer": "2"}\n'},
    ),
    Row("eval-k-zero", ["eval", "--model", "{model}", "--data", "{good}", "-k", "0"], ["-k 0: expected >= 1"]),
    Row(
        "eval-k-not-a-number",
        ["eval", "--model", "{model}", "--data", "{good}", "-k", "many"],
        ["'-k'", "valid integer"],
    ),
    Row(
        "eval-out-is-a-file",
        ["eval", "--model", "{model}", "--data", "{good}", "--out", "{good}"],
        ["--out '{good}': is a file"],
    ),
    Row(
        "eval-out-read-only",
        ["eval", "--model", "{model}", "--data", "{good}", "--out", "{ws}/ro/eval"],
        ["--out {ws}/ro/eval: cannot write there", "read-only file system"],
        files={"ro/keep": "x\n"},
        patch=_read_only,
    ),
    Row(
        "eval-out-full-disk",
        ["eval", "--model", "{model}", "--data", "{good}", "--out", "{ws}/full/eval"],
        ["--out {ws}/full/eval: cannot write there", "no space left on device"],
        files={"full/keep": "x\n"},
        patch=_full,
    ),
    Row(
        "eval-model-missing",
        ["eval", "--model", "{ws}/no_model", "--data", "{good}"],
        ["--model '{ws}/no_model'", "does not exist"],
    ),
    Row("eval-no-model-option", ["eval", "--data", "{good}"], ["Missing option '--model'"]),
    # ------------------------------------------------------------ demo
    Row("demo-unknown-task", ["demo", "--task", "chess"], ["--task must be countdown or forecast", "'chess'"]),
    Row("demo-bad-override", ["demo", "--out", "{ws}/demo", "optim.lr=fast"], ["optim.lr", "'fast'"]),
    Row("demo-bad-ratio", ["demo", "--out", "{ws}/demo", "--ratio", "1.5"], ["selection.ratio = 1.5"]),
    Row("demo-bad-strategy", ["demo", "--out", "{ws}/demo", "--strategy", "best"], ["selection.strategy", "'best'"]),
    Row("demo-zero-steps", ["demo", "--out", "{ws}/demo", "--steps", "0"], ["trainer.total_steps = 0"]),
    Row(
        "demo-base-model-missing",
        ["demo", "--out", "{ws}/demo", "--base-model", "{ws}/no_model"],
        ["no toy base model at {ws}/no_model"],
    ),
    Row("demo-out-is-a-file", ["demo", "--out", "{good}"], ["output_dir = '{good}' is a file"]),
    Row(
        "demo-out-read-only",
        ["demo", "--out", "{ws}/ro/demo"],
        ["'{ws}/ro/demo'", "lock file", "read-only file system"],
        files={"ro/keep": "x\n"},
        patch=_read_only,
    ),
    # ------------------------------------------------------------ analyze
    Row(
        "analyze-score-not-a-store",
        ["analyze", "score", "{ws}", "--model", "{model}", "--name", "x"],
        ["{ws} is not a rollout store", "tokens.parquet is missing"],
    ),
    Row(
        "analyze-score-truncated-parquet",
        ["analyze", "score", "{ws}/store", "--model", "{model}", "--name", "x"],
        ["{ws}/store/tokens.parquet: not a readable parquet file", "magic bytes"],
        setup=_truncated_store,
    ),
    Row(
        "analyze-score-store-json-not-json",
        ["analyze", "score", "{ws}/store", "--model", "{model}", "--name", "x"],
        ["{ws}/store/store.json: not valid JSON"],
        setup=_store_json(b'{"vocab_size": 100,'),
    ),
    Row(
        "analyze-score-store-json-not-utf8",
        ["analyze", "entropy", "{ws}/store", "--out", "{ws}/e"],
        ["{ws}/store/store.json: not valid JSON", "utf-8"],
        setup=_store_json(b'{"model": "' + LATIN1 + b'"}'),
    ),
    Row(
        "analyze-score-other-tokenizer",
        ["analyze", "score", "{ws}/store", "--model", "{other_model}", "--name", "x"],
        ["--model {other_model}: its tokenizer is not the one that made {ws}/store", "token id"],
        setup=_store,
    ),
    Row(
        "analyze-score-smaller-vocabulary",
        ["analyze", "score", "{ws}/store", "--model", "{small_model}", "--name", "x"],
        ["--model {small_model}: its tokenizer has 53 tokens", "of 100 (store.json vocab_size)"],
        setup=_store,
    ),
    Row(
        "analyze-score-bad-name",
        ["analyze", "score", "{ws}/store", "--model", "{model}", "--name", "a b"],
        ["--name 'a b'"],
        setup=_store,
    ),
    Row(
        "analyze-score-read-only-store",
        ["analyze", "score", "{ws}/ro/store", "--model", "{model}", "--name", "x"],
        ["store {ws}/ro/store/tokens.parquet: cannot write there", "read-only file system"],
        setup=lambda ws, ctx: (ws / "ro").mkdir() or _store(ws / "ro", ctx),
        patch=_read_only,
    ),
    Row(
        "analyze-entropy-unknown-column",
        ["analyze", "entropy", "{ws}/store", "--out", "{ws}/e", "--column", "nope"],
        ["{ws}/store: no entropy column 'nope'"],
        setup=_store,
    ),
    Row(
        "analyze-entropy-out-read-only",
        ["analyze", "entropy", "{ws}/store", "--out", "{ws}/ro/e"],
        ["--out {ws}/ro/e: cannot write there", "read-only file system"],
        setup=_store,
        files={"ro/keep": "x\n"},
        patch=_read_only,
    ),
    Row(
        "analyze-store-data-missing",
        ["analyze", "store", "--model", "{model}", "--data", "{ws}/nope.jsonl", "--out", "{ws}/s"],
        ["{ws}/nope.jsonl"],
    ),
    Row(
        "analyze-store-responses-missing",
        ["analyze", "store", "--model", "{model}", "--responses", "{ws}/nope.jsonl", "--out", "{ws}/s"],
        ["--responses '{ws}/nope.jsonl': file not found"],
    ),
    Row(
        "analyze-store-k-zero",
        ["analyze", "store", "--model", "{model}", "--data", "{good}", "-k", "0", "--out", "{ws}/s"],
        ["k", "0"],
    ),
    Row(
        "analyze-evolution-not-a-run",
        ["analyze", "evolution", "{ws}/nope", "--out", "{ws}/e"],
        ["{ws}/nope: no such run directory"],
    ),
    Row(
        "analyze-compare-not-a-run",
        ["analyze", "compare", "{ws}", "--out", "{ws}/c"],
        ["{ws}", "metrics.jsonl"],
    ),
    Row(
        "analyze-compare-metrics-not-utf8",
        ["analyze", "compare", "{ws}/r", "--out", "{ws}/c"],
        ["{ws}/r/metrics.jsonl: not UTF-8 text"],
        files={"r/metrics.jsonl": b'{"step": 1, "note": "' + LATIN1 + b'"}\n'},
    ),
    Row(
        "analyze-law-config-not-utf8",
        ["analyze", "law", "{ws}/r", "--out", "{ws}/l"],
        ["{ws}/r/config.yaml: not valid YAML"],
        files={"r/metrics.jsonl": '{"step": 1, "entropy": 0.5, "accuracy": 0.1}\n', "r/config.yaml": LATIN1},
    ),
    Row(
        "analyze-calibration-not-utf8",
        ["analyze", "calibration", "{ws}/f.jsonl"],
        ["{ws}/f.jsonl: line 1: not valid UTF-8"],
        files={"f.jsonl": b'{"p": 0.5, "outcome": 1, "note": "' + LATIN1 + b'"}\n'},
    ),
    Row(
        "analyze-calibration-no-outcome",
        ["analyze", "calibration", "{ws}/f.jsonl"],
        ["{ws}/f.jsonl", "no outcome field 'outcome'"],
        files={"f.jsonl": '{"p": 0.3}\n'},
    ),
    # ------------------------------------------------------------ sweep
    Row("sweep-jobs-zero", ["sweep", "{cfg}", "--grid", "seed=0,1", "--out", "{ws}/sw", "--jobs", "0"], ["--jobs 0"]),
    Row(
        "sweep-jobs-negative",
        ["sweep", "{cfg}", "--grid", "seed=0,1", "--out", "{ws}/sw", "--jobs", "-1"],
        ["--jobs -1"],
    ),
    Row(
        "sweep-jobs-not-a-number-in-file",
        ["sweep", "{ws}/sweep.yaml"],
        ["{ws}/sweep.yaml: jobs = 'many'"],
        files={"sweep.yaml": "config: {cfg}\ngrid: {seed: [0, 1]}\nout: {ws}/sw\njobs: many\n"},
    ),
    Row(
        "sweep-grid-without-values",
        ["sweep", "{cfg}", "--grid", "selection.strategy", "--out", "{ws}/sw"],
        ["--grid", "'selection.strategy'", "key=value"],
    ),
    Row(
        "sweep-bad-seeds",
        ["sweep", "{cfg}", "--grid", "seed=0,1", "--seeds", "a-b", "--out", "{ws}/sw"],
        ["--seeds 'a-b'"],
    ),
    Row(
        "sweep-cell-unknown-key",
        ["sweep", "{cfg}", "--cell", "selection.ratoi=0.1", "--out", "{ws}/sw"],
        ["selection.ratoi"],
    ),
    Row(
        "sweep-cell-bad-value",
        ["sweep", "{cfg}", "--cell", "selection.ratio=2", "--out", "{ws}/sw"],
        ["selection.ratio = 2"],
    ),
    Row(
        "sweep-file-bad-yaml",
        ["sweep", "{ws}/sweep.yaml"],
        ["{ws}/sweep.yaml: not valid YAML"],
        files={"sweep.yaml": "config: {cfg}\ngrid: {seed: [0, 1}\n"},
    ),
    Row(
        "sweep-file-not-utf8",
        ["sweep", "{ws}/sweep.yaml"],
        ["{ws}/sweep.yaml: not UTF-8"],
        files={"sweep.yaml": b"config: x.yaml\n# " + LATIN1 + b"\n"},
    ),
    Row(
        "sweep-file-unknown-key",
        ["sweep", "{ws}/sweep.yaml"],
        ["{ws}/sweep.yaml: unknown sweep file key(s) grids"],
        files={"sweep.yaml": "config: {cfg}\ngrids: {seed: [0, 1]}\nout: {ws}/sw\n"},
    ),
    Row(
        "sweep-unknown-launcher",
        ["sweep", "{cfg}", "--grid", "seed=0,1", "--out", "{ws}/sw", "--launcher", "k8s"],
        ["--launcher 'k8s'"],
    ),
    Row(
        "sweep-submitit-missing",
        ["sweep", "{cfg}", "--grid", "seed=0,1", "--out", "{ws}/sw", "--launcher", "submitit"],
        ["--launcher submitit needs the submitit package", "forkrl[slurm]"],
        patch=_hide("submitit"),
    ),
    Row(
        "sweep-bad-slurm-option",
        ["sweep", "{cfg}", "--grid", "seed=0,1", "--out", "{ws}/sw", "--slurm", "partition"],
        ["--slurm 'partition'", "KEY=VALUE"],
    ),
    Row("sweep-no-out", ["sweep", "{cfg}", "--grid", "seed=0,1"], ["--out DIR"]),
    Row(
        "sweep-baseline-matches-nothing",
        ["sweep", "{cfg}", "--grid", "seed=0,1", "--baseline", "seed=7", "--out", "{ws}/sw"],
        ["--baseline seed=7", "matches no cell"],
    ),
    Row(
        "sweep-config-missing",
        ["sweep", "{ws}/nope.yaml", "--out", "{ws}/sw"],
        ["config file not found: {ws}/nope.yaml"],
    ),
    Row("sweep-report-not-a-sweep", ["sweep", "report", "{ws}"], ["{ws}: no sweep.json"]),
    Row(
        "sweep-report-corrupt-record",
        ["sweep", "report", "{ws}/A"],
        ["{ws}/A/sweep.json: not valid JSON"],
        files={"A/sweep.json": '{"cells": ['},
    ),
    Row("sweep-export-not-a-sweep", ["sweep", "export", "{ws}", "{ws}/out"], ["{ws}: no sweep.json"]),
    Row(
        "sweep-export-over-another-sweep",
        ["sweep", "export", "{ws}/A", "{ws}/out"],
        ["{ws}/out holds the results of another sweep", "{ws}/out/sweep.json", "{ws}/A/sweep.json", "seed=1"],
        setup=_sweep_dirs,
    ),
    Row(
        "sweep-export-over-foreign-files",
        ["sweep", "export", "{ws}/A", "{ws}/docs"],
        ["{ws}/docs/summary.md is already there", "no sweep.json"],
        setup=_sweep_dirs,
        files={"docs/summary.md": "my own notes\n"},
    ),
]


def test_the_table_is_broad():
    commands = {row.argv[0] for row in ROWS}
    assert len(ROWS) >= 40 and commands == {"config", "train", "eval", "demo", "analyze", "sweep"}
    assert len({row.id for row in ROWS}) == len(ROWS)


@pytest.fixture
def workspace(tmp_path, tiny_model_dir, prompts_file, other_tokenizer_model_dir, small_vocab_model_dir):
    ws = tmp_path / "ws"
    ws.mkdir()
    good = ws / "good.jsonl"
    shutil.copy(prompts_file, good)
    cfg = load_config(None, [*tiny_overrides(tiny_model_dir, str(good), str(ws / "run")), f"data.eval_files=[{good}]"])
    (ws / "cfg.yaml").write_text(dump_config(cfg))
    ctx = {
        "ws": str(ws),
        "model": tiny_model_dir,
        "good": str(good),
        "cfg": str(ws / "cfg.yaml"),
        "other_model": other_tokenizer_model_dir,
        "small_model": small_vocab_model_dir,
    }
    return ws, ctx


def _fill(text: str, ctx: dict) -> str:
    for key, value in ctx.items():
        text = text.replace("{" + key + "}", value)
    return text


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_bad_input_is_one_line_and_changes_nothing(row: Row, workspace, monkeypatch):
    ws, ctx = workspace
    for name, content in row.files.items():
        (ws / name).parent.mkdir(parents=True, exist_ok=True)
        data = _fill(content, ctx).encode() if isinstance(content, str) else content
        (ws / name).write_bytes(data)
    if row.setup is not None:
        row.setup(ws, ctx)
    argv = [_fill(arg, ctx) for arg in row.argv]
    before = snapshot(ws)
    forbid_model_loading(monkeypatch)
    if row.patch is not None:
        row.patch(monkeypatch, ws)
    result = CliRunner().invoke(app, argv)
    monkeypatch.undo()
    line = one_error_line(result)
    for fragment in row.expect:
        assert _fill(fragment, ctx) in line, (_fill(fragment, ctx), line)
    assert snapshot(ws) == before, "the command wrote or moved something"
    assert not (ws / MARKER).exists()
