"""Optional packages: which settings need which extra, checked before anything expensive is loaded or
anything is written (a missing package used to surface only after the model had loaded, as a traceback,
with the run directory already half written)."""

from __future__ import annotations

import importlib.util

from forkrl.errors import ConfigError

__all__ = ["INSTALL", "check_config_extras", "require_package"]

INSTALL = {
    "wandb": "pip install 'forkrl[wandb]'",
    "peft": "pip install 'forkrl[lora]'",
    "submitit": "pip install 'forkrl[slurm]'",
}
"""How to install each optional package a setting may need."""


def require_package(package: str, setting: str) -> None:
    """`ConfigError` naming `setting` and how to install `package` when it is not importable."""
    try:
        found = importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        how = INSTALL.get(package, f"pip install {package}")
        raise ConfigError(f"{setting} needs the {package} package, which is not installed: {how}")


def check_config_extras(cfg) -> None:
    """Every optional package the training config `cfg` needs is installed (W&B logging, LoRA; a
    generation backend's own package, e.g. vllm, is checked with the config: `BackendCapabilities.requires`).
    TensorBoard is not among them: `trainer.tensorboard` (on by default) writes events only when
    tensorboard is installed."""
    if cfg.trainer.wandb_project:
        require_package("wandb", f"trainer.wandb_project = {cfg.trainer.wandb_project!r}")
    if cfg.model.lora_rank > 0:
        require_package("peft", f"model.lora_rank = {cfg.model.lora_rank}")
