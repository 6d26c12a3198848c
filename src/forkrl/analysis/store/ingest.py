"""`store_from_jsonl`: store prompt/response pairs read from a jsonl file, with per-token entropy
and log-prob from a teacher-forced scoring under a model (jsonl rows -> token ids -> scores -> store)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from forkrl.analysis.store.options import StoreOptions, open_reward
from forkrl.analysis.store.rows import PieceDecoder, model_label, pad_batch, sample_columns, token_columns
from forkrl.analysis.store.schema import RolloutStore
from forkrl.analysis.store.writer import StoreWriter

if TYPE_CHECKING:
    from forkrl.tasks.data import PromptExample
    from forkrl.tasks.rewards import RewardComputer

__all__ = ["store_from_jsonl"]


def store_from_jsonl(
    model: torch.nn.Module,
    tokenizer,
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    options: StoreOptions | None = None,
    model_name: str | None = None,
) -> RolloutStore:
    """Store responses read from a jsonl file, scored teacher-forced under `model` at `options.temperature`.

    Each line is an object with the exact prompt text the response was conditioned on
    (`options.prompt_key`) and the response text (`options.response_key`); with a reward,
    `options.answer_key` (missing: "") is the reference answer it is scored against. The prompt
    is tokenized as the generation backend does (tokenizer defaults), the response without
    special tokens. Rows with the same prompt text share a `prompt_index` (in order of first
    appearance). `finished` is True where the response's last token is the EOS token.

    Args:
        options: reads `prompt_key`, `response_key`, `answer_key`, `temperature`, `batch_size`
            (rows scored per forward), `limit` (first rows only), `reward`, `reward_timeout_s`.
        model_name: the model name for `store.json` instead of the model's own.
    """
    from forkrl.tasks.data import PromptExample

    options = options or StoreOptions()
    prompt_key, response_key = options.prompt_key, options.response_key
    decoder = PieceDecoder(tokenizer)
    name = model_name or model_label(model)
    prompt_indices: dict[str, int] = {}
    with (
        open_reward(options) as rewards,
        StoreWriter(out_dir, _meta(path, options, name, rewards, tokenizer)) as writer,
    ):
        sample_id = 0
        for rows in _iter_jsonl_batches(path, options.batch_size, options.limit):
            examples, responses = [], []
            for line_no, row in rows:
                if prompt_key not in row or response_key not in row:
                    raise ValueError(f"{path}:{line_no}: needs fields {prompt_key!r} and {response_key!r}")
                prompt = str(row[prompt_key])
                index = prompt_indices.setdefault(prompt, len(prompt_indices))
                # the answer only feeds the reward: without one it is never read
                answer = "" if rewards is None else str(row.get(options.answer_key, ""))
                examples.append(PromptExample(prompt, prompt, answer, index, row))
                responses.append(str(row[response_key]))
            sample_ids = np.arange(sample_id, sample_id + len(rows))
            sample_id += len(rows)
            writer.write(
                *_scored_text_tables(
                    model, tokenizer, examples, responses, sample_ids, options.temperature, decoder, rewards
                )
            )
        return writer.close()


def _meta(path, options: StoreOptions, name: str | None, rewards: RewardComputer | None, tokenizer) -> dict[str, Any]:
    return {
        "source": "jsonl",
        "responses": os.fspath(path),
        "model": name,
        "temperature": options.temperature,
        "reward": None if rewards is None else rewards.name,
        "vocab_size": len(tokenizer),
        "columns": {"entropy": {"model": name, "temperature": options.temperature, "how": "teacher-forced"}},
    }


def _iter_jsonl_batches(path, batch_size: int, limit: int | None) -> Iterator[list[tuple[int, dict]]]:
    """The file's non-blank lines as `(line number, object)`, `batch_size` at a time, at most `limit` in all."""
    rows: list[tuple[int, dict]] = []
    count = 0
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            if limit is not None and count >= limit:
                break
            try:
                rows.append((line_no, json.loads(line)))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: invalid JSON ({err})") from err
            count += 1
            if len(rows) == batch_size:
                yield rows
                rows = []
    if rows:
        yield rows


def _scored_text_tables(
    model: torch.nn.Module,
    tokenizer,
    examples: list[PromptExample],
    responses: list[str],
    sample_ids: np.ndarray,
    temperature: float,
    decoder: PieceDecoder,
    rewards: RewardComputer | None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One batch of prompt/response texts -> `(samples, tokens)` columns, scored in one forward."""
    from forkrl.models.mode import eval_mode
    from forkrl.models.scoring import score_responses

    prompt_ids = tokenizer([ex.prompt for ex in examples])["input_ids"]
    response_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
    device = next(model.parameters()).device
    prompt_t, prompt_m, resp_t, resp_m = pad_batch(prompt_ids, response_ids, tokenizer.pad_token_id or 0, device)
    with torch.inference_mode(), eval_mode(model):
        logprob, entropy, _ = score_responses(model, prompt_t, prompt_m, resp_t, resp_m, temperature)
    eos = tokenizer.eos_token_id
    lengths = [len(r) for r in response_ids]
    finished = [bool(r) and r[-1] == eos for r in response_ids]
    samples = sample_columns(sample_ids, examples, responses, prompt_t, prompt_m, lengths, finished, rewards)
    tokens = token_columns(sample_ids, samples["prompt_index"], resp_t, resp_m, entropy, logprob, decoder)
    return samples, tokens
