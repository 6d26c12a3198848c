"""The embedded toy: a tiny Countdown base model built from noisy-solver traces (`forkrl toy build`)."""

from forkrl.toy.build import (
    TOY_CHAT_TEMPLATE,
    ToyBuildConfig,
    build_toy_model,
    build_toy_tokenizer,
    toy_build_command,
)

__all__ = ["TOY_CHAT_TEMPLATE", "ToyBuildConfig", "build_toy_model", "build_toy_tokenizer", "toy_build_command"]
