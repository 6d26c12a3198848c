"""The toy Countdown recipe with its model and data, for `forkrl demo` and sweeps.

The recipe is `forkrl/toy/toy_countdown.yaml` (package data; `configs/toy_countdown.yaml` links to it).

The recipe file holds every hyperparameter; what it cannot hold is where things are on this
machine: the base model (the one shipped in the package, or another built by `forkrl toy build`),
the Countdown problems (generated from the base model's build settings and written as jsonl) and
the response length limit the base model was built for. `toy_config_dict` fills those in;
`toy_problems` draws the problems; `sweep_setup` is the `forkrl sweep --setup toy` hook, which
writes the data once into the sweep directory and never rewrites a file that is already there.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from forkrl.io import write_once
from forkrl.tasks.countdown import CountdownProblem, generate_problems, write_problems_jsonl
from forkrl.toy.build import SHIPPED_MODEL
from forkrl.toy.task import build_settings

TOY_RECIPE = Path(__file__).parent / "toy_countdown.yaml"
"""The recipe, shipped in the package (`configs/toy_countdown.yaml` is a link to it)."""
NUM_TRAIN_PROBLEMS = 4096
"""Training problems drawn per seed (with repeats: the sampler cycles through them)."""
NUM_TEST_PROBLEMS = 256
"""Held-out test-split problems (the demo's `--eval-problems` default)."""


def load_toy_recipe() -> dict[str, Any]:
    """The recipe as a nested dict (model and data still empty)."""
    return yaml.safe_load(TOY_RECIPE.read_text(encoding="utf-8"))


def toy_problems(
    seed: int, base: str | os.PathLike = SHIPPED_MODEL, num_test: int = NUM_TEST_PROBLEMS
) -> tuple[list[CountdownProblem], list[CountdownProblem]]:
    """(training problems drawn with `seed`, held-out test problems) for the base model's number ranges.

    The test problems are the build's own evaluation set (its fixed `eval_seed`), whatever `seed` is.
    """
    build = build_settings(base)
    gen = {k: build[k] for k in ("num_numbers", "max_number", "max_target", "max_value") if k in build}
    train = generate_problems(NUM_TRAIN_PROBLEMS, seed, "train", unique=False, **gen)
    test = generate_problems(num_test, int(build.get("eval_seed", 1234)), "test", **gen)
    return train, test


def max_new_tokens_of(base: str | os.PathLike) -> int:
    """Response length limit of the base model: its build's `eval_max_new_tokens`, else the recipe's."""
    build = build_settings(base)
    return int(build.get("eval_max_new_tokens", load_toy_recipe()["rollout"]["max_new_tokens"]))


def toy_config_dict(
    seed: int,
    output_dir: str | os.PathLike,
    train_file: str | os.PathLike,
    eval_file: str | os.PathLike | None = None,
    base: str | os.PathLike = SHIPPED_MODEL,
) -> dict[str, Any]:
    """The recipe with `seed`, `output_dir`, the model, the data files and the model's length limit set."""
    cfg = load_toy_recipe()
    cfg["seed"] = seed
    cfg["output_dir"] = str(output_dir)
    cfg["model"]["name"] = str(base)
    cfg["data"]["train_files"] = [str(train_file)]
    if eval_file is not None:
        cfg["data"]["eval_files"] = [str(eval_file)]
    cfg["rollout"]["max_new_tokens"] = max_new_tokens_of(base)
    return cfg


def _write_once(path: Path, problems: list[CountdownProblem]) -> Path:
    """Write `problems` to `path`, or check that the file already there holds exactly them."""
    return write_once(
        path,
        lambda tmp: write_problems_jsonl(tmp, problems),
        "problems than the toy recipe draws now (another base model or forkrl version?)",
    )


def sweep_setup(data_dir: str | os.PathLike, seed: int) -> list[str]:
    """`forkrl sweep --setup toy`: the toy data of `seed` in `data_dir`, as config overrides.

    Writes `data_dir/train_seed_<seed>.jsonl` (what `forkrl demo --seed <seed>` trains on) and
    `data_dir/test.jsonl` (the held-out problems) unless they are there already, and returns
    overrides that point the recipe at them and at the shipped base model.
    """
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    train, test = toy_problems(seed)
    train_file = _write_once(data_dir / f"train_seed_{seed}.jsonl", train)
    test_file = _write_once(data_dir / "test.jsonl", test)
    return [
        f"model.name={SHIPPED_MODEL}",
        f"data.train_files=[{train_file.resolve()}]",
        f"data.eval_files=[{test_file.resolve()}]",
        f"rollout.max_new_tokens={max_new_tokens_of(SHIPPED_MODEL)}",
    ]
