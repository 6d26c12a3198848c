"""One job of a sweep, in its own process: train a run (new, resumed or finished) and evaluate its final model.

A job is plain data (`SweepJob`, JSON on the command line of `python -m forkrl.sweep.runner`, or
pickled by submitit), so the same function runs under the local launcher and as a Slurm job.

State of a run directory, decided again every time the sweep starts (nothing is kept in memory):

| state | what is there | what the job does |
|---|---|---|
| `done` | `sweep_result.json` | nothing (the launcher does not even start it) |
| `trained` | a checkpoint at `trainer.total_steps`, no result | the final evaluation only |
| `partial` | an earlier checkpoint | `forkrl train --resume RUN_DIR`, then the evaluation |
| `stale` | files, no checkpoint (stopped before the first save) | a new run; the old files are moved |
|  |  | aside to `RUN_DIR.old-<time>`, never deleted |
| `new` | nothing | `forkrl train`, then the evaluation |

Training goes through `forkrl.train.trainer.run_training`, the function behind `forkrl train`, so
a sweep's runs get the run-directory lock, the refusal to mix two runs and the checkpoint checks.
The final evaluation is `forkrl.eval.accuracy.evaluate_model` with exactly the settings of the
trainer's own `trainer.eval_every` evaluation (k = `trainer.eval_samples`, seed = the run's seed,
`data.eval_files`), so every cell's seed-s run is scored on the same held-out samples' seeds as the
others and as the base model's seed-s evaluation, which the sweep computes once (`kind="base"`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULT_FILE = "sweep_result.json"
"""Written last, atomically, into a finished run's directory (and into each base evaluation's)."""
FINAL_EVAL_DIR = "final_eval"
"""`eval.json` / `eval.md` of a run's final model, inside its run directory."""


@dataclass
class SweepJob:
    """Everything a worker needs; JSON-serialisable."""

    kind: str
    """`train` (a run of one cell and seed) or `base` (the base model's evaluation for one seed)."""
    label: str
    """`CELL/seed_S` or `base/seed_S`, for progress lines."""
    run_dir: str
    """Absolute path of the run directory (`output_dir`), or of the base evaluation's directory."""
    config: str
    """The training recipe (YAML)."""
    overrides: list[str] = field(default_factory=list)
    """All `key=value` overrides, in order: setup, the sweep's own, the cell's, seed and output_dir."""
    threads: int = 1
    """torch intra-op threads (the launcher also sets OMP_NUM_THREADS / MKL_NUM_THREADS)."""
    cell: str = ""
    base_dir: str = ""
    """Also evaluate the base model into this directory first, unless it is there already."""
    base_overrides: list[str] = field(default_factory=list)
    """The overrides of that evaluation (the run's, without the cell's)."""


def run_state(run_dir: str | os.PathLike, total_steps: int) -> str:
    """`done`, `trained`, `partial`, `stale` or `new` (module docstring)."""
    from forkrl.io import is_empty_dir
    from forkrl.train.checkpoint import list_checkpoints, step_of

    run_dir = Path(run_dir)
    if (run_dir / RESULT_FILE).is_file():
        return "done"
    if is_empty_dir(run_dir):
        return "new"
    steps = [step_of(p) for p in list_checkpoints(run_dir)]
    if not steps:
        return "stale"
    return "trained" if max(steps) >= total_steps else "partial"


def thread_env(threads: int) -> dict[str, str]:
    """Environment of a worker with `threads` threads: OpenMP and MKL pools sized before torch starts."""
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def execute_job(job: SweepJob | dict) -> dict[str, Any]:
    """Run one job to completion; returns (and writes to `RESULT_FILE`) its result record."""
    if isinstance(job, dict):
        job = SweepJob(**job)
    os.environ.update(thread_env(job.threads))
    import torch

    torch.set_num_threads(job.threads)
    if job.kind == "base":
        return _evaluate_base(job)
    if job.kind == "train":
        return _train_and_evaluate(job)
    raise ValueError(f"unknown sweep job kind {job.kind!r}")


def check_same_config(run_dir: Path, intended) -> None:
    """Refuse to continue a run whose saved config differs from what the sweep would run now."""
    from forkrl.config import ConfigError, config_to_dict, load_config
    from forkrl.rollout.registry import resolved_rollout_correction

    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return
    old = config_to_dict(load_config(str(saved), check_files=False))
    new = config_to_dict(intended)
    # The trainer records the value it used for a setting left to the backend (`auto`).
    new["loss"]["rollout_correction"] = resolved_rollout_correction(
        intended.loss.rollout_correction, intended.rollout.backend
    )
    changed = _diff(old, new)
    if changed:
        raise ConfigError(
            f"{run_dir} was run with another config ({'; '.join(changed[:4])}); the sweep never mixes two "
            "settings in one run directory: restore the sweep's config or use another --out"
        )


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} there, {b!r} now")
    return out


def _train_and_evaluate(job: SweepJob) -> dict[str, Any]:
    from forkrl.config import load_config
    from forkrl.train.checkpoint import latest_checkpoint, step_of
    from forkrl.train.trainer import run_training

    started = time.time()
    if job.base_dir:
        _evaluate_base(SweepJob("base", "base", job.base_dir, job.config, job.base_overrides, job.threads))
    cfg = load_config(job.config, job.overrides)
    run_dir = Path(job.run_dir)
    check_same_config(run_dir, cfg)
    state = run_state(run_dir, cfg.trainer.total_steps)
    print(f"sweep: {job.label}: {state}", flush=True)
    if state == "done":
        return json.loads((run_dir / RESULT_FILE).read_text())
    if state == "new":
        run_training(job.config, job.overrides)
    elif state == "stale":
        run_training(job.config, job.overrides, overwrite=True)
    elif state == "partial":
        run_training(None, [], resume=str(run_dir))
    final = latest_checkpoint(run_dir)
    if final is None or step_of(final) != cfg.trainer.total_steps:
        raise RuntimeError(f"{run_dir}: no checkpoint at step {cfg.trainer.total_steps} after training")
    t_eval = time.time()
    report = final_evaluation(cfg, str(final))
    from forkrl.eval.accuracy import write_eval_report

    write_eval_report(report, run_dir / FINAL_EVAL_DIR)
    result = {
        "kind": "train",
        "cell": job.cell,
        "seed": cfg.seed,
        "checkpoint": str(final),
        **eval_numbers(report),
        **run_costs(run_dir / "metrics.jsonl", cfg.optim.epochs),
        "eval_s": time.time() - t_eval,
        "job_s": time.time() - started,
    }
    return _write_result(run_dir, result)


def _evaluate_base(job: SweepJob) -> dict[str, Any]:
    from filelock import FileLock

    from forkrl.config import load_config
    from forkrl.eval.accuracy import write_eval_report

    out = Path(job.run_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Two jobs of one seed may both find it missing (a base-only job and a rerun); one evaluates.
    with FileLock(str(out.with_name(f".{out.name}.lock"))):
        if (out / RESULT_FILE).is_file():
            return json.loads((out / RESULT_FILE).read_text())
        cfg = load_config(job.config, job.overrides)
        print(f"sweep: evaluating the base model {cfg.model.name} with seed {cfg.seed}", flush=True)
        started = time.time()
        report = final_evaluation(cfg, cfg.model.name)
        write_eval_report(report, out)
        result = {"kind": "base", "seed": cfg.seed, "model": cfg.model.name, **eval_numbers(report)}
        result["eval_s"] = time.time() - started
        return _write_result(out, result)


def final_evaluation(cfg, model_path: str):
    """Acc@k / Len@k of `model_path` on `data.eval_files`, with the trainer's evaluation settings
    (sampling seed `cfg.seed`: the same for every cell's run of a seed and for the base model's)."""
    from forkrl.eval.accuracy import evaluate_with_run_config
    from forkrl.models.loading import load_policy

    device = None if cfg.trainer.device == "auto" else cfg.trainer.device
    model, tokenizer = load_policy(
        model_path, dtype=cfg.model.dtype, device=device, trust_remote_code=cfg.model.trust_remote_code
    )
    model.eval()
    from forkrl.models import precision

    with precision.autocast(cfg.model.dtype, next(model.parameters()).device):  # as the trainer's evals
        return evaluate_with_run_config(model, tokenizer, cfg)


def eval_numbers(report) -> dict[str, Any]:
    """Acc@k and Len@k over the eval files (their unweighted mean with several, as the paper's Avg.)."""
    avg = report.average()
    main = avg if avg is not None else report.results[0].summary()
    return {
        "k": report.results[0].k,
        "acc_at_k": main["acc_at_k"],
        "len_at_k": main["len_at_k"],
        "per_file": {r.name: {"acc_at_k": r.acc_at_k, "len_at_k": r.len_at_k} for r in report.results},
    }


def run_costs(metrics_file: Path, epochs: int = 1) -> dict[str, float]:
    """Tokens generated, tokens in the gradient and training time, summed over a run's steps.

    Generated = `tokens_per_s · step_s` (the trainer's own count, every sampling round included);
    in the gradient = response tokens trained × `kept_frac` × epochs (1 for `all`, which logs no
    kept fraction); time = Σ `step_s` (the steps the run kept, so a resumed run is not charged twice).
    """
    generated = in_gradient = seconds = 0.0
    for line in metrics_file.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        generated += float(r.get("tokens_per_s") or 0.0) * float(r.get("step_s") or 0.0)
        kept = r.get("kept_frac")
        in_gradient += float(r.get("tokens_trained") or 0.0) * (1.0 if kept is None else float(kept)) * epochs
        seconds += float(r.get("step_s") or 0.0)
    return {"tokens_generated": generated, "tokens_in_gradient": in_gradient, "train_s": seconds}


def _write_result(directory: Path, result: dict[str, Any]) -> dict[str, Any]:
    from forkrl.io import atomic_write_json

    atomic_write_json(directory / RESULT_FILE, result)
    return result


def main(argv: list[str] | None = None) -> int:
    """`python -m forkrl.sweep.runner JOB_JSON`: run one job; exit 0, or 1 with `error: ...` last."""
    argv = sys.argv[1:] if argv is None else argv
    job = SweepJob(**json.loads(argv[0]))
    try:
        result = execute_job(job)
    except KeyboardInterrupt:
        print(f"error: {job.label}: interrupted", file=sys.stderr, flush=True)
        return 130
    except BaseException as err:  # the log keeps the traceback; the sweep shows the last line
        from forkrl.train.trainer import TrainingInterrupted

        traceback.print_exc()
        if isinstance(err, TrainingInterrupted):
            print(f"error: {' '.join(str(err).split())}", file=sys.stderr, flush=True)
            return 128 + err.signum
        print(f"error: {type(err).__name__}: {' '.join(str(err).split())}", file=sys.stderr, flush=True)
        return 1
    print(f"sweep: {job.label}: done, Acc@{result['k']} {result['acc_at_k']:.2f}", flush=True)
    return 0


def job_to_json(job: SweepJob) -> str:
    return json.dumps(dataclasses.asdict(job))


if __name__ == "__main__":
    sys.exit(main())
