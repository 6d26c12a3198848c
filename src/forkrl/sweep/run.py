"""`forkrl sweep`: turn a plan (cells × seeds) into jobs, skip what is finished, launch the rest, write the report.

Layout of a sweep directory `OUT`:

    OUT/sweep.json                  the cells and seeds of every invocation so far, the baseline
    OUT/data/                       files written by the `--setup` hook (e.g. the toy problems)
    OUT/base/seed_S/                the base model's held-out evaluation with seed S (once per seed)
    OUT/CELL/cell.json              the cell's overrides
    OUT/CELL/seed_S/                a `forkrl train` run directory (config.yaml, metrics.jsonl,
                                    checkpoints/), plus final_eval/ and sweep_result.json at the end
    OUT/CELL/seed_S.log             the run's output, appended by each attempt
    OUT/summary.json, summary.md, figures/   the report

Re-running the same command skips runs with a `sweep_result.json`, resumes the others from their
checkpoints, and a plan with more cells or seeds adds them; nothing finished is ever rewritten.
Each run's config is checked against what is already in its directory, and the sweep's base
(config file, overrides, setup) against `sweep.json`, so two different sweeps never share one.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import time
from pathlib import Path

from forkrl.config import ConfigError, load_config
from forkrl.extras import check_config_extras, require_package
from forkrl.io import atomic_write_json
from forkrl.sweep.grid import Cell, SweepPlan, find_baseline
from forkrl.sweep.launch import LAUNCHERS, _LocalHandle, _SubmititHandle, make_executor, run_jobs, threads_per_job
from forkrl.sweep.report import SWEEP_FILE, base_dir, load_sweep, run_dir, write_report
from forkrl.sweep.runner import RESULT_FILE, SweepJob, run_state

SETUPS = {"toy": "forkrl.toy.recipe:sweep_setup"}
"""Named `--setup` hooks; anything else is `module:function`."""


def resolve_setup(name: str | None):
    """The `setup(data_dir, seed) -> overrides` function of `--setup NAME` (or None)."""
    if not name:
        return None
    target = SETUPS.get(name, name)
    module, sep, func = target.partition(":")
    if not sep:
        raise ConfigError(f"--setup {name!r}: expected {' or '.join(SETUPS)} or module:function")
    try:
        return getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"--setup {name!r}: cannot import {target} ({err})") from err


def _record_sweep(plan: SweepPlan, baseline: str | None) -> dict:
    """This invocation merged into OUT/sweep.json's record (cells and seeds accumulate); refuses a
    different base. Written by the caller once every run's config has been checked."""
    path = plan.out / SWEEP_FILE
    record = {
        "config": plan.config,
        "overrides": plan.overrides,
        "setup": plan.setup,
        "cells": [],
        "seeds": [],
        "baseline": baseline,
    }
    if path.is_file():
        old = load_sweep(plan.out)
        for key in ("config", "overrides", "setup"):
            if old.get(key) != record[key]:
                raise ConfigError(
                    f"{plan.out} holds a sweep with {key} = {old.get(key)!r}, not {record[key]!r}: a sweep "
                    "directory holds one comparison; use another --out"
                )
        record["cells"], record["seeds"] = old["cells"], old["seeds"]
        record["baseline"] = baseline or old.get("baseline")
    known = {c["name"] for c in record["cells"]}
    record["cells"] += [
        {"name": c.name, "slug": c.slug, "assignments": [list(a) for a in c.assignments]}
        for c in plan.cells
        if c.name not in known
    ]
    record["seeds"] = sorted(set(record["seeds"]) | set(plan.seeds))
    return record


def plan_jobs(plan: SweepPlan, threads: int) -> list[SweepJob]:
    """The runs still to do (seed-major, so each finished seed is a complete paired comparison), every
    config checked before anything starts. The base model's evaluation of seed S rides on the first
    unfinished run of S (its process has the whole stack loaded anyway), or is a job of its own when
    every run of S is finished."""
    setup = resolve_setup(plan.setup)
    jobs = []
    for seed in plan.seeds:
        seed_overrides = [*(setup(plan.out / "data", seed) if setup else []), *plan.overrides, f"seed={seed}"]
        base = str(base_dir(plan.out, seed).resolve())
        base_overrides = [*seed_overrides, f"output_dir={base}"]
        if not load_config(plan.config, base_overrides).data.eval_files:
            raise ConfigError(
                "data.eval_files is empty: a sweep scores every run's final model on held-out files; "
                "set data.eval_files in the config or as an override"
            )
        need_base = not (Path(base) / RESULT_FILE).is_file()
        for cell in plan.cells:
            directory = str(run_dir(plan.out, cell, seed).resolve())
            overrides = [*seed_overrides, *cell.overrides, f"output_dir={directory}"]
            cfg = load_config(plan.config, overrides)  # a bad key or value fails now, naming it
            check_config_extras(cfg)
            if run_state(directory, cfg.trainer.total_steps) == "done":
                continue
            job = SweepJob("train", f"{cell.name}/seed_{seed}", directory, plan.config, overrides, threads, cell.name)
            if need_base:
                job.base_dir, job.base_overrides, need_base = base, base_overrides, False
            jobs.append(job)
        if need_base:
            jobs.append(SweepJob("base", f"base/seed_{seed}", base, plan.config, base_overrides, threads))
    return jobs


def _write_cells(plan: SweepPlan) -> None:
    for cell in plan.cells:
        path = plan.out / cell.slug / "cell.json"
        record = {"name": cell.name, "assignments": [list(a) for a in cell.assignments]}
        if path.is_file():
            if json.loads(path.read_text(encoding="utf-8"))["name"] != cell.name:
                raise ConfigError(f"{path.parent} belongs to another cell; use another --out")
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, record)


def _minutes(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def run_sweep(
    plan: SweepPlan,
    cluster: str | None = None,
    slurm: dict[str, str] | None = None,
    echo=print,
) -> dict:
    """Run (or continue) a sweep and write its report; returns the summary."""
    if plan.launcher not in LAUNCHERS:
        raise ConfigError(f"--launcher {plan.launcher!r}: expected one of {', '.join(LAUNCHERS)}")
    if plan.jobs < 1:
        raise ConfigError(f"--jobs {plan.jobs}: expected >= 1")
    if plan.launcher == "submitit":
        require_package("submitit", "--launcher submitit")
    if not plan.cells:
        raise ConfigError("nothing to sweep: give --grid KEY=V1,V2 or --cell KEY=V,... (or cells/grid in a sweep file)")
    if plan.baseline:
        find_baseline(plan.baseline, plan.cells)
    threads = threads_per_job(plan.jobs)
    if plan.launcher == "submitit" and cluster != "local":
        threads = int((slurm or {}).get("cpus_per_task", threads))
    record = _record_sweep(plan, find_baseline(plan.baseline, plan.cells).name if plan.baseline else None)
    todo = plan_jobs(plan, threads)  # every config checked: a bad cell fails here, before anything is written
    plan.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(plan.out / SWEEP_FILE, record)
    _write_cells(plan)
    n_runs = len(plan.cells) * len(plan.seeds)
    finished_before = n_runs - sum(j.kind == "train" for j in todo)
    echo(
        f"sweep {plan.out}: {len(plan.cells)} cells x {len(plan.seeds)} seeds = {n_runs} runs; "
        f"{finished_before} finished earlier, {len(todo)} to do; "
        f"{plan.jobs} at a time, {threads} thread(s) each, launcher {plan.launcher}"
    )
    counter = {"n": finished_before}
    total_jobs = finished_before + len(todo)
    started = time.time()

    def report(event: str, job: SweepJob, outcome, eta_s: float) -> None:
        if event != "running":
            counter["n"] += 1
        head = f"[{counter['n']:>{len(str(total_jobs))}}/{total_jobs}] {event:<7} {job.label}"
        if event == "running":
            echo(head)
        elif event == "done":
            result = json.loads((Path(job.run_dir) / RESULT_FILE).read_text(encoding="utf-8"))
            echo(
                f"{head}  Acc@{result['k']} {result['acc_at_k']:.2f}  Len@{result['k']} {result['len_at_k']:.1f}"
                f"  · ETA {_minutes(eta_s)}"
            )
        else:
            echo(f"{head}: {outcome.message} (log: {outcome.log})")

    if plan.launcher == "local":

        def start(job):
            return _LocalHandle(job, Path(job.run_dir).parent / f"{Path(job.run_dir).name}.log")

    else:
        executor = make_executor(plan.out / "submitit", cluster, threads, slurm)

        def start(job):
            return _SubmititHandle(executor, job)

    outcomes = run_jobs(todo, start, plan.jobs, report)
    failed = [label for label, o in outcomes.items() if not o.ok]
    summary = write_report(plan.out, record["baseline"])
    echo(
        f"sweep: {len(outcomes) - len(failed)} done now, {finished_before} earlier, {len(failed)} failed"
        f"{' (' + ', '.join(failed) + ')' if failed else ''} in {_minutes(time.time() - started)}; "
        f"report: {plan.out / 'summary.md'}"
    )
    if failed:
        echo("re-run the same command to retry the failed runs (finished ones are kept)")
    summary["failed"] = failed
    return summary


def plan_from_options(
    config: str,
    grid: list[str],
    cells: list[str],
    seeds: str | None,
    out: str | None,
    overrides: list[str],
    baseline: str | None,
    setup: str | None,
    jobs: int | None,
    launcher: str | None,
) -> SweepPlan:
    """A `SweepPlan` from the command line, on top of a sweep file when CONFIG is one."""
    from forkrl.sweep.grid import (
        cells_from_file,
        expand_cells,
        grid_from_file,
        load_sweep_file,
        parse_cell,
        parse_grid,
        parse_seeds,
        resolve_path,
    )

    if not os.path.isfile(config):
        raise ConfigError(f"config file not found: {config}")
    spec = load_sweep_file(config)
    sweep_file = config if spec else None
    listed = [parse_cell(c) for c in cells] if cells else cells_from_file(spec.get("cells"), config)
    axes = parse_grid(grid) if grid else grid_from_file(spec.get("grid"), config)
    out_dir = out or spec.get("out")
    if not out_dir:
        raise ConfigError("--out DIR: where the sweep's runs and report go")
    seed_list = parse_seeds(seeds if seeds is not None else spec.get("seeds", [0]))
    base_overrides = list(spec.get("overrides") or []) + list(overrides or [])
    return SweepPlan(
        config=resolve_path(spec["config"], sweep_file) if spec else config,
        cells=expand_cells(listed, axes) if (listed or axes) else [],
        seeds=seed_list,
        out=Path(out_dir),
        overrides=base_overrides,
        baseline=baseline or spec.get("baseline"),
        setup=setup or spec.get("setup"),
        jobs=jobs if jobs is not None else _file_int(spec, "jobs", 1, config),
        launcher=launcher or spec.get("launcher", "local"),
    )


def _file_int(spec: dict, key: str, default: int, path: str) -> int:
    value = spec.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{path}: {key} = {value!r}: expected an integer")
    return value


__all__ = ["Cell", "plan_from_options", "run_sweep"]
