"""Between model tensors and store rows: a batch's `[B, R]` tensors -> token/sample columns, and
stored token ids -> padded tensors for a teacher-forced scoring pass."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from forkrl.rollout.base import pad_rows

__all__ = ["PieceDecoder", "model_label", "pad_batch", "prompt_ids_array", "token_columns"]


class PieceDecoder:
    """Decoded text of single tokens, cached per id (at most one decode per vocabulary entry).

    `pieces(ids)` returns an arrow string array built by `take` from the batch's unique ids,
    so a batch of a million tokens creates no per-token Python objects. Byte-level BPE tokens
    that are part of a multi-byte character decode to U+FFFD on their own.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def pieces(self, ids: np.ndarray) -> pa.Array:
        unique, inverse = np.unique(ids, return_inverse=True)
        missing = [int(u) for u in unique if int(u) not in self.cache]
        if missing:
            texts = self.tokenizer.batch_decode([[u] for u in missing], skip_special_tokens=False)
            self.cache.update(zip(missing, texts))
        dictionary = pa.array([self.cache[int(u)] for u in unique], type=pa.string())
        return dictionary.take(pa.array(inverse.astype(np.int32)))


def prompt_ids_array(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> pa.Array:
    """Left-padded `[B, P]` prompts -> arrow list<int32> of each row's real tokens."""
    mask = prompt_mask.bool().cpu()
    values = prompt_ids.cpu()[mask].to(torch.int32).numpy()  # row-major: each row's tokens in order
    offsets = np.concatenate([[0], np.cumsum(mask.sum(1).numpy())]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=pa.int32()))


def sample_columns(
    sample_ids: np.ndarray,
    examples: Sequence,
    responses: list[str],
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    lengths: Sequence[int],
    finished: Sequence[bool],
    rewards=None,
) -> dict[str, Any]:
    """The `samples` table's columns of one batch: one row per response, `examples[i]` its prompt
    (`PromptExample`), `prompt_ids`/`prompt_mask` `[B, P]` its left-padded tokens; the responses
    are scored with `rewards` (a `RewardComputer`) when given, else the reward column is null."""
    scores = None if rewards is None else rewards(responses, examples).scores
    return {
        "sample_id": sample_ids,
        "prompt_index": np.array([ex.index for ex in examples]),
        "prompt": [ex.prompt for ex in examples],
        "response": responses,
        "prompt_ids": prompt_ids_array(prompt_ids, prompt_mask),
        "length": np.asarray(lengths),
        "finished": finished,
        "reward": scores if scores is not None else [None] * len(examples),
    }


def token_columns(
    sample_ids: np.ndarray,
    prompt_index: np.ndarray,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    entropy: torch.Tensor,
    logprob: torch.Tensor,
    decoder: PieceDecoder,
) -> dict[str, Any]:
    """`[B, R]` right-padded per-token tensors -> flat token-table columns (valid tokens only)."""
    mask = response_mask.bool().cpu()
    lengths = mask.sum(1).numpy()
    token_ids = response_ids.cpu()[mask].numpy()
    return {
        "sample_id": np.repeat(sample_ids.astype(np.int32), lengths),
        "prompt_index": np.repeat(prompt_index.astype(np.int32), lengths),
        "position": (mask.long().cumsum(1) - 1)[mask].to(torch.int32).numpy(),
        "token_id": token_ids.astype(np.int32),
        "piece": decoder.pieces(token_ids),
        "entropy": entropy.detach().float().cpu()[mask].numpy(),
        "logprob": logprob.detach().float().cpu()[mask].numpy(),
    }


def pad_batch(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int, device):
    """Left-pad prompts and right-pad responses: `(prompt_ids, prompt_mask, response_ids, response_mask)`."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt")
    prompt_ids, prompt_mask = pad_rows(prompts, pad_id, left=True)
    # an all-empty batch still needs one response column
    response_ids, response_mask = pad_rows(responses, pad_id, left=False, min_len=1)
    return prompt_ids.to(device), prompt_mask.to(device), response_ids.to(device), response_mask.to(device)


def model_label(model: torch.nn.Module | None) -> str | None:
    """The model name recorded in `store.json`: its `config.name_or_path` (None if it has none)."""
    return getattr(getattr(model, "config", None), "name_or_path", None) or None
