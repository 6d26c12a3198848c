"""`add_token_columns`: set or replace float32 token columns of an existing store, rewriting the
token table row group by row group (bounded memory) into a file that then replaces it."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from forkrl.analysis.store.schema import META_FILE, TOKEN_SCHEMA, RolloutStore
from forkrl.io import atomic_path, atomic_write_json

__all__ = ["add_token_columns"]


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
