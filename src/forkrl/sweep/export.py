"""`forkrl sweep export DIR DEST`: a sweep's results without its run directories, small enough to commit.

DEST gets `sweep.json`, the report (`summary.json`, `summary.md`, `figures/`), the base model's
evaluations, and for every finished run its `sweep_result.json`, `metrics.jsonl`, `config.yaml`
and final `eval.md`: everything `forkrl sweep report` reads, and none of the checkpoints,
TensorBoard logs or samples. Copying DEST back as a sweep directory continues the sweep: the runner
treats a run with its `sweep_result.json` as done (`forkrl.sweep.runner`), so only the missing runs
are trained. Files are copied atomically; a file already in DEST that differs is replaced only by
the newer result of the same run.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from forkrl.sweep.report import SWEEP_FILE, load_sweep
from forkrl.sweep.runner import FINAL_EVAL_DIR, RESULT_FILE

RUN_FILES = (RESULT_FILE, "metrics.jsonl", "config.yaml", f"{FINAL_EVAL_DIR}/eval.md")
TOP_FILES = (SWEEP_FILE, "summary.json", "summary.md")


def export_results(directory: str | Path, dest: str | Path) -> list[Path]:
    """Copy the results of the sweep in `directory` to `dest`; returns the files written."""
    src, dst = Path(directory), Path(dest)
    load_sweep(src)  # a clear error for a directory that is not a sweep
    if dst.resolve() == src.resolve():
        raise ValueError(f"export to {dest}: that is the sweep directory itself")
    written: list[Path] = []
    for name in TOP_FILES:
        written += _copy(src / name, dst / name)
    for figure in sorted((src / "figures").glob("*.png")):
        written += _copy(figure, dst / "figures" / figure.name)
    for result in sorted(src.glob(f"*/seed_*/{RESULT_FILE}")):
        run = result.parent
        for name in RUN_FILES:
            written += _copy(run / name, dst / run.relative_to(src) / name)
    return written


def _copy(source: Path, target: Path) -> list[Path]:
    if not source.is_file():
        return []
    if target.is_file() and target.read_bytes() == source.read_bytes():
        return []
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.copyfile(source, tmp)
    tmp.replace(target)
    return [target]
