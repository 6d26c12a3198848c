"""Prompt data: load question/answer rows from files or `datasets`, render prompts, sample them.

Everything downstream (rollout, rewards) sees a list of `PromptExample`; how the rows got
there (jsonl, parquet, json, a Hugging Face dataset) stops mattering at this module.

Sources, chosen by what `source` is:

- an existing file ending in `.jsonl`, `.parquet` or `.json` (a list of objects);
- otherwise a `datasets` dataset: a directory written by `save_to_disk`, a directory of
  data files, or a hub id (the last needs the network or a warm cache).

Field names are dotted paths into nested rows: `"reward_model.ground_truth"`, and list
items by position, `"prompt.0.content"` (DAPO-Math-17K keeps its question there).

`PromptSampler` decides which prompt comes next: one shuffled stream over epochs,
identical for any number of data-parallel ranks, dealt out rank by rank, and resumable.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from forkrl.errors import UserError
from forkrl.io import jsonl_objects

__all__ = [
    "MISSING",
    "PAPER_TEMPLATE",
    "PROMPT_TEMPLATES",
    "PromptDataError",
    "PromptExample",
    "PromptSampler",
    "get_field",
    "load_prompts",
    "read_file_rows",
    "render_prompt",
]

PAPER_TEMPLATE = (
    "User:\n{question}\nPlease reason step by step, and put your final answer within \\boxed{}.\n\nAssistant:\n"
)
"""Paper 1's prompt (Section 4.1); `{question}` is the only placeholder, `\\boxed{}` is literal."""

PROMPT_TEMPLATES: dict[str, str] = {"paper": PAPER_TEMPLATE}
"""Named templates accepted by `render_prompt`; other tasks may add theirs."""


class PromptDataError(UserError):
    """A prompt source could not be read; the message names the file and row."""


@dataclass
class PromptExample:
    """One prompt with its reference answer, as every later stage sees it."""

    prompt: str
    """The rendered text the policy is conditioned on."""
    question: str
    """The raw question, before the template."""
    answer: str
    """The reference answer a verifier compares against (numbers are turned into text)."""
    index: int
    """Position in the loaded list (0-based); what `PromptSampler` yields."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """The source row as loaded, for custom reward functions that need more than the answer."""


# ---------------------------------------------------------------------------- rendering


def render_prompt(question: str, template: str = "paper", tokenizer: Any = None) -> str:
    """Turn a question into the text the policy sees.

    `template` is a name from `PROMPT_TEMPLATES` ("paper"), "chat" (the tokenizer's own chat
    template with a generation prompt), or a string containing `{question}`. Only that
    placeholder is substituted; every other brace is literal, so `\\boxed{}` needs no escaping.
    """
    if template == "chat":
        if tokenizer is None:
            raise ValueError("prompt template 'chat' needs a tokenizer (with a chat template)")
        messages = [{"role": "user", "content": question}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    text = PROMPT_TEMPLATES.get(template, template)
    if "{question}" not in text:
        names = ", ".join(sorted([*PROMPT_TEMPLATES, "chat"]))
        raise ValueError(
            f"prompt template {template!r} is neither a named template ({names}) "
            "nor a format string containing '{question}'"
        )
    # str.replace rather than str.format: templates routinely contain literal braces
    return text.replace("{question}", question)


# ---------------------------------------------------------------------------- loading


def load_prompts(
    source: str | os.PathLike,
    question_key: str = "question",
    answer_key: str | None = "answer",
    split: str = "train",
    limit: int | None = None,
    template: str = "paper",
    tokenizer: Any = None,
) -> list[PromptExample]:
    """Read prompts from `source` (see the module docstring) and render them with `template`.

    `answer_key=None` means the rows carry no answer (a custom reward judges from the
    metadata alone); `answer` is then "". `limit` keeps the first `limit` rows.
    Raises `PromptDataError` naming the file and row for any malformed row.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if limit == 0:
        return []
    path = os.fspath(source)
    if os.path.isfile(path):
        rows = read_file_rows(path, limit)
    else:
        rows = _read_dataset_rows(path, split, limit)

    examples = []
    for index, (where, row) in enumerate(rows):
        question = _question_from_row(row, question_key, where)
        answer = "" if answer_key is None else _answer_from_row(row, answer_key, where)
        prompt = render_prompt(question, template, tokenizer)
        examples.append(PromptExample(prompt, question, answer, index, row))
    return examples


def read_file_rows(path: str, limit: int | None) -> list[tuple[str, dict]]:
    """Rows of a local file, each paired with a location string used in error messages."""
    if os.path.getsize(path) == 0:
        raise PromptDataError(f"{path}: file is empty")
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".jsonl":
        rows = list(_iter_jsonl(path, limit))
    elif suffix == ".json":
        rows = _read_json(path)
    elif suffix == ".parquet":
        rows = _read_parquet(path)
    else:
        raise PromptDataError(f"{path}: unsupported file type {suffix!r} (use .jsonl, .json or .parquet)")
    if not rows:
        raise PromptDataError(f"{path}: no rows")
    return rows if limit is None else rows[:limit]


def _iter_jsonl(path: str, limit: int | None) -> Iterator[tuple[str, dict]]:
    if limit is not None and limit <= 0:
        return
    for count, item in enumerate(jsonl_objects(path, PromptDataError), start=1):
        yield item
        if count == limit:
            return  # before reading further lines: a bad line after the limit is never parsed


def _read_json(path: str) -> list[tuple[str, dict]]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except UnicodeDecodeError as e:
        raise PromptDataError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from e
    except json.JSONDecodeError as e:
        raise PromptDataError(f"{path}: invalid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from e
    if not isinstance(data, list):
        raise PromptDataError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
    return [(f"{path}: row {i}", _require_object(row, f"{path}: row {i}")) for i, row in enumerate(data, 1)]


def _read_parquet(path: str) -> list[tuple[str, dict]]:
    import pyarrow.parquet as pq  # optional dependency (forkrl[data]); only parquet needs it

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        raise PromptDataError(f"{path}: cannot read as parquet ({e})") from e
    return [(f"{path}: row {i}", row) for i, row in enumerate(table.to_pylist(), start=1)]


def _read_dataset_rows(source: str, split: str, limit: int | None) -> list[tuple[str, dict]]:
    """Rows of a `datasets` dataset: a `save_to_disk` directory, a data directory or a hub id."""
    try:
        import datasets
    except ImportError as e:
        raise PromptDataError(
            f"{source}: not an existing file, and loading it as a dataset needs the "
            "`datasets` package (pip install 'forkrl[data]')"
        ) from e

    if os.path.isdir(source) and _is_saved_dataset(source):
        ds = datasets.load_from_disk(source)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise PromptDataError(f"{source}: no split {split!r} (it has {sorted(ds)})")
            ds = ds[split]
    else:
        try:
            ds = datasets.load_dataset(source, split=split)
        except Exception as e:  # not found, offline, bad split: all surface as one clear error
            kind = "directory" if os.path.isdir(source) else "file or dataset"
            raise PromptDataError(
                f"{source}: not a readable prompt file (.jsonl, .json, .parquet) and "
                f"`datasets.load_dataset` failed for this {kind}: {type(e).__name__}: {e}"
            ) from e
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    if len(ds) == 0:
        raise PromptDataError(f"{source}: split {split!r} has no rows")
    return [(f"{source} ({split}): row {i}", row) for i, row in enumerate(ds, start=1)]


def _is_saved_dataset(directory: str) -> bool:
    # save_to_disk writes these marker files (a Dataset, or a DatasetDict respectively)
    return any(
        os.path.exists(os.path.join(directory, name))
        for name in ("dataset_info.json", "state.json", "dataset_dict.json")
    )


def _require_object(row: Any, where: str) -> dict:
    if not isinstance(row, dict):
        raise PromptDataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return row


# ---------------------------------------------------------------------------- fields

MISSING = object()
"""What `get_field` returns for a path a row does not have (a field may hold None)."""


def get_field(row: dict, key: str) -> Any:
    """Follow a dotted path; numeric parts index lists. `MISSING` when any step is absent."""
    value: Any = row
    for part in key.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.lstrip("-").isdigit() and -len(value) <= int(part) < len(value):
            value = value[int(part)]
        else:
            return MISSING
    return value


def _field_or_error(row: dict, key: str, role: str, where: str) -> Any:
    value = get_field(row, key)
    if value is MISSING or value is None:
        what = "has no" if value is MISSING else "has a null"
        raise PromptDataError(
            f"{where}: row {what} {role} field {key!r} (its fields: {sorted(row)}); "
            f"pass {role}_key= to name the right one"
        )
    return value


def _question_from_row(row: dict, key: str, where: str) -> str:
    question = _field_or_error(row, key, "question", where)
    if not isinstance(question, str):
        raise PromptDataError(f"{where}: question field {key!r} must be a string, got {type(question).__name__}")
    if not question.strip():
        raise PromptDataError(f"{where}: question field {key!r} is empty")
    return question


def _answer_from_row(row: dict, key: str, where: str) -> str:
    answer = _field_or_error(row, key, "answer", where)
    # Benchmarks store integer answers (AIME) as numbers; the verifier wants text.
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str):
        raise PromptDataError(
            f"{where}: answer field {key!r} must be a string or a number, got {type(answer).__name__}"
        )
    if not answer.strip():
        raise PromptDataError(f"{where}: answer field {key!r} is empty")
    return answer


# ---------------------------------------------------------------------------- sampling


class PromptSampler:
    """Deterministic, shardable, resumable stream of prompt indices.

    The global stream is the concatenation of epochs, epoch e being `torch.randperm(n)`
    under a generator seeded with `seed + e`. Rank r of W takes stream positions
    r, r + W, r + 2W, ...; so shards are disjoint within an epoch, every rank draws the same
    number of prompts per step, and interleaving the ranks' draws gives back exactly the
    single-process stream. Epoch boundaries fall mid-stride when W does not divide n;
    nothing is dropped or padded.

    The state is the global cursor (how many stream positions all ranks together have
    consumed), stored as (epoch, position). It is the same on every rank after each rank
    drew the same count, so any rank's `state_dict()` resumes all of them, even under a
    different world size.
    """

    def __init__(self, num_prompts: int, seed: int, rank: int = 0, world_size: int = 1):
        if num_prompts <= 0:
            raise ValueError(f"num_prompts must be positive, got {num_prompts}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.num_prompts = num_prompts
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self._cursor = 0  # global stream position of rank 0's next draw
        self._perm_epoch = -1
        self._perm: list[int] = []

    @property
    def epoch(self) -> int:
        """The epoch this rank's next index comes from."""
        return (self._cursor + self.rank) // self.num_prompts

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._perm_epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._perm = torch.randperm(self.num_prompts, generator=generator).tolist()
            self._perm_epoch = epoch
        return self._perm

    def __iter__(self) -> PromptSampler:
        return self

    def __next__(self) -> int:
        position = self._cursor + self.rank
        self._cursor += self.world_size
        epoch, offset = divmod(position, self.num_prompts)
        return self._permutation(epoch)[offset]

    def next_batch(self, batch_size: int) -> list[int]:
        """This rank's next `batch_size` indices (call with the same size on every rank)."""
        return [next(self) for _ in range(batch_size)]

    def state_dict(self) -> dict[str, int]:
        epoch, position = divmod(self._cursor, self.num_prompts)
        return {"epoch": epoch, "position": position, "seed": self.seed, "num_prompts": self.num_prompts}

    def load_state_dict(self, state: dict[str, int]) -> None:
        # A different seed or dataset size would silently replay a different order.
        for key, mine in (("seed", self.seed), ("num_prompts", self.num_prompts)):
            if key in state and state[key] != mine:
                raise ValueError(f"sampler state has {key}={state[key]}, but this sampler has {key}={mine}")
        self._cursor = int(state["epoch"]) * self.num_prompts + int(state["position"])
