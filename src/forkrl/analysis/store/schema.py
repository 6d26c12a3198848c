"""What a store directory holds (file names, column schemas) and `RolloutStore`, which reads it.

The layout is described in the package docstring (`forkrl.analysis.store`). Readers stream the
token table batch by batch, so a store of 10^6 tokens is read in a few MB per column.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from forkrl.errors import UserError, one_line

__all__ = [
    "FORMAT_VERSION",
    "META_FILE",
    "ROW_GROUP_SIZE",
    "SAMPLES_FILE",
    "SAMPLE_SCHEMA",
    "TOKENS_FILE",
    "TOKEN_SCHEMA",
    "RolloutStore",
    "StoreError",
]

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
"""Columns of the per-response table."""


class StoreError(UserError):
    """A store that cannot be used (a file cut short or of another format, a model that does not fit
    it); the message names the file or the model."""


@dataclass
class RolloutStore:
    """A store directory (see `forkrl.analysis.store`). Open one with `RolloutStore.open(path)`."""

    path: Path

    @classmethod
    def open(cls, path: str | os.PathLike | RolloutStore) -> RolloutStore:
        if isinstance(path, RolloutStore):
            return path
        store = cls(Path(path))
        for name in (TOKENS_FILE, SAMPLES_FILE, META_FILE):
            if not (store.path / name).is_file():
                raise FileNotFoundError(f"{store.path} is not a rollout store: {name} is missing")
        store._check_files()
        return store

    def _check_files(self) -> None:
        """Each file readable as what it should be (the parquet footers only: cheap), or `StoreError`
        naming it: a truncated copy used to fail deep in an analysis without saying which file."""
        self.meta  # noqa: B018 (reading it is the check)
        for file, schema in ((self.tokens_path, TOKEN_SCHEMA), (self.samples_path, SAMPLE_SCHEMA)):
            try:
                names = pq.read_schema(file).names
            except (pa.ArrowException, OSError) as err:
                raise StoreError(
                    f"{file}: not a readable parquet file ({one_line(err)}); was it cut short? "
                    "copy it again or rebuild the store with forkrl analyze store"
                ) from None
            missing = [n for n in schema.names if n not in names]
            if missing:
                raise StoreError(f"{file}: lacks the column(s) {', '.join(missing)} of a rollout store")

    @property
    def tokens_path(self) -> Path:
        return self.path / TOKENS_FILE

    @property
    def samples_path(self) -> Path:
        return self.path / SAMPLES_FILE

    @property
    def meta(self) -> dict[str, Any]:
        """The contents of `store.json`."""
        file = self.path / META_FILE
        try:
            meta = json.loads(file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise StoreError(f"{file}: not valid JSON ({one_line(err)})") from None
        if not isinstance(meta, dict):
            raise StoreError(f"{file}: expected a JSON object, got {type(meta).__name__}")
        return meta

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
