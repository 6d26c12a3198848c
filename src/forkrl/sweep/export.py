"""`forkrl sweep export DIR DEST`: a sweep's results without its run directories, small enough to commit.

DEST gets `sweep.json`, the report (`summary.json`, `summary.md`, `figures/`), the base model's
evaluations, and for every finished run its `sweep_result.json`, `metrics.jsonl`, `config.yaml`
and final `eval.md`: everything `forkrl sweep report` reads, and none of the checkpoints,
TensorBoard logs or samples. Copying DEST back as a sweep directory continues the sweep: the runner
treats a run with its `sweep_result.json` as done (`forkrl.sweep.runner`), so only the missing runs
are trained.

DEST holds one sweep. Before anything is copied the export checks it (`check_dest`): a DEST that
holds another sweep's results (another config, overrides or setup in its `sweep.json`), or files in
the way without a `sweep.json`, or cells and seeds of this sweep that DIR lacks (DIR would be an
older state of it), is refused, naming both. So a file already in DEST is replaced only by a newer
result of the same sweep; files are copied atomically.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from forkrl.sweep.report import SWEEP_FILE, SweepReportError, load_sweep
from forkrl.sweep.runner import FINAL_EVAL_DIR, RESULT_FILE

RUN_FILES = (RESULT_FILE, "metrics.jsonl", "config.yaml", f"{FINAL_EVAL_DIR}/eval.md")
TOP_FILES = (SWEEP_FILE, "summary.json", "summary.md")
IDENTITY = ("config", "overrides", "setup")
"""What makes two sweep records one sweep (`forkrl.sweep.run` refuses a directory whose differ)."""


def export_results(directory: str | Path, dest: str | Path) -> list[Path]:
    """Copy the results of the sweep in `directory` to `dest`; returns the files written."""
    src, dst = Path(directory), Path(dest)
    sweep = load_sweep(src)  # a clear error for a directory that is not a sweep
    if dst.resolve() == src.resolve():
        raise SweepReportError(f"export to {dest}: that is the sweep directory itself")
    pairs = [(src / name, dst / name) for name in TOP_FILES]
    pairs += [(figure, dst / "figures" / figure.name) for figure in sorted((src / "figures").glob("*.png"))]
    for result in sorted(src.glob(f"*/seed_*/{RESULT_FILE}")):
        run = result.parent
        pairs += [(run / name, dst / run.relative_to(src) / name) for name in RUN_FILES]
    pairs = [(s, t) for s, t in pairs if s.is_file()]
    check_dest(src, sweep, dst, [t for _, t in pairs])
    written: list[Path] = []
    for source, target in pairs:
        written += _copy(source, target)
    return written


def check_dest(src: Path, sweep: dict[str, Any], dst: Path, targets: list[Path]) -> None:
    """Refuse (`SweepReportError`, naming both) a DEST that holds another sweep's results, files in the
    way of an export without a `sweep.json`, or more of this sweep than `src` has."""
    if dst.exists() and not dst.is_dir():
        raise SweepReportError(f"export {src} to {dst}: {dst} is a file, not a directory")
    record = dst / SWEEP_FILE
    if not record.is_file():
        in_the_way = [t for t in targets if t.exists()]
        if in_the_way:
            raise SweepReportError(
                f"export {src} to {dst}: {in_the_way[0]} is already there, and {dst} holds no {SWEEP_FILE} "
                "(not an export of this sweep); choose an empty or new folder"
            )
        return
    try:
        theirs = json.loads(record.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SweepReportError(f"export {src} to {dst}: {record} is not valid JSON ({err})") from None
    differ = [key for key in IDENTITY if theirs.get(key) != sweep.get(key)]
    if differ:
        key = differ[0]
        raise SweepReportError(
            f"export {src} to {dst}: {dst} holds the results of another sweep ({key} = {theirs.get(key)!r} in "
            f"{record}, {key} = {sweep.get(key)!r} in {src / SWEEP_FILE}); export to another folder"
        )
    cells = {c["name"] for c in sweep.get("cells", [])}
    extra_cells = [c["name"] for c in theirs.get("cells", []) if c["name"] not in cells]
    extra_seeds = sorted(set(theirs.get("seeds", [])) - set(sweep.get("seeds", [])))
    if extra_cells or extra_seeds:
        more = ", ".join([*(f"cell {c}" for c in extra_cells), *(f"seed {s}" for s in extra_seeds)])
        raise SweepReportError(
            f"export {src} to {dst}: {dst} holds more of this sweep than {src} ({more}); its report would be "
            f"replaced by an older one: export from the sweep directory that has them"
        )


def _copy(source: Path, target: Path) -> list[Path]:
    if target.is_file() and target.read_bytes() == source.read_bytes():
        return []
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.copyfile(source, tmp)
    tmp.replace(target)
    return [target]
