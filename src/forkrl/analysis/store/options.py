"""`StoreOptions`: how a rollout store is made, passed whole from the CLI to the store builders.

One frozen object carries the sampling settings, the reward and the field names of the input
files from `forkrl analyze store` through `run_store` to `generate_store` / `store_from_jsonl`;
each of them reads the fields it needs (listed in its docstring). `open_reward` turns the
reward fields into a `RewardComputer` that is closed when the store is written.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from forkrl.tasks.rewards import RewardComputer, RewardFn

__all__ = ["StoreOptions", "open_reward"]


@dataclass(frozen=True)
class StoreOptions:
    """How to make a store. Defaults are those of `forkrl analyze store`."""

    # -- sampling (generate_store)
    k: int = 4
    """Responses sampled per prompt; sample `j` of prompt `i` is `sample_id = i * k + j`."""
    max_new_tokens: int = 1024
    """Response length limit; a response that reaches it without EOS has `finished = False`."""
    temperature: float = 1.0
    """Sampling temperature T: the stored `entropy` is of softmax(z / T). For responses read from
    a jsonl file, the temperature of their teacher-forced scoring."""
    top_p: float = 1.0
    """Nucleus mass (1 = off). With top-p/k on, `logprob` is of the truncated distribution the
    token was drawn from, so it differs from a teacher-forced re-scoring."""
    top_k: int = 0
    """Keep the k most likely tokens (0 = off)."""
    batch_size: int = 16
    """Sequences per generation call or per scoring forward. The stored values do not depend on
    it: every sample has its own row seed."""
    seed: int = 0
    """Base seed; sample `s` is drawn with a row seed derived from `(seed, s)`."""
    eos_token_ids: tuple[int, ...] | None = None
    """Tokens that end a response, for the default HF backend (None: the tokenizer's and the
    model's EOS). A backend passed to `generate_store` brings its own."""

    # -- reward (both sources)
    reward: str | RewardFn | None = None
    """Score each response: a registered name ("math"), "module:function", or a callable
    `(completion, example) -> float` (see `RewardComputer`); None leaves `reward` null."""
    reward_timeout_s: float | None = None
    """Per-response time limit of the reward; None keeps `RewardComputer`'s default."""
    answer_key: str = "answer"
    """Field of the reference answer the reward compares with (prompt files and jsonl rows)."""

    # -- prompt files (run_store with `data`)
    question_key: str = "question"
    """Field of the question in the prompt files."""
    template: str = "paper"
    """Prompt template the questions are rendered with (see `load_prompts`)."""
    split: str = "test"
    """Split of a `datasets` source."""
    limit: int | None = None
    """Only the first `limit` prompts of each prompt file, or the first `limit` rows of a jsonl
    file of responses; None: all."""

    # -- responses from a file (store_from_jsonl)
    prompt_key: str = "prompt"
    """Field of the exact prompt text a response was conditioned on."""
    response_key: str = "response"
    """Field of the response text."""

    def __post_init__(self):
        if self.k < 1 or self.batch_size < 1:
            raise ValueError(f"need k >= 1 and batch_size >= 1, got k={self.k}, batch_size={self.batch_size}")
        if self.eos_token_ids is not None:  # a list is accepted and kept as a tuple (frozen, hashable)
            object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))


@contextlib.contextmanager
def open_reward(options: StoreOptions) -> Iterator[RewardComputer | None]:
    """The `RewardComputer` of `options.reward` (None without one), closed when the block ends."""
    if options.reward is None:
        yield None
        return
    from forkrl.tasks.rewards import RewardComputer  # math-verify and worker pools: only when scoring

    if options.reward_timeout_s is None:
        rewards = RewardComputer(options.reward)
    else:
        rewards = RewardComputer(options.reward, timeout_s=options.reward_timeout_s)
    try:
        yield rewards
    finally:
        rewards.close()
