"""Verifiable tasks: prompt sources (`data`), answer checking (`math`) and reward plumbing (`rewards`)."""

from forkrl.tasks.data import (
    PAPER_TEMPLATE,
    PROMPT_TEMPLATES,
    PromptDataError,
    PromptExample,
    PromptSampler,
    load_prompts,
    render_prompt,
)
from forkrl.tasks.math import MathVerifier, extract_answer, math_reward, score_batch
from forkrl.tasks.rewards import (
    REWARD_FUNCTIONS,
    MathReward,
    RewardBatch,
    RewardComputer,
    RewardFn,
    load_reward_fn,
    overlong_penalty,
    register_reward,
)

__all__ = [
    "PAPER_TEMPLATE",
    "PROMPT_TEMPLATES",
    "REWARD_FUNCTIONS",
    "MathReward",
    "MathVerifier",
    "PromptDataError",
    "PromptExample",
    "PromptSampler",
    "RewardBatch",
    "RewardComputer",
    "RewardFn",
    "extract_answer",
    "load_prompts",
    "load_reward_fn",
    "math_reward",
    "overlong_penalty",
    "register_reward",
    "render_prompt",
    "score_batch",
]
# Tasks register their prompt templates ("countdown", "forecast") and rewards when imported.
from forkrl.tasks import countdown, forecast  # noqa: F401
