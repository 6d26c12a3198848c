"""The rollout store: sampled responses with per-token entropy and log-prob, on disk in parquet.

Every analysis of paper 1 reads token entropies of responses, often of the *same* responses
under several checkpoints (Table 1, Fig. 4). The store keeps them in one directory:

    tokens.parquet   one row per response token, in sample order then position order:
                     sample_id, prompt_index, position, token_id, piece (the decoded token),
                     entropy, logprob, and entropy_<name> / logprob_<name> per re-scoring
    samples.parquet  one row per response: sample_id, prompt_index, prompt, response,
                     prompt_ids, length (tokens), finished (ended with EOS), reward (null
                     without a reward function)
    store.json       how it was made, and for every entropy column its model and temperature

`entropy` and `logprob` are recorded where the responses come from: the sampler's statistics
when the store is generated (entropy of softmax(z / T) at the sampling temperature, SPEC Eq. 1;
log-prob of the sampled token under the distribution it was drawn from, which is the plain
softmax(z / T) without top-k / top-p), or a teacher-forced scoring when responses are loaded
from a jsonl file. `score_store` adds the same two numbers under another checkpoint.

Memory: everything is written batch by batch as arrow arrays (no per-token Python objects),
coalesced into row groups of `ROW_GROUP_SIZE` rows, and readers go through
`ParquetFile.iter_batches`; 10^6 tokens cost a few MB per numeric column. Each file is written
to a temporary name and renamed into place, so a crash never leaves a truncated file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from forkrl.io import atomic_path, atomic_write_json, umask_permissions

if TYPE_CHECKING:
    from forkrl.rollout.base import Rollout
    from forkrl.tasks.data import PromptExample
    from forkrl.tasks.rewards import RewardComputer, RewardFn

# Model code (transformers) and rewards (math-verify) are imported where they are used, so that
# reading a store and analysing it does not pay several seconds of imports.

__all__ = [
    "add_token_columns",
    "META_FILE",
    "ROW_GROUP_SIZE",
    "SAMPLES_FILE",
    "SAMPLE_SCHEMA",
    "TOKENS_FILE",
    "TOKEN_SCHEMA",
    "RolloutStore",
    "StoreWriter",
    "generate_store",
    "run_score",
    "run_store",
    "score_store",
    "store_from_jsonl",
]

logger = logging.getLogger(__name__)

TOKENS_FILE = "tokens.parquet"
SAMPLES_FILE = "samples.parquet"
META_FILE = "store.json"
FORMAT_VERSION = 1

ROW_GROUP_SIZE = 1 << 18
"""Rows per parquet row group of the token table (~256k tokens, a few MB per column)."""

TOKEN_SCHEMA = pa.schema(
    [
        ("sample_id", pa.int32()),
        ("prompt_index", pa.int32()),
        ("position", pa.int32()),
        ("token_id", pa.int32()),
        ("piece", pa.string()),
        ("entropy", pa.float32()),
        ("logprob", pa.float32()),
    ]
)
"""Columns every token table starts with; re-scorings append `entropy_<name>`, `logprob_<name>`."""

SAMPLE_SCHEMA = pa.schema(
    [
        ("sample_id", pa.int32()),
        ("prompt_index", pa.int32()),
        ("prompt", pa.string()),
        ("response", pa.string()),
        ("prompt_ids", pa.list_(pa.int32())),
        ("length", pa.int32()),
        ("finished", pa.bool_()),
        ("reward", pa.float64()),
    ]
)


# ---------------------------------------------------------------------------- reading


@dataclass
class RolloutStore:
    """A store directory (see the module docstring). Open one with `RolloutStore.open(path)`."""

    path: Path

    @classmethod
    def open(cls, path: str | os.PathLike | RolloutStore) -> RolloutStore:
        if isinstance(path, RolloutStore):
            return path
        store = cls(Path(path))
        for name in (TOKENS_FILE, SAMPLES_FILE, META_FILE):
            if not (store.path / name).is_file():
                raise FileNotFoundError(f"{store.path} is not a rollout store: {name} is missing")
        return store

    @property
    def tokens_path(self) -> Path:
        return self.path / TOKENS_FILE

    @property
    def samples_path(self) -> Path:
        return self.path / SAMPLES_FILE

    @property
    def meta(self) -> dict[str, Any]:
        """The contents of `store.json`."""
        return json.loads((self.path / META_FILE).read_text(encoding="utf-8"))

    @property
    def num_tokens(self) -> int:
        return pq.read_metadata(self.tokens_path).num_rows

    @property
    def num_samples(self) -> int:
        return pq.read_metadata(self.samples_path).num_rows

    @property
    def token_columns(self) -> list[str]:
        return pq.read_schema(self.tokens_path).names

    @property
    def entropy_columns(self) -> list[str]:
        """`entropy` and every `entropy_<name>`, in the order they were first added."""
        return [c for c in self.token_columns if c == "entropy" or c.startswith("entropy_")]

    def resolve_column(self, name: str, kind: str = "entropy") -> str:
        """A column name from a column name or a scoring name: "base" -> "entropy_base"."""
        columns = self.token_columns
        for candidate in (name, f"{kind}_{name}"):
            if candidate in columns:
                return candidate
        have = ", ".join(c for c in columns if c == kind or c.startswith(kind + "_"))
        raise KeyError(f"{self.path}: no {kind} column {name!r} (have: {have})")

    def iter_token_batches(
        self, columns: Sequence[str] | None = None, batch_size: int = 1 << 16
    ) -> Iterator[pa.RecordBatch]:
        """The token table in order, `batch_size` rows at a time (bounded memory)."""
        with open(self.tokens_path, "rb") as f:
            yield from pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=list(columns) if columns else None)

    def read_token_column(self, name: str, dtype: np.dtype | type | None = None) -> np.ndarray:
        """One token column as a numpy array (`[num_tokens]`), filled batch by batch into one buffer."""
        n = self.num_tokens
        out = None
        start = 0
        for batch in self.iter_token_batches([name]):
            values = batch.column(0).to_numpy(zero_copy_only=False)
            if out is None:
                out = np.empty(n, dtype=dtype or values.dtype)
            out[start : start + len(values)] = values
            start += len(values)
        if out is None:
            field = pq.read_schema(self.tokens_path).field(name)
            out = np.empty(0, dtype=dtype or field.type.to_pandas_dtype())
        return out

    def read_samples(self, columns: Sequence[str] | None = None) -> pa.Table:
        """The per-sample table (one row per response; small next to the token table)."""
        return pq.read_table(self.samples_path, columns=list(columns) if columns else None)


# ---------------------------------------------------------------------------- writing


class StoreWriter:
    """Writes a store batch by batch: `write(samples, tokens)` per batch, then `close()`.

    Token rows are buffered until `row_group_size` of them are pending, then written as one
    row group. Files go to temporary names in `path` and are renamed into place by `close`
    (tokens, samples, then `store.json`); an exception inside `with StoreWriter(...)` deletes
    them and leaves any previous store untouched.

    Args:
        path: the store directory (created).
        meta: what to record in `store.json` (model, sampling settings, ...); `columns` there
            describes the entropy columns (`{"entropy": {"model": ..., "temperature": ...}}`).
    """

    def __init__(self, path: str | os.PathLike, meta: dict[str, Any], row_group_size: int = ROW_GROUP_SIZE):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.meta = dict(meta)
        self.row_group_size = row_group_size
        self.num_tokens = 0
        self.num_samples = 0
        self._tmp: dict[str, str] = {}
        for name in (TOKENS_FILE, SAMPLES_FILE):
            fd, tmp = tempfile.mkstemp(dir=self.path, prefix=f".{name}.", suffix=".tmp")
            os.close(fd)
            self._tmp[name] = tmp
        self._tokens = pq.ParquetWriter(self._tmp[TOKENS_FILE], TOKEN_SCHEMA, compression="zstd")
        self._samples = pq.ParquetWriter(self._tmp[SAMPLES_FILE], SAMPLE_SCHEMA, compression="zstd")
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._closed = False

    def write(self, samples: pa.Table | dict[str, Any], tokens: pa.Table | dict[str, Any]) -> None:
        """Append one batch: `samples` rows follow `SAMPLE_SCHEMA`, `tokens` rows `TOKEN_SCHEMA`
        (arrow tables, or dicts of column name -> array/list). Token rows must be in sample
        order and cover exactly `samples["length"]` tokens per sample."""
        samples = _as_table(samples, SAMPLE_SCHEMA)
        tokens = _as_table(tokens, TOKEN_SCHEMA)
        lengths = samples.column("length").to_numpy()
        if int(lengths.sum()) != tokens.num_rows:
            raise ValueError(f"samples have {int(lengths.sum())} tokens in total but {tokens.num_rows} token rows")
        self._samples.write_table(samples)
        self._pending.append(tokens)
        self._pending_rows += tokens.num_rows
        self.num_samples += samples.num_rows
        self.num_tokens += tokens.num_rows
        if self._pending_rows >= self.row_group_size:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        if not self._pending:
            return
        table = pa.concat_tables(self._pending)
        full = table.num_rows if final else table.num_rows - table.num_rows % self.row_group_size
        if full:
            self._tokens.write_table(table.slice(0, full), row_group_size=self.row_group_size)
        rest = table.slice(full)
        self._pending = [rest] if rest.num_rows else []
        self._pending_rows = rest.num_rows

    def close(self) -> RolloutStore:
        """Finish the files and move them into place; returns the store."""
        if self._closed:
            return RolloutStore.open(self.path)
        self._flush(final=True)
        self._tokens.close()
        self._samples.close()
        self._closed = True
        for tmp in self._tmp.values():
            umask_permissions(tmp)
        os.replace(self._tmp[TOKENS_FILE], self.path / TOKENS_FILE)
        os.replace(self._tmp[SAMPLES_FILE], self.path / SAMPLES_FILE)
        meta = {"format_version": FORMAT_VERSION, **self.meta}
        meta["num_samples"], meta["num_tokens"] = self.num_samples, self.num_tokens
        atomic_write_json(self.path / META_FILE, meta)
        return RolloutStore.open(self.path)

    def abort(self) -> None:
        """Discard everything written so far."""
        if self._closed:
            return
        self._closed = True
        for writer in (self._tokens, self._samples):
            with contextlib.suppress(Exception):
                writer.close()
        for tmp in self._tmp.values():
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _as_table(data: pa.Table | dict[str, Any], schema: pa.Schema) -> pa.Table:
    if isinstance(data, pa.Table):
        return data.select(schema.names).cast(schema)
    return pa.Table.from_arrays([_as_array(data[f.name], f.type) for f in schema], schema=schema)


def _as_array(values: Any, type_: pa.DataType) -> pa.Array:
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return values.cast(type_)
    return pa.array(values, type=type_)


class _PieceDecoder:
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


def _prompt_ids_array(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> pa.Array:
    """Left-padded `[B, P]` prompts -> arrow list<int32> of each row's real tokens."""
    mask = prompt_mask.bool().cpu()
    values = prompt_ids.cpu()[mask].to(torch.int32).numpy()  # row-major: each row's tokens in order
    offsets = np.concatenate([[0], np.cumsum(mask.sum(1).numpy())]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=pa.int32()))


def _token_columns(
    sample_ids: np.ndarray,
    prompt_index: np.ndarray,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    entropy: torch.Tensor,
    logprob: torch.Tensor,
    decoder: _PieceDecoder,
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


# ---------------------------------------------------------------------------- generation


def _sample_seed(seed: int, sample_id: int) -> int:
    """Row seed of one sample: independent streams per (seed, sample id), batch-invariant."""
    state = np.random.SeedSequence([seed % 2**64, sample_id]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) | (int(state[1]) >> 1))  # 62 bits: fits int64


def _examples(prompts: Sequence[PromptExample] | Sequence[str]) -> list[PromptExample]:
    from forkrl.tasks.data import PromptExample

    return [p if isinstance(p, PromptExample) else PromptExample(p, p, "", i) for i, p in enumerate(prompts)]


def _model_name(model: torch.nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "name_or_path", None) or None


def generate_store(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[PromptExample] | Sequence[str],
    out_dir: str | os.PathLike,
    k: int = 1,
    max_new_tokens: int = 1024,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    batch_size: int = 16,
    seed: int = 0,
    reward_fn: str | RewardFn | None = None,
    eos_token_ids: Sequence[int] | None = None,
    reward_timeout_s: float | None = None,
    model_name: str | None = None,
) -> RolloutStore:
    """Sample `k` responses per prompt and store them with the sampler's entropy and log-prob.

    Sample `j` of prompt `i` is `sample_id = i * k + j`; it is drawn with its own row seed
    derived from `(seed, sample_id)`, so the store does not depend on `batch_size`.

    Args:
        prompts: `PromptExample`s (from `load_prompts`; needed for a reward) or prompt texts.
        temperature, top_p, top_k: sampling settings. The stored `entropy` is of
            softmax(z / temperature); `logprob` is of the truncated distribution when top-p/k
            is on (then it differs from a teacher-forced re-scoring).
        reward_fn: score each response (name, import path or callable; see `RewardComputer`);
            None leaves `reward` null.
        eos_token_ids: tokens that end a response (default: the tokenizer's and the model's EOS).
    """
    if k < 1 or batch_size < 1:
        raise ValueError(f"need k >= 1 and batch_size >= 1, got k={k}, batch_size={batch_size}")
    from forkrl.rollout.base import SamplingParams
    from forkrl.rollout.hf import HFGenerationBackend

    examples = _examples(prompts)
    if not examples:
        raise ValueError("no prompts")
    backend = HFGenerationBackend(model, tokenizer, batch_size=batch_size, eos_token_ids=eos_token_ids)
    rewards = _reward_computer(reward_fn, reward_timeout_s)
    decoder = _PieceDecoder(tokenizer)
    name = model_name or _model_name(model)
    meta = {
        "source": "generate",
        "model": name,
        "k": k,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "seed": seed,
        "reward": None if rewards is None else rewards.name,
        "vocab_size": len(tokenizer),
        "columns": {"entropy": {"model": name, "temperature": temperature, "how": "sampler"}},
    }
    num_sequences = len(examples) * k
    try:
        with StoreWriter(out_dir, meta) as writer:
            for start in range(0, num_sequences, batch_size):
                sample_ids = np.arange(start, min(start + batch_size, num_sequences))
                owners = [examples[s // k] for s in sample_ids]
                params = SamplingParams(
                    max_new_tokens=max_new_tokens,
                    temperature=temperature,
                    top_p=top_p,
                    top_k=top_k,
                    row_seeds=[_sample_seed(seed, int(s)) for s in sample_ids],
                )
                rollout = backend.generate([ex.prompt for ex in owners], params)
                writer.write(*_rollout_tables(rollout, sample_ids, owners, tokenizer, decoder, rewards))
                logger.info("store: %d/%d responses", sample_ids[-1] + 1, num_sequences)
            return writer.close()
    finally:
        if rewards is not None:
            rewards.close()


def _reward_computer(reward_fn: str | RewardFn | None, timeout_s: float | None) -> RewardComputer | None:
    """None without a reward; `timeout_s` None keeps `RewardComputer`'s default limit."""
    if reward_fn is None:
        return None
    from forkrl.tasks.rewards import RewardComputer

    return RewardComputer(reward_fn) if timeout_s is None else RewardComputer(reward_fn, timeout_s=timeout_s)


def _rollout_tables(
    rollout: Rollout,
    sample_ids: np.ndarray,
    owners: list[PromptExample],
    tokenizer,
    decoder: _PieceDecoder,
    rewards: RewardComputer | None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    lengths = rollout.response_lengths.cpu().numpy()
    ids = rollout.response_ids.cpu().tolist()  # one batch: bounded by batch_size x max_new_tokens
    texts = tokenizer.batch_decode([row[:n] for row, n in zip(ids, lengths)], skip_special_tokens=True)
    scores = None if rewards is None else rewards(texts, owners).scores
    prompt_index = np.array([ex.index for ex in owners])
    samples = {
        "sample_id": sample_ids,
        "prompt_index": prompt_index,
        "prompt": [ex.prompt for ex in owners],
        "response": texts,
        "prompt_ids": _prompt_ids_array(rollout.prompt_ids, rollout.prompt_mask),
        "length": lengths,
        "finished": rollout.finished.cpu().numpy(),
        "reward": scores if scores is not None else [None] * len(owners),
    }
    tokens = _token_columns(
        sample_ids,
        prompt_index,
        rollout.response_ids,
        rollout.response_mask,
        rollout.sampler_entropy,
        rollout.sampler_logprobs,
        decoder,
    )
    return samples, tokens


# ---------------------------------------------------------------------------- responses from a file


def store_from_jsonl(
    model: torch.nn.Module,
    tokenizer,
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    prompt_key: str = "prompt",
    response_key: str = "response",
    answer_key: str | None = None,
    temperature: float = 1.0,
    batch_size: int = 16,
    reward_fn: str | RewardFn | None = None,
    limit: int | None = None,
    reward_timeout_s: float | None = None,
    model_name: str | None = None,
) -> RolloutStore:
    """Store responses read from a jsonl file, scored teacher-forced under `model` at `temperature`.

    Each line is an object with the exact prompt text the response was conditioned on
    (`prompt_key`) and the response text (`response_key`); `answer_key` feeds a reward. The
    prompt is tokenized as the generation backend does (tokenizer defaults), the response
    without special tokens. Rows with the same prompt text share a `prompt_index` (in order of
    first appearance). `finished` is True where the response's last token is the EOS token.
    """
    from forkrl.tasks.data import PromptExample

    rewards = _reward_computer(reward_fn, reward_timeout_s)
    decoder = _PieceDecoder(tokenizer)
    name = model_name or _model_name(model)
    meta = {
        "source": "jsonl",
        "responses": os.fspath(path),
        "model": name,
        "temperature": temperature,
        "reward": None if rewards is None else rewards.name,
        "vocab_size": len(tokenizer),
        "columns": {"entropy": {"model": name, "temperature": temperature, "how": "teacher-forced"}},
    }
    prompt_indices: dict[str, int] = {}
    try:
        with StoreWriter(out_dir, meta) as writer:
            sample_id = 0
            for rows in _iter_jsonl_batches(path, batch_size, limit):
                examples, responses = [], []
                for line_no, row in rows:
                    if prompt_key not in row or response_key not in row:
                        raise ValueError(f"{path}:{line_no}: needs fields {prompt_key!r} and {response_key!r}")
                    prompt = str(row[prompt_key])
                    index = prompt_indices.setdefault(prompt, len(prompt_indices))
                    answer = "" if answer_key is None else str(row.get(answer_key, ""))
                    examples.append(PromptExample(prompt, prompt, answer, index, row))
                    responses.append(str(row[response_key]))
                sample_ids = np.arange(sample_id, sample_id + len(rows))
                sample_id += len(rows)
                writer.write(
                    *_scored_text_tables(
                        model, tokenizer, examples, responses, sample_ids, temperature, decoder, rewards
                    )
                )
            return writer.close()
    finally:
        if rewards is not None:
            rewards.close()


def _iter_jsonl_batches(path, batch_size: int, limit: int | None) -> Iterator[list[tuple[int, dict]]]:
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


def _scored_text_tables(model, tokenizer, examples, responses, sample_ids, temperature, decoder, rewards):
    from forkrl.models.scoring import score_responses

    prompt_ids = tokenizer([ex.prompt for ex in examples])["input_ids"]
    response_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
    device = next(model.parameters()).device
    prompt_t, prompt_m, resp_t, resp_m = _pad_batch(prompt_ids, response_ids, tokenizer.pad_token_id or 0, device)
    with torch.inference_mode(), _eval_mode(model):
        logprob, entropy = score_responses(model, prompt_t, prompt_m, resp_t, resp_m, temperature)
    eos = tokenizer.eos_token_id
    scores = None if rewards is None else rewards(responses, examples).scores
    prompt_index = np.array([ex.index for ex in examples])
    samples = {
        "sample_id": sample_ids,
        "prompt_index": prompt_index,
        "prompt": [ex.prompt for ex in examples],
        "response": responses,
        "prompt_ids": _prompt_ids_array(prompt_t, prompt_m),
        "length": np.array([len(r) for r in response_ids]),
        "finished": [bool(r) and r[-1] == eos for r in response_ids],
        "reward": scores if scores is not None else [None] * len(examples),
    }
    tokens = _token_columns(sample_ids, prompt_index, resp_t, resp_m, entropy, logprob, decoder)
    return samples, tokens


def _pad_batch(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int, device):
    """Left-pad prompts and right-pad responses: `(prompt_ids, prompt_mask, response_ids, response_mask)`."""
    B = len(prompts)
    P = max(len(p) for p in prompts)
    R = max(1, max(len(r) for r in responses))  # an all-empty batch still needs one column
    prompt_ids = torch.full((B, P), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((B, P), dtype=torch.long)
    response_ids = torch.full((B, R), pad_id, dtype=torch.long)
    response_mask = torch.zeros((B, R), dtype=torch.long)
    for row, (p, r) in enumerate(zip(prompts, responses)):
        if len(p) == 0:
            raise ValueError("empty prompt")
        prompt_ids[row, P - len(p) :] = torch.from_numpy(np.array(p, dtype=np.int64))
        prompt_mask[row, P - len(p) :] = 1
        response_ids[row, : len(r)] = torch.from_numpy(np.array(r, dtype=np.int64))
        response_mask[row, : len(r)] = 1
    return prompt_ids.to(device), prompt_mask.to(device), response_ids.to(device), response_mask.to(device)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------- re-scoring


def score_store(
    store: str | os.PathLike | RolloutStore,
    model: torch.nn.Module,
    name: str,
    temperature: float = 1.0,
    batch_size: int = 16,
    model_name: str | None = None,
) -> RolloutStore:
    """Score the store's responses teacher-forced under `model` and write `entropy_<name>` and
    `logprob_<name>` into the token table (replacing columns of that name).

    Prompts are the stored `prompt_ids`, responses the stored `token_id`s, so the tokens scored
    are exactly the ones generated. Sequences are batched by length (less padding) and go
    through the fused LM-head path (`score_responses`); the results land in two float32 arrays
    of `num_tokens`, and the token table is then rewritten row group by row group with them.
    """
    from forkrl.models.scoring import score_responses

    store = RolloutStore.open(store)
    if not name or not name.replace("_", "").replace("-", "").replace(".", "").isalnum():
        raise ValueError(f"scoring name must be letters, digits, '_', '-' or '.', got {name!r}")
    samples = store.read_samples(["sample_id", "prompt_ids", "length"])
    lengths = samples.column("length").to_numpy().astype(np.int64)
    prompt_ids = samples.column("prompt_ids").combine_chunks()  # ListArray: offsets + flat values
    prompt_offsets = prompt_ids.offsets.to_numpy()
    prompt_values = prompt_ids.values.to_numpy()
    token_ids = store.read_token_column("token_id", np.int64)
    if int(lengths.sum()) != len(token_ids):
        raise ValueError(f"{store.path}: samples count {int(lengths.sum())} tokens, token table has {len(token_ids)}")
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    prompt_lengths = np.diff(prompt_offsets)
    entropy = np.zeros(len(token_ids), dtype=np.float32)
    logprob = np.zeros(len(token_ids), dtype=np.float32)

    device = next(model.parameters()).device
    nonempty = np.flatnonzero(lengths > 0)
    order = nonempty[np.argsort((prompt_lengths + lengths)[nonempty], kind="stable")]
    with torch.inference_mode(), _eval_mode(model):
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            prompts = [prompt_values[prompt_offsets[i] : prompt_offsets[i + 1]] for i in rows]
            responses = [token_ids[offsets[i] : offsets[i + 1]] for i in rows]
            p, pm, r, rm = _pad_batch(prompts, responses, 0, device)
            lp, ent = score_responses(model, p, pm, r, rm, temperature)
            lp, ent = lp.float().cpu().numpy(), ent.float().cpu().numpy()
            for j, i in enumerate(rows):
                n = lengths[i]
                entropy[offsets[i] : offsets[i] + n] = ent[j, :n]
                logprob[offsets[i] : offsets[i] + n] = lp[j, :n]
    column_meta = {"model": model_name or _model_name(model), "temperature": temperature, "how": "teacher-forced"}
    add_token_columns(store, {f"entropy_{name}": entropy, f"logprob_{name}": logprob}, {f"entropy_{name}": column_meta})
    return store


def add_token_columns(
    store: str | os.PathLike | RolloutStore,
    columns: dict[str, np.ndarray],
    column_meta: dict[str, dict[str, Any]] | None = None,
) -> RolloutStore:
    """Set (or replace) float32 token columns, one value per token in token-table order, and
    record `column_meta` (e.g. `{"entropy_x": {"model": ..., "temperature": ...}}`) in
    `store.json`. The token table is rewritten row group by row group into a temporary file
    that then replaces it. `score_store` uses this; so can entropies computed elsewhere."""
    store = RolloutStore.open(store)
    n = store.num_tokens
    for name, values in columns.items():
        if len(values) != n:
            raise ValueError(f"column {name!r} has {len(values)} values for {n} tokens")
        if name in TOKEN_SCHEMA.names:
            raise ValueError(f"cannot replace the base column {name!r}")
    with open(store.tokens_path, "rb") as f:
        source = pq.ParquetFile(f)
        schema = source.schema_arrow
        for name in columns:  # a replaced column keeps its place, a new one goes last
            if name in schema.names:
                schema = schema.set(schema.get_field_index(name), pa.field(name, pa.float32()))
            else:
                schema = schema.append(pa.field(name, pa.float32()))
        with atomic_path(store.tokens_path) as tmp:
            writer = pq.ParquetWriter(tmp, schema, compression="zstd")
            try:
                start = 0
                for group in range(source.num_row_groups):
                    table = source.read_row_group(group)
                    rows = table.num_rows
                    table = table.drop_columns([c for c in columns if c in table.column_names])
                    for name, values in columns.items():
                        chunk = np.asarray(values[start : start + rows], dtype=np.float32)
                        table = table.append_column(name, pa.array(chunk, type=pa.float32()))
                    writer.write_table(table.select(schema.names))
                    start += rows
            finally:
                writer.close()
    if column_meta:
        meta = store.meta
        meta.setdefault("columns", {}).update(column_meta)
        atomic_write_json(store.path / META_FILE, meta)
    return store


# ---------------------------------------------------------------------------- commands


def run_store(
    model: str,
    out_dir: str,
    data: str | Sequence[str] | None = None,
    responses: str | None = None,
    k: int = 4,
    max_new_tokens: int = 1024,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    batch_size: int = 16,
    seed: int = 0,
    reward: str | None = None,
    question_key: str = "question",
    answer_key: str = "answer",
    template: str = "paper",
    split: str = "test",
    limit: int | None = None,
    prompt_key: str = "prompt",
    response_key: str = "response",
    dtype: str = "auto",
    device: str | None = None,
) -> dict[str, Any]:
    """Build a store in `out_dir`: sample `k` responses per question of `data` with `model`,
    or (with `responses`) load prompt/response pairs from a jsonl file and score them.

    Returns a summary: path, number of samples and tokens, mean entropy, mean reward.
    """
    from forkrl.models.loading import load_policy
    from forkrl.tasks.data import PromptExample, load_prompts

    if (data is None) == (responses is None):
        raise ValueError("give exactly one of `data` (questions to sample from) or `responses` (a jsonl file)")
    policy, tokenizer = load_policy(model, dtype=dtype, device=device)
    if responses is not None:
        store = store_from_jsonl(
            policy,
            tokenizer,
            responses,
            out_dir,
            prompt_key=prompt_key,
            response_key=response_key,
            answer_key=answer_key if reward else None,
            temperature=temperature,
            batch_size=batch_size,
            reward_fn=reward,
            limit=limit,
            model_name=model,
        )
    else:
        files = [data] if isinstance(data, (str, os.PathLike)) else list(data)
        examples: list[PromptExample] = []
        for source in files:
            for ex in load_prompts(
                source, question_key, answer_key, split=split, limit=limit, template=template, tokenizer=tokenizer
            ):
                examples.append(PromptExample(ex.prompt, ex.question, ex.answer, len(examples), ex.metadata))
        store = generate_store(
            policy,
            tokenizer,
            examples,
            out_dir,
            k=k,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            batch_size=batch_size,
            seed=seed,
            reward_fn=reward,
            model_name=model,
        )
    return store_summary(store)


def run_score(
    store: str,
    model: str,
    name: str,
    temperature: float = 1.0,
    batch_size: int = 16,
    dtype: str = "auto",
    device: str | None = None,
) -> dict[str, Any]:
    """Re-score a store's responses under checkpoint `model`, adding `entropy_<name>`/`logprob_<name>`."""
    from forkrl.models.loading import load_policy

    policy, _ = load_policy(model, dtype=dtype, device=device)
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
