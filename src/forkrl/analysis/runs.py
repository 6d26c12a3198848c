"""Reading training run directories (`forkrl train` output) for the analyses: metrics, config, evals.

A run directory holds `metrics.jsonl` (one JSON object per step, nulls for NaN), `config.yaml`
(the resolved config) and `eval/step_NNNNNN/eval.json` reports. `load_run` reads all three into
a `Run`; `Run.series(key)` gives one metric over steps with the nulls skipped. Every error names
the file and the key that is missing, as a `RunError`.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from forkrl.errors import UserError

__all__ = [
    "Run",
    "RunError",
    "RunGroup",
    "group_by_setting",
    "load_run",
    "load_runs",
    "mean_and_stderr",
    "resolve_accuracy_key",
    "selection_label",
]

GROUPING_IGNORED_KEYS = frozenset(
    {
        "output_dir",
        "trainer.device",
        "trainer.tensorboard",
        "trainer.wandb_project",
        "trainer.save_every",
        "trainer.keep_checkpoints",
        "trainer.log_samples",
    }
)
"""Config keys that do not change what a run computes (besides any key named `seed`): runs that
differ only in these and in seeds are seeds of one setting."""

_EVAL_DIR = re.compile(r"^step_(\d+)$")


class RunError(UserError):
    """A run directory that cannot be analysed; the message names the file and the key."""


@dataclass
class Run:
    """One training run as the analyses see it."""

    path: Path
    name: str
    """The directory name."""
    label: str
    """A legend label from the config (`top 20%`, `all tokens`, ...), the directory name without one."""
    config: dict[str, Any]
    """The resolved `config.yaml` ({} when the file is missing)."""
    records: list[dict[str, Any]]
    """`metrics.jsonl` records, one per step, sorted by step (the last record wins on a repeated step)."""
    evals: dict[int, dict[str, Any]] = field(default_factory=dict)
    """`eval/step_N/eval.json` contents by step N."""

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    def has_metric(self, key: str) -> bool:
        return any(key in r for r in self.records)

    def metric_keys(self) -> list[str]:
        """Every key that appears in some record, sorted."""
        return sorted({k for r in self.records for k in r})

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of metric `key` at the steps where it is a finite number.

        Raises `RunError` naming `metrics.jsonl` and the key when no record has the key at all
        (a key present only as null gives two empty arrays).
        """
        if not self.has_metric(key):
            raise RunError(f"{self.metrics_file}: no metric {key!r}; {_available(self.metric_keys())}")
        steps, values = [], []
        for r in self.records:
            v = r.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                steps.append(r["step"])
                values.append(float(v))
        return np.asarray(steps, dtype=np.int64), np.asarray(values, dtype=np.float64)

    def config_value(self, dotted: str, default: Any = None) -> Any:
        node: Any = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    def setting(self) -> tuple | None:
        """A hashable key of the config without seeds and bookkeeping keys (None without a config)."""
        if not self.config:
            return None
        flat = _flatten(self.config)
        kept = {k: v for k, v in flat.items() if k not in GROUPING_IGNORED_KEYS and k.rsplit(".", 1)[-1] != "seed"}
        return tuple(sorted((k, json.dumps(v, sort_keys=True, default=str)) for k, v in kept.items()))


def load_run(run_dir: str | os.PathLike) -> Run:
    """Read `metrics.jsonl`, `config.yaml` (optional) and `eval/step_*/eval.json` of a run directory."""
    path = Path(run_dir)
    if not path.is_dir():
        raise RunError(f"{path}: not a run directory (expected the output_dir of `forkrl train`)")
    metrics_file = path / "metrics.jsonl"
    if not metrics_file.is_file():
        raise RunError(f"{metrics_file}: missing (is {path} a `forkrl train` run directory?)")
    records = _read_metrics(metrics_file)

    config: dict[str, Any] = {}
    config_file = path / "config.yaml"
    if config_file.is_file():
        try:
            config = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise RunError(f"{config_file}: not valid YAML ({' '.join(str(err).split())})") from err
        if not isinstance(config, dict):
            raise RunError(f"{config_file}: expected a mapping at the top level")

    evals: dict[int, dict[str, Any]] = {}
    if (path / "eval").is_dir():
        for sub in sorted((path / "eval").iterdir()):
            m = _EVAL_DIR.match(sub.name)
            report = sub / "eval.json"
            if m and report.is_file():
                try:
                    evals[int(m.group(1))] = json.loads(report.read_text(encoding="utf-8"))
                except (json.JSONDecodeError, UnicodeDecodeError) as err:
                    raise RunError(f"{report}: not valid JSON ({err})") from err

    name = path.resolve().name
    return Run(path=path, name=name, label=selection_label(config) or name, config=config, records=records, evals=evals)


def load_runs(run_dirs: Sequence[str | os.PathLike] | str | os.PathLike) -> list[Run]:
    """`load_run` for each directory; labels that would collide get the differing config keys appended."""
    if isinstance(run_dirs, (str, os.PathLike)):
        run_dirs = [run_dirs]
    if not run_dirs:
        raise RunError("no run directories given")
    runs = [load_run(d) for d in run_dirs]
    _disambiguate_labels(runs)
    return runs


def _read_metrics(metrics_file: Path) -> list[dict[str, Any]]:
    try:
        lines = metrics_file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise RunError(f"{metrics_file}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    by_step: dict[int, dict[str, Any]] = {}
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if i == len(lines) - 1:  # the last line of a run that was killed mid-write
                continue
            raise RunError(f"{metrics_file}, line {i + 1}: not valid JSON ({err})") from err
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise RunError(f"{metrics_file}, line {i + 1}: expected an object with an integer 'step'")
        by_step[record["step"]] = record
    if not by_step:
        raise RunError(f"{metrics_file}: no records")
    return [by_step[s] for s in sorted(by_step)]


def _available(keys: Iterable[str], limit: int = 30) -> str:
    keys = [k for k in keys if k != "step"]
    shown = ", ".join(keys[:limit]) + (", ..." if len(keys) > limit else "")
    return f"available: {shown}" if keys else "the file has no metrics"


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(_flatten(v, key + "."))
        else:
            flat[key] = v
    return flat


def resolve_accuracy_key(run: Run, key: str) -> str:
    """`key` itself when the run logs it, else `eval/<key>/acc_at_k` (so `aime24` names a benchmark)."""
    if run.has_metric(key):
        return key
    if run.has_metric(f"eval/{key}/acc_at_k"):
        return f"eval/{key}/acc_at_k"
    choices = [k for k in run.metric_keys() if k == "accuracy" or k.endswith("/acc_at_k")]
    raise RunError(
        f"{run.metrics_file}: no accuracy metric {key!r} (nor eval/{key}/acc_at_k); "
        f"choose one of: {', '.join(choices) or 'none logged'}"
    )


# ---------------------------------------------------------------------------- labels and seeds


_LOSS_NAMES = {"clip_cov": "Clip-Cov", "kl_cov": "KL-Cov"}


def selection_label(config: dict[str, Any]) -> str | None:
    """`top 20%`, `bottom 80%`, `random 20%`, `all tokens` from `selection.*` (with `Clip-Cov` /
    `KL-Cov` for those losses); None when the config has no selection section."""
    selection = config.get("selection")
    loss = _LOSS_NAMES.get((config.get("loss") or {}).get("policy_loss", ""))
    if not isinstance(selection, dict) or "strategy" not in selection:
        return loss
    strategy = selection["strategy"]
    ratio = selection.get("ratio", 1.0)
    if strategy == "all":
        tokens = "all tokens"
    else:
        tokens = f"{strategy} {100 * float(ratio):g}%"
    if loss:
        return loss if strategy == "all" else f"{loss}, {tokens}"
    return tokens


def _disambiguate_labels(runs: list[Run]) -> None:
    """Append `key=value` of the config keys that differ between settings sharing a label."""
    by_label: dict[str, list[Run]] = {}
    for run in runs:
        by_label.setdefault(run.label, []).append(run)
    for label, same in by_label.items():
        settings = {run.setting() for run in same}
        if len(settings) < 2:
            continue
        if None in settings:  # no config to tell them apart
            for run in same:
                run.label = f"{label} ({run.name})"
            continue
        flats = [dict(run.setting()) for run in same]
        differing = sorted({k for f in flats for k in f if len({g.get(k) for g in flats}) > 1})
        for run, flat in zip(same, flats):
            parts = [f"{k}={json.loads(flat[k]) if k in flat else '-'}" for k in differing[:3]]
            run.label = f"{label} ({', '.join(parts)})"


@dataclass
class RunGroup:
    """Runs of one setting that differ only in their seeds."""

    label: str
    runs: list[Run]

    @property
    def seeds(self) -> list[Any]:
        return [run.config_value("seed") for run in self.runs]


def group_by_setting(runs: Sequence[Run]) -> list[RunGroup]:
    """Group runs whose configs are equal up to seeds (`GROUPING_IGNORED_KEYS`), in first-seen order.

    A run without a config is a group of its own.
    """
    groups: dict[Any, RunGroup] = {}
    for i, run in enumerate(runs):
        key = run.setting() or ("__no_config__", i)
        if key not in groups:
            groups[key] = RunGroup(label=run.label, runs=[])
        groups[key].runs.append(run)
    return list(groups.values())


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and standard error of the mean, std(ddof=1)/sqrt(n); the error is None for n < 2."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return math.nan, None
    if x.size < 2:
        return float(x[0]), None
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(x.size))
