"""The toy-task protocol: what a toy fills in (`ToyTask`) and the two skeletons that run it.

A toy is a task small enough to train a base model for from scratch on a CPU and then improve with
RL in minutes. Every toy runs the same two procedures; a toy is one `ToyTask` subclass holding
what differs, registered under its name (`@register_toy_task("name")`, or by import path), which
is what `forkrl toy build --task NAME` and `forkrl demo --task NAME` look up.

`build_base_model(task, out)` — `forkrl toy build`:

1. the tokenizer and the training traces (`task.tokenizer`, `task.training_traces`);
2. a randomly initialised Qwen3-shaped model of the config's sizes (`build_tiny_model`);
3. supervised next-token training on the traces (`forkrl.toy.supervised.train_on_traces`);
4. the toy's measurements of the trained model (`task.evaluate`);
5. an ordinary Hugging Face model directory plus `toy_build.json` (the settings and
   measurements), written atomically (`forkrl.io.atomic_dir`).

Everything depends only on the seed and the settings, so a rebuild with the same seed and thread
count gives the same weights (CPU float sums can differ with the number of threads).

`run_toy_demo(task)` — `forkrl demo`: the toy's recipe and data (`task.demo_recipe`,
`task.demo_data`), measure the base model (`task.measure`), train it with the recipe through the
`Trainer` a Qwen3 user runs, measure again, and write `report.json` and `report.md`
(`task.report`).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import transformers
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from forkrl import fast_paths
from forkrl.config import Config, config_from_dict
from forkrl.io import atomic_dir, atomic_write_json, atomic_write_text
from forkrl.models.loading import load_policy
from forkrl.models.tiny import build_tiny_model
from forkrl.registry import Registry
from forkrl.toy.supervised import ToyBuildSettings, TraceSequence, train_on_traces

__all__ = [
    "BUILD_INFO_FILE",
    "TOY_CHAT_TEMPLATE",
    "TOY_TASKS",
    "DemoReport",
    "DemoRun",
    "ToyTask",
    "build_base_model",
    "build_command",
    "build_settings",
    "register_toy_task",
    "run_toy_demo",
    "toy_task",
]

BUILD_INFO_FILE = "toy_build.json"
"""The build's settings and measurements, beside the model's files."""

TOY_CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}\n{% endfor %}"
"""Renders a user message as the toys' prompt templates do (question + newline), so that
``template="chat"`` and the toy's own template give the model the same prompt."""


class ToyTask:
    """What a toy fills in. The build needs the attributes and the build hooks; the demo the rest.

    The hooks are methods of an instance without state; the skeletons call them in the order
    listed here.
    """

    name: ClassVar[str]
    """The registered name (`--task NAME`)."""
    config_class: ClassVar[type[ToyBuildSettings]]
    """The build's settings: `ToyBuildSettings` plus the toy's data and evaluation fields."""
    shipped_model: ClassVar[Path]
    """The base model shipped in the package (`forkrl toy build --task NAME --seed 0`)."""
    label: ClassVar[str] = "toy model"
    """What the build writes, in messages ("toy model written to ...")."""
    missing_label: ClassVar[str] = "toy model"
    """The base model, in the demo's error when there is none ("no toy model at ...")."""
    records_task_name: ClassVar[bool] = True
    """Record `"task": name` first in `toy_build.json`."""
    demo_steps: ClassVar[int] = 50
    """RL steps of `forkrl demo --task NAME` without `--steps`."""
    demo_out: ClassVar[str] = "runs/demo"
    """Its run directory without `--out`."""
    demo_eval: ClassVar[int] = 256
    """Its held-out examples without `--eval-problems`."""

    # ------------------------------------------------------------------ build hooks

    def tokenizer(self, config: ToyBuildSettings) -> PreTrainedTokenizerFast:
        """The toy's tokenizer (`forkrl.models.tiny.build_tiny_tokenizer` over its vocabulary)."""
        raise NotImplementedError

    def training_traces(
        self, config: ToyBuildSettings, tokenizer: PreTrainedTokenizerFast
    ) -> tuple[list[TraceSequence], dict[str, Any]]:
        """`config.num_traces` tokenized training traces, and what to record about them (may be {})."""
        raise NotImplementedError

    def evaluate(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, config: ToyBuildSettings
    ) -> dict[str, Any]:
        """Measurements of the trained model, recorded in `toy_build.json` ({} to measure nothing)."""
        raise NotImplementedError

    def headline(self, info: dict[str, Any]) -> str:
        """The build command's line after "final loss X" (from `toy_build.json`), e.g. ", Acc@8 12.3%"."""
        return ""

    # ------------------------------------------------------------------ demo hooks

    def demo_data(self, seed: int, base: Path, num_eval: int) -> Any:
        """The demo's training data (drawn with `seed`) and held-out set (`num_eval` examples,
        the same for every seed); nothing written yet."""
        raise NotImplementedError

    def demo_recipe(self, seed: int, output_dir: Path, train_file: Path, base: Path) -> dict[str, Any]:
        """The toy's recipe as a nested config dict, with `seed`, `output_dir`, the model and the data set."""
        raise NotImplementedError

    def write_demo_data(self, data_dir: Path, data: Any, cfg: Config) -> None:
        """Write `data` as `data_dir/train.jsonl` (what `demo_recipe` trains on) and `data_dir/test.jsonl`."""
        raise NotImplementedError

    def measure(self, model, tokenizer, data: Any, cfg: Config, seed: int, out: Path, when: str) -> Any:
        """Measure `model` on the held-out set (`when`: "before" or "after" training)."""
        raise NotImplementedError

    def measurement_line(self, measured: Any) -> str:
        """The base model's headline numbers, printed before training starts."""
        raise NotImplementedError

    def report(self, run: DemoRun, before: Any, after: Any) -> DemoReport:
        """Plots (written into `run.out`), the before/after table, `report.json`'s content and `report.md`."""
        raise NotImplementedError


TOY_TASKS: Registry[type[ToyTask]] = Registry("toy task")
"""The toy tasks by name; the first one is the default of the commands."""
TOY_TASKS.register_lazy("countdown", "forkrl.toy.demo:CountdownTask")
TOY_TASKS.register_lazy("forecast", "forkrl.toy.forecast_demo:ForecastTask")


def register_toy_task(name: str):
    """Class decorator: `@register_toy_task("name")` on a `ToyTask` subclass sets its `name` and registers it."""

    def add(cls: type[ToyTask]) -> type[ToyTask]:
        cls.name = name
        return TOY_TASKS.register(name, cls)

    return add


def toy_task(name: str) -> ToyTask:
    """The registered toy `name`; `ValueError` naming the registered ones when there is none."""
    return TOY_TASKS.get(name)()


def build_settings(base: str | os.PathLike) -> dict[str, Any]:
    """The build settings (`toy_build.json`'s "config") of a toy base model, {} when it has none."""
    info = Path(base) / BUILD_INFO_FILE
    return json.loads(info.read_text())["config"] if info.is_file() else {}


# ---------------------------------------------------------------------------- build


def build_base_model(
    task: ToyTask,
    out_dir: str | os.PathLike,
    config: ToyBuildSettings | None = None,
    overwrite: bool = False,
    **overrides: Any,
) -> Path:
    """Train `task`'s base model and write it to `out_dir` (module docstring); returns the path.

    Settings come from `config` (default: `task.config_class()`) with keyword `overrides` applied
    (e.g. ``seed=1, steps=20``). The directory is assembled in a temporary sibling and renamed
    into place; an existing `out_dir` raises FileExistsError unless `overwrite`.
    """
    config = task.config_class(**{**asdict(config or task.config_class()), **overrides})
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (pass overwrite=True to replace it)")
    started = time.perf_counter()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        tokenizer = task.tokenizer(config)
        seqs, data_info = task.training_traces(config, tokenizer)
        model = build_tiny_model(
            tokenizer,
            hidden_size=config.hidden_size,
            num_layers=config.num_layers,
            num_heads=config.num_heads,
            num_kv_heads=config.num_kv_heads,
            intermediate_size=config.intermediate_size,
            max_position_embeddings=config.max_position_embeddings,
            seed=config.seed,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)  # nothing in training draws from it today; pinned for safety
            curve = train_on_traces(model, seqs, tokenizer.pad_token_id, config)
        info: dict[str, Any] = {"task": task.name} if task.records_task_name else {}
        info.update(
            {
                "config": asdict(config),
                "num_parameters": sum(p.numel() for p in model.parameters()),
                **data_info,
                "final_loss": curve[-1]["loss"] if curve else None,
                "loss_curve": curve,
                "train_seconds": curve[-1]["seconds"] if curve else 0.0,
                "torch_version": torch.__version__,
            }
        )
        info.update(task.evaluate(model, tokenizer, config))
        info["total_seconds"] = time.perf_counter() - started
        with atomic_dir(out) as tmp:
            model.save_pretrained(tmp)  # safetensors
            tokenizer.save_pretrained(tmp)
            (tmp / BUILD_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    finally:
        torch.set_num_threads(previous_threads)
    return out


def build_command(task: ToyTask, seed: int, out: str | os.PathLike, overwrite: bool = False, **overrides: Any) -> Path:
    """What ``forkrl toy build --task NAME --seed S --out DIR`` runs: build, then print the headline numbers."""
    path = build_base_model(task, out, seed=seed, overwrite=overwrite, **overrides)
    info = json.loads((path / BUILD_INFO_FILE).read_text())
    line = f"{task.label} written to {path}: final loss {info['final_loss']:.4f}{task.headline(info)}"
    print(line + f" ({info['total_seconds']:.0f} s)")
    return path


# ---------------------------------------------------------------------------- demo


@dataclass
class DemoRun:
    """What a toy's `report` hook gets besides the two measurements."""

    out: Path
    """The demo's directory; the trainer's run is `out / "run"`."""
    cfg: Config
    """The resolved training config."""
    last_metrics: dict[str, Any]
    """The last training step's metrics."""
    fast_paths: dict[str, str]
    """Which speed-ups ran, in the measurements and the training (`forkrl.fast_paths`)."""
    seed: int
    """The demo's seed (the training data and the run; the held-out set is the same for every seed)."""
    steps: int
    """RL steps trained."""
    num_eval: int
    """Held-out examples measured before and after."""
    started: float
    """`time.perf_counter()` at the start of the demo."""

    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def environment(self, with_fast_paths: bool = True) -> dict[str, Any]:
        """How the CPU was used (timings depend on it; see `forkrl.cli._omp_wait_policy`), which speed-ups
        ran (a declined one is also warned about in the log) and the transformers version."""
        env: dict[str, Any] = {
            "threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default (spin)"),
        }
        if with_fast_paths:
            env["fast_paths"] = self.fast_paths
        env["transformers"] = transformers.__version__
        return env


@dataclass
class DemoReport:
    """A toy demo's results: `report.json` (`summary`, which has `seconds`), `report.md`, the printed table."""

    summary: dict[str, Any]
    markdown: str
    table: str


def run_toy_demo(
    task: ToyTask,
    steps: int | None = None,
    strategy: str | None = None,
    ratio: float | None = None,
    seed: int = 0,
    out: str | os.PathLike | None = None,
    base_model: str | os.PathLike | None = None,
    num_eval: int | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Run `task`'s demo; returns the report's numbers (also in `OUT/report.json`).

    None keeps the task's defaults (`demo_steps`, `demo_out`, `demo_eval`, the recipe's selection
    strategy and ratio). An earlier demo in `out` is kept, renamed `OUT.old-YYYYmmdd-HHMMSS` once
    this one's config is known to be good (so `make demo` twice in a row just works and never
    mixes two runs in one report); `out` is locked while the demo runs, so a second demo into it
    stops at once.
    """
    from forkrl.train.run_dir import RunDirectory

    out = Path(out or task.demo_out)
    steps = task.demo_steps if steps is None else steps
    num_eval = task.demo_eval if num_eval is None else num_eval
    with RunDirectory(out, "overwrite") as run:
        return _run_toy_demo(task, steps, strategy, ratio, seed, out, base_model, num_eval, overrides, run.prepare)


def _run_toy_demo(
    task: ToyTask,
    steps: int,
    strategy: str | None,
    ratio: float | None,
    seed: int,
    out: Path,
    base_model: str | os.PathLike | None,
    num_eval: int,
    overrides: list[str] | None,
    prepare_out,
) -> dict[str, Any]:
    started = time.perf_counter()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    base = Path(base_model) if base_model else task.shipped_model
    if not (base / "config.json").is_file():
        flag = "" if task.name == next(iter(TOY_TASKS)) else f" --task {task.name}"
        raise FileNotFoundError(
            f"no {task.missing_label} at {base}: build one with `forkrl toy build{flag} --seed 0 --out {base}`"
        )
    data = task.demo_data(seed, base, num_eval)
    # The config first: a bad override fails before any measuring. The hyperparameters are the
    # recipe's; the command line sets the selection and the number of steps.
    recipe = task.demo_recipe(seed, out / "run", out / "data" / "train.jsonl", base)
    if strategy is not None:
        recipe["selection"]["strategy"] = strategy
    if ratio is not None:
        recipe["selection"]["ratio"] = ratio
    recipe["trainer"]["total_steps"] = steps
    cfg = config_from_dict(recipe, overrides, check_files=False)  # the data files are written below
    prepare_out()  # nothing is written into OUT before this point
    (out / "data").mkdir(parents=True)
    task.write_demo_data(out / "data", data, cfg)

    model, tokenizer = load_policy(base, dtype="float32", device="cpu")
    fast_paths.reset()
    before = task.measure(model, tokenizer, data, cfg, seed + 1, out, "before")
    paths_before = fast_paths.status()  # the Trainer starts its own record
    print(f"base model: {task.measurement_line(before)}", flush=True)
    del model

    from forkrl.train.trainer import Trainer

    trainer = Trainer(cfg)
    last = trainer.train()
    after = task.measure(trainer.model, tokenizer, data, cfg, seed + 1, out, "after")

    paths = fast_paths.combine(paths_before, fast_paths.status())
    run = DemoRun(out, cfg, last, paths, seed=seed, steps=steps, num_eval=num_eval, started=started)
    report = task.report(run, before, after)
    atomic_write_json(out / "report.json", report.summary)
    atomic_write_text(out / "report.md", report.markdown)
    print(report.table)
    print(f"report: {out / 'report.md'} ({report.summary['seconds']:.0f} s)")
    return report.summary
