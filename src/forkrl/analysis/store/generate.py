"""`generate_store`: sample responses with any `GenerationBackend` and store the sampler's
per-token entropy and log-prob (prompts -> rollouts -> rows -> store)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from forkrl.analysis.store.options import StoreOptions, open_reward
from forkrl.analysis.store.rows import PieceDecoder, model_label, sample_columns, token_columns
from forkrl.analysis.store.schema import RolloutStore
from forkrl.analysis.store.writer import StoreWriter
from forkrl.seeding import mix_seed

if TYPE_CHECKING:
    import torch

    from forkrl.rollout.base import GenerationBackend, Rollout, SamplingParams
    from forkrl.tasks.data import PromptExample
    from forkrl.tasks.rewards import RewardComputer

__all__ = ["generate_store"]

logger = logging.getLogger(__name__)


def generate_store(
    model: torch.nn.Module | None,
    tokenizer,
    prompts: Sequence[PromptExample] | Sequence[str],
    out_dir: str | os.PathLike,
    options: StoreOptions | None = None,
    backend: GenerationBackend | None = None,
    model_name: str | None = None,
) -> RolloutStore:
    """Sample `options.k` responses per prompt and store them with the sampler's entropy and log-prob.

    Sample `j` of prompt `i` is `sample_id = i * k + j`; it is drawn with its own row seed
    derived from `(seed, sample_id)`, so the store does not depend on `batch_size`. Each batch of
    `batch_size` sample ids goes to `backend.generate(prompt texts, SamplingParams(...,
    row_seeds))`; the `Rollout` that comes back gives the tokens (`response_ids`, `response_mask`,
    `prompt_ids`, `finished`) and the stored `entropy` / `logprob` (`sampler_entropy`,
    `sampler_logprobs`), and the tokenizer decodes the response texts and token pieces.

    Args:
        model: the policy the default backend samples from; unused when `backend` is given (may
            then be None). Its `config.name_or_path` names the model in `store.json`.
        tokenizer: decodes responses (special tokens skipped) and single-token pieces.
        prompts: `PromptExample`s (from `load_prompts`; needed for a reward) or prompt texts.
        out_dir: the store directory.
        options: reads `k`, `max_new_tokens`, `temperature`, `top_p`, `top_k`, `batch_size`,
            `seed`, `eos_token_ids`, `reward`, `reward_timeout_s` (see `StoreOptions`).
        backend: a `GenerationBackend` honouring `SamplingParams.row_seeds`; default
            `HFGenerationBackend(model, tokenizer, batch_size, eos_token_ids)`.
        model_name: the model name for `store.json` instead of the model's own.
    """
    options = options or StoreOptions()
    examples = _examples(prompts)
    if not examples:
        raise ValueError("no prompts")
    backend = _default_backend(model, tokenizer, options) if backend is None else _checked(backend, options)
    name = model_name or model_label(model)
    k, batch_size = options.k, options.batch_size
    num_sequences = len(examples) * k
    decoder = PieceDecoder(tokenizer)
    with open_reward(options) as rewards, StoreWriter(out_dir, _meta(options, name, rewards, tokenizer)) as writer:
        for start in range(0, num_sequences, batch_size):
            sample_ids = np.arange(start, min(start + batch_size, num_sequences))
            owners = [examples[s // k] for s in sample_ids]
            rollout = backend.generate([ex.prompt for ex in owners], _sampling_params(options, sample_ids))
            if rollout.sampler_entropy is None and model is not None:
                rollout = _with_scored_entropy(model, rollout, options.temperature)
            writer.write(*_rollout_tables(rollout, sample_ids, owners, tokenizer, decoder, rewards))
            logger.info("store: %d/%d responses", sample_ids[-1] + 1, num_sequences)
        return writer.close()


def _with_scored_entropy(model: torch.nn.Module, rollout: Rollout, temperature: float) -> Rollout:
    """An engine's rollout (no full-distribution entropy) with the entropy of softmax(z/T) of each
    response token from one teacher-forced pass of `model` (SPEC Eq. 1)."""
    import torch

    from forkrl.models.mode import eval_mode
    from forkrl.models.scoring import score_responses

    device = next(model.parameters()).device
    on = rollout.to(device)
    with torch.inference_mode(), eval_mode(model):
        entropy = score_responses(
            model, on.prompt_ids, on.prompt_mask, on.response_ids, on.response_mask, temperature or 1.0
        ).entropy
    rollout.sampler_entropy = entropy.float().cpu().masked_fill(rollout.response_mask == 0, 0.0)
    return rollout


def _sample_seed(seed: int, sample_id: int) -> int:
    """Row seed of one sample: `mix_seed(seed, sample id)`, independent streams per sample,
    batch-invariant (63 bits: fits int64)."""
    return mix_seed(seed, sample_id)


def _sampling_params(options: StoreOptions, sample_ids: np.ndarray) -> SamplingParams:
    """The batch's sampling settings, with one row seed per sample id."""
    from forkrl.rollout.base import SamplingParams

    return SamplingParams(
        max_new_tokens=options.max_new_tokens,
        temperature=options.temperature,
        top_p=options.top_p,
        top_k=options.top_k,
        row_seeds=[_sample_seed(options.seed, int(s)) for s in sample_ids],
    )


def _default_backend(model: torch.nn.Module | None, tokenizer, options: StoreOptions) -> GenerationBackend:
    if model is None:
        raise ValueError("pass a model or a backend")
    from forkrl.rollout.hf import HFGenerationBackend  # transformers: only when generating

    return HFGenerationBackend(model, tokenizer, batch_size=options.batch_size, eos_token_ids=options.eos_token_ids)


def _checked(backend: GenerationBackend, options: StoreOptions) -> GenerationBackend:
    if options.eos_token_ids is not None:
        # Silently ignoring them would store responses that run past the intended stops.
        raise ValueError("eos_token_ids configure the default HF backend; set them on the backend you pass instead")
    return backend


def _meta(options: StoreOptions, name: str | None, rewards: RewardComputer | None, tokenizer) -> dict[str, Any]:
    return {
        "source": "generate",
        "model": name,
        "k": options.k,
        "max_new_tokens": options.max_new_tokens,
        "temperature": options.temperature,
        "top_p": options.top_p,
        "top_k": options.top_k,
        "seed": options.seed,
        "reward": None if rewards is None else rewards.name,
        "vocab_size": len(tokenizer),
        "columns": {"entropy": {"model": name, "temperature": options.temperature, "how": "sampler"}},
    }


def _examples(prompts: Sequence[PromptExample] | Sequence[str]) -> list[PromptExample]:
    from forkrl.tasks.data import PromptExample

    return [p if isinstance(p, PromptExample) else PromptExample(p, p, "", i) for i, p in enumerate(prompts)]


def _rollout_tables(
    rollout: Rollout,
    sample_ids: np.ndarray,
    owners: list[PromptExample],
    tokenizer,
    decoder: PieceDecoder,
    rewards: RewardComputer | None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One `Rollout` of `B = len(sample_ids)` rows -> `(samples, tokens)` columns for `StoreWriter.write`."""
    if rollout.sampler_entropy is None or rollout.sampler_logprobs is None:
        raise ValueError("the generation backend returned no sampler entropy/log-probs, which the store records")
    lengths = rollout.response_lengths.cpu().numpy()
    ids = rollout.response_ids.cpu().tolist()  # one batch: bounded by batch_size x max_new_tokens
    texts = tokenizer.batch_decode([row[:n] for row, n in zip(ids, lengths)], skip_special_tokens=True)
    samples = sample_columns(
        sample_ids, owners, texts, rollout.prompt_ids, rollout.prompt_mask, lengths, rollout.finished.cpu().numpy(),
        rewards,
    )  # fmt: skip
    tokens = token_columns(
        sample_ids,
        samples["prompt_index"],
        rollout.response_ids,
        rollout.response_mask,
        rollout.sampler_entropy,
        rollout.sampler_logprobs,
        decoder,
    )
    return samples, tokens
