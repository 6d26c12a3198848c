"""The `forkrl analyze store` / `score` entry points: load a checkpoint, build or re-score a
store, and return a JSON-able summary of it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.compute as pc

from forkrl.analysis.store.generate import generate_store
from forkrl.analysis.store.ingest import store_from_jsonl
from forkrl.analysis.store.options import StoreOptions
from forkrl.analysis.store.rescore import check_score_name, check_tokenizer_fits, score_store
from forkrl.analysis.store.schema import RolloutStore

if TYPE_CHECKING:
    from forkrl.tasks.data import PromptExample

__all__ = ["run_score", "run_store", "store_summary"]


def run_store(
    model: str,
    out_dir: str | os.PathLike,
    data: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    responses: str | os.PathLike | None = None,
    options: StoreOptions | None = None,
    dtype: str = "auto",
    device: str | None = None,
    backend: str = "hf",
) -> dict[str, Any]:
    """Build a store in `out_dir` with checkpoint `model` (loaded with `dtype` on `device`):
    sample `options.k` responses per question of the prompt files `data` (read with
    `question_key`, `answer_key`, `template`, `split`, `limit`; see `generate_store`), or load
    the prompt/response pairs of the jsonl file `responses` and score them (`store_from_jsonl`).

    `backend`: what samples (`hf`, or `vllm`: an engine with the model's weights; the entropies
    then come from one teacher-forced pass of the model, as an engine returns none).

    Returns a summary: path, number of samples and tokens, mean entropy, mean reward.
    """
    from forkrl.models import precision
    from forkrl.models.loading import check_model_source, load_policy, load_tokenizer

    if (data is None) == (responses is None):
        raise ValueError("give exactly one of `data` (questions to sample from) or `responses` (a jsonl file)")
    options = options or StoreOptions()
    # The inputs before the model: a missing or unreadable file fails in seconds, not after the load.
    if responses is not None and not os.path.isfile(responses):
        raise FileNotFoundError(f"--responses {os.fspath(responses)!r}: file not found")
    examples = None if data is None else _load_examples(data, options, load_tokenizer(check_model_source(model)))
    if backend != "hf":
        from forkrl.rollout.registry import get_backend, missing_package

        get_backend(backend)  # an unknown name: ValueError naming the registered ones
        if missing_package(backend):
            raise ValueError(f"--backend {backend!r}: {missing_package(backend)}")
    policy, tokenizer = load_policy(model, dtype=dtype, device=device)
    # `dtype=auto`: float32 weights, bf16 autocast on CUDA (forkrl.models.precision)
    with precision.autocast(dtype, next(policy.parameters()).device):
        if responses is not None:
            store = store_from_jsonl(policy, tokenizer, responses, out_dir, options, model_name=model)
        else:
            engine = None
            if backend != "hf":
                from forkrl.rollout.registry import build_standalone_backend

                device_of = next(policy.parameters()).device
                engine = build_standalone_backend(backend, policy, tokenizer, device_of, options.batch_size)
            try:
                store = generate_store(policy, tokenizer, examples, out_dir, options, model_name=model, backend=engine)
            finally:
                if engine is not None:
                    engine.close()
    return store_summary(store)


def _load_examples(data, options: StoreOptions, tokenizer) -> list[PromptExample]:
    """The prompts of every file in `data`, numbered in order across files (`PromptExample.index`)."""
    from forkrl.tasks.data import PromptExample, load_prompts

    files = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    examples: list[PromptExample] = []
    for source in files:
        for ex in load_prompts(
            source,
            options.question_key,
            options.answer_key,
            split=options.split,
            limit=options.limit,
            template=options.template,
            tokenizer=tokenizer,
        ):
            examples.append(PromptExample(ex.prompt, ex.question, ex.answer, len(examples), ex.metadata))
    return examples


def run_score(
    store: str,
    model: str,
    name: str,
    temperature: float = 1.0,
    batch_size: int = 16,
    dtype: str = "auto",
    device: str | None = None,
) -> dict[str, Any]:
    """Re-score a store's responses under checkpoint `model`, adding `entropy_<name>`/`logprob_<name>`.
    The store and the model's tokenizer are checked to fit (`check_tokenizer_fits`) before the model loads."""
    from forkrl.io import check_writable
    from forkrl.models import precision
    from forkrl.models.loading import check_model_source, load_policy, load_tokenizer

    opened = RolloutStore.open(store)
    check_score_name(name)
    check_writable(opened.tokens_path, "store")  # the new columns go into it: fail now, not after scoring
    check_tokenizer_fits(opened, load_tokenizer(check_model_source(model)), model)
    policy, _ = load_policy(model, dtype=dtype, device=device)
    with precision.autocast(dtype, next(policy.parameters()).device):
        result = score_store(store, policy, name, temperature=temperature, batch_size=batch_size, model_name=model)
    summary = store_summary(result)
    summary["column"] = f"entropy_{name}"
    return summary


def store_summary(store: RolloutStore) -> dict[str, Any]:
    """Path, sizes, entropy columns with their means, and the mean reward of a store."""
    store = RolloutStore.open(store)
    columns = store.entropy_columns
    sums = dict.fromkeys(columns, 0.0)
    for batch in store.iter_token_batches(columns):
        for i, c in enumerate(columns):
            sums[c] += float(np.sum(batch.column(i).to_numpy(), dtype=np.float64))
    n = store.num_tokens
    rewards = store.read_samples(["reward"]).column("reward")
    mean_reward = pc.mean(rewards).as_py()
    return {
        "path": str(store.path),
        "num_samples": store.num_samples,
        "num_tokens": n,
        "mean_entropy": {c: (sums[c] / n if n else None) for c in columns},
        "mean_reward": mean_reward,
    }
