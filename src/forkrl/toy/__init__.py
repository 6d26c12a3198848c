"""The embedded toys: tiny base models built from scratch (`forkrl toy build`) and their RL demos (`forkrl demo`).

A toy is one `ToyTask` (`forkrl.toy.task`), registered by name: Countdown (`forkrl.toy.build`,
`forkrl.toy.demo`) and forecasting (`forkrl.toy.forecast_build`, `forkrl.toy.forecast_demo`).
"""

from forkrl.toy.build import (
    TOY_CHAT_TEMPLATE,
    ToyBuildConfig,
    build_toy_model,
    build_toy_tokenizer,
    toy_build_command,
)
from forkrl.toy.task import TOY_TASKS, ToyTask, register_toy_task

__all__ = [
    "TOY_CHAT_TEMPLATE",
    "TOY_TASKS",
    "ToyBuildConfig",
    "ToyTask",
    "build_toy_model",
    "build_toy_tokenizer",
    "register_toy_task",
    "toy_build_command",
]
