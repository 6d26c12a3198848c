"""`StoreWriter`: writes a store directory batch by batch, and moves it into place atomically."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from forkrl.analysis.store.schema import (
    FORMAT_VERSION,
    META_FILE,
    ROW_GROUP_SIZE,
    SAMPLE_SCHEMA,
    SAMPLES_FILE,
    TOKEN_SCHEMA,
    TOKENS_FILE,
    RolloutStore,
)
from forkrl.io import atomic_write_json, umask_permissions

__all__ = ["StoreWriter"]


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
