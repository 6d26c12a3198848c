"""Entropy patterns of chain-of-thought tokens (paper 1, §3 and Fig. 2).

From a rollout store: the distribution of token entropies (histogram with log-scale counts,
percentiles, the share of near-deterministic tokens), the tokens with the highest and lowest
*average* entropy among frequent ones (tables and word clouds), and whole responses coloured
by entropy. The paper, on >10^6 Qwen3-8B tokens at T = 1: 50.64% of tokens below 1e-2 and the
80th percentile at 0.672, the threshold later used to tell forking tokens from the rest.

Definitions fixed here:

- Percentile p is the smallest stored entropy v such that at least p% of tokens have
  entropy <= v (numpy's "inverted_cdf"): the paper's "x% of the tokens have entropy values
  less than or equal to this value", and always an entropy that actually occurred. So the
  80th percentile h leaves at most 20% of tokens with H > h, the tokens Eq. 5 heats up.
- "Share below 1e-2" counts H < 0.01 strictly.
- The histogram has fixed bins on [0, ln V] (V the vocabulary size, the largest possible
  entropy), so histograms of different checkpoints line up bin by bin; it is accumulated
  batch by batch. Percentiles are exact: the entropy column is held as one float32 array
  (4 MB per 10^6 tokens).
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from forkrl.analysis.render import ColouredResponse, render_responses_html
from forkrl.analysis.store import RolloutStore
from forkrl.io import atomic_path, atomic_write_json, atomic_write_text, pyplot, save_figure

__all__ = [
    "DEFAULT_PERCENTILES",
    "EntropyHistogram",
    "TokenEntropyStats",
    "entropy_percentiles",
    "run_entropy",
    "share_below",
    "write_word_cloud",
]

DEFAULT_PERCENTILES: tuple[int, ...] = tuple(range(0, 101, 10))
LOW_ENTROPY_THRESHOLD = 1e-2
DEFAULT_MAX_ENTROPY = 12.0
"""Histogram range when the vocabulary size is unknown (ln 151936 = 11.93, Qwen3's vocabulary)."""


# ---------------------------------------------------------------------------- numeric cores


def entropy_percentiles(values: np.ndarray, percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> dict[str, float]:
    """`{"p0": ..., "p10": ...}`: exact percentiles by the inverted CDF (module docstring)."""
    values = np.asarray(values)
    if values.size == 0:
        raise ValueError("no entropies")
    qs = np.percentile(values, list(percentiles), method="inverted_cdf")
    return {f"p{p:g}": float(q) for p, q in zip(percentiles, qs)}


def share_below(values: np.ndarray, threshold: float = LOW_ENTROPY_THRESHOLD) -> float:
    """Fraction of values strictly below `threshold`."""
    values = np.asarray(values)
    if values.size == 0:
        raise ValueError("no entropies")
    return float(np.count_nonzero(values < threshold)) / values.size


@dataclass
class EntropyHistogram:
    """Counts of entropies in fixed bins, accumulated batch by batch.

    Bins are `[edges[i], edges[i+1])`, the last one closed. Values outside the range are put
    in the first or last bin and counted in `num_clipped` (entropies are >= 0 and <= ln V,
    so only float noise such as -1e-7 should ever land there).
    """

    edges: np.ndarray
    """`[num_bins + 1]` bin edges."""
    counts: np.ndarray = field(default=None)  # type: ignore[assignment]
    """`[num_bins]` int64 counts."""
    num_clipped: int = 0

    def __post_init__(self):
        self.edges = np.asarray(self.edges, dtype=np.float64)
        if self.counts is None:
            self.counts = np.zeros(len(self.edges) - 1, dtype=np.int64)

    @classmethod
    def uniform(cls, max_entropy: float, num_bins: int = 100) -> EntropyHistogram:
        if max_entropy <= 0 or num_bins < 1:
            raise ValueError(f"need max_entropy > 0 and num_bins >= 1, got {max_entropy}, {num_bins}")
        return cls(np.linspace(0.0, max_entropy, num_bins + 1))

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64)
        lo, hi = self.edges[0], self.edges[-1]
        self.num_clipped += int(np.count_nonzero((values < lo) | (values > hi)))
        counts, _ = np.histogram(np.clip(values, lo, hi), bins=self.edges)
        self.counts += counts

    def to_json(self) -> dict[str, Any]:
        return {"edges": self.edges.tolist(), "counts": self.counts.tolist(), "num_clipped": self.num_clipped}


@dataclass
class TokenEntropyStats:
    """Per token id: how often it occurs and the sum of its entropies (a streaming group-by).

    Arrays are indexed by token id and grow to the largest id seen, so memory is bounded by the
    vocabulary, not by the number of tokens. `pieces` keeps each id's text from its first row.
    """

    sums: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float64))
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    pieces: dict[int, str] = field(default_factory=dict)

    def add(self, token_ids: np.ndarray, entropy: np.ndarray, pieces: pa.Array | Sequence[str] | None = None) -> None:
        """Accumulate one batch: `token_ids [N]`, `entropy [N]`, optionally their texts `[N]`."""
        token_ids = np.asarray(token_ids, dtype=np.int64)
        if token_ids.size == 0:
            return
        size = int(token_ids.max()) + 1
        if size > len(self.sums):
            self.sums = np.pad(self.sums, (0, size - len(self.sums)))
            self.counts = np.pad(self.counts, (0, size - len(self.counts)))
        self.sums[:size] += np.bincount(token_ids, weights=np.asarray(entropy, dtype=np.float64), minlength=size)
        self.counts[:size] += np.bincount(token_ids, minlength=size)
        if pieces is not None:
            unique, first = np.unique(token_ids, return_index=True)
            new = np.array([u not in self.pieces for u in unique.tolist()], dtype=bool)
            if new.any():
                taken = pieces.take(pa.array(first[new])) if isinstance(pieces, pa.Array) else None
                texts = taken.to_pylist() if taken is not None else [pieces[i] for i in first[new]]
                self.pieces.update(zip(unique[new].tolist(), texts))

    def means(self) -> np.ndarray:
        """Average entropy per token id (NaN for ids never seen)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.sums / self.counts

    def extremes(self, min_count: int, top_n: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The `top_n` tokens with the highest and the lowest average entropy among tokens seen
        at least `min_count` times: two lists of `{token_id, piece, count, mean_entropy}`, highest
        first and lowest first. Ties go to the smaller token id."""
        eligible = np.flatnonzero(self.counts >= min_count)
        means = self.means()[eligible]
        high = eligible[np.lexsort((eligible, -means))][:top_n]
        low = eligible[np.lexsort((eligible, means))][:top_n]
        return self._rows(high), self._rows(low)

    def _rows(self, ids: np.ndarray) -> list[dict[str, Any]]:
        means = self.means()
        return [
            {
                "token_id": int(i),
                "piece": self.pieces.get(int(i), ""),
                "count": int(self.counts[i]),
                "mean_entropy": float(means[i]),
            }
            for i in ids
        ]


# ---------------------------------------------------------------------------- outputs


def _display(piece: str) -> str:
    """How a token reads in a table or word cloud: whitespace made visible."""
    stripped = piece.strip()
    if stripped:
        return stripped
    return piece.replace(" ", "␣").replace("\n", "\\n").replace("\t", "\\t") or "∅"


def write_word_cloud(rows: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = "") -> Path:
    """A word cloud of `rows` (`piece`, `mean_entropy`) with font size growing with average
    entropy (paper Fig. 2b/c). Tokens with the same visible text keep their largest mean."""
    from wordcloud import WordCloud

    frequencies: dict[str, float] = {}
    for row in rows:
        word = _display(row["piece"])
        # word clouds need positive weights; a mean of exactly 0 still gets a (smallest) place
        frequencies[word] = max(frequencies.get(word, 0.0), max(float(row["mean_entropy"]), 1e-12))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.axis("off")
    if frequencies:
        cloud = WordCloud(
            width=800, height=400, background_color="white", prefer_horizontal=1.0, random_state=0, collocations=False
        ).generate_from_frequencies(frequencies)
        ax.imshow(cloud, interpolation="bilinear")
    else:
        ax.text(0.5, 0.5, "no token reaches the minimum count", ha="center", va="center")
    if title:
        ax.set_title(title)
    return save_figure(fig, path)


def _plot_histogram(hist: EntropyHistogram, p80: float, below: float, path: Path, label: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    nonzero = np.flatnonzero(hist.counts)
    last = int(nonzero[-1]) + 1 if nonzero.size else 1
    edges, counts = hist.edges[: last + 1], hist.counts[:last]
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="#4c72b0", edgecolor="none")
    ax.set_yscale("log")
    ax.set_ylim(bottom=0.5)  # a bin with a single token stays visible
    ax.axvline(p80, color="#c44e52", linestyle="--", label=f"80th percentile = {p80:.3g}")
    ax.set_xlabel("token entropy (nats)")
    ax.set_ylabel("number of tokens (log scale)")
    ax.set_title(f"{label}: {below:.2%} of tokens below 1e-2")
    ax.legend()
    save_figure(fig, path)


def _write_token_table(high: list[dict], low: list[dict], meta: dict[str, Any], out: Path) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["group", "rank", "token_id", "piece", "count", "mean_entropy"])
    for group, rows in (("high", high), ("low", low)):
        for rank, row in enumerate(rows, 1):
            writer.writerow([group, rank, row["token_id"], row["piece"], row["count"], f"{row['mean_entropy']:.6g}"])
    atomic_write_text(out / "token_table.csv", buffer.getvalue())
    atomic_write_json(out / "token_table.json", {**meta, "high": high, "low": low})


def run_entropy(
    store: str | os.PathLike | RolloutStore,
    out_dir: str | os.PathLike,
    column: str = "entropy",
    min_count: int = 100,
    top_n: int = 100,
    num_bins: int = 100,
    num_responses: int = 3,
    sample_ids: Sequence[int] | None = None,
    batch_size: int = 1 << 16,
) -> dict[str, Any]:
    """Paper 1 Fig. 2 and §3 on a rollout store.

    Args:
        store: the store directory (see `forkrl.analysis.store`).
        out_dir: where to write `entropy.json`, `token_table.csv`/`.json`, `entropy_hist.png`,
            `wordcloud_high.png`, `wordcloud_low.png` and `responses.html`.
        column: which entropy column (`entropy`, or a re-scoring name / `entropy_<name>`).
        min_count: only tokens seen at least this often enter the tables (paper: > 100).
        top_n: rows per table and words per cloud (paper: 100).
        num_bins: histogram bins on [0, ln V].
        num_responses: how many responses `responses.html` shows (the first ones in the store),
            unless `sample_ids` names them.

    Returns the contents of `entropy.json` without the histogram.
    """
    store = RolloutStore.open(store)
    column = store.resolve_column(column)
    meta = store.meta
    n = store.num_tokens
    if n == 0:
        raise ValueError(f"{store.path}: the store has no tokens")
    vocab = meta.get("vocab_size")
    max_entropy = math.log(vocab) if vocab and vocab > 1 else DEFAULT_MAX_ENTROPY
    hist = EntropyHistogram.uniform(max_entropy, num_bins)
    stats = TokenEntropyStats()
    values = np.empty(n, dtype=np.float32)

    samples = store.read_samples(["sample_id", "prompt_index", "prompt", "reward"])
    if sample_ids is None:
        sample_ids = samples.column("sample_id").to_pylist()[:num_responses]
    wanted = pa.array(list(sample_ids), type=pa.int32())
    picked: list[pa.RecordBatch] = []

    start = 0
    for batch in store.iter_token_batches(["sample_id", "token_id", "piece", column], batch_size):
        entropy = batch.column(column).to_numpy()
        values[start : start + len(entropy)] = entropy
        start += len(entropy)
        hist.add(entropy)
        stats.add(batch.column("token_id").to_numpy(), entropy, batch.column("piece"))
        if len(wanted):
            chosen = batch.filter(pc.is_in(batch.column("sample_id"), value_set=wanted))
            if chosen.num_rows:
                picked.append(chosen)

    percentiles = entropy_percentiles(values)
    p80 = percentiles["p80"]
    below = share_below(values)
    p99 = float(np.percentile(values, 99, method="inverted_cdf"))
    mean = float(values.mean(dtype=np.float64))
    del values

    high, low = stats.extremes(min_count, top_n)
    column_meta = meta.get("columns", {}).get(column, {})
    summary = {
        "store": str(store.path),
        "column": column,
        "model": column_meta.get("model", meta.get("model")),
        "temperature": column_meta.get("temperature", meta.get("temperature")),
        "num_tokens": n,
        "num_samples": store.num_samples,
        "mean": mean,
        "percentiles": percentiles,
        "p80": p80,
        "share_below_0.01": below,
        "num_token_types": int(np.count_nonzero(stats.counts)),
        "num_token_types_min_count": int(np.count_nonzero(stats.counts >= min_count)),
        "min_count": min_count,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "entropy.json", {**summary, "histogram": hist.to_json()})
    table_meta = {"column": column, "min_count": min_count, "top_n": top_n}
    _write_token_table(high, low, table_meta, out)
    label = str(summary["model"] or store.path.name)
    _plot_histogram(hist, p80, below, out / "entropy_hist.png", label)
    write_word_cloud(high, out / "wordcloud_high.png", f"highest average entropy (count >= {min_count})")
    write_word_cloud(low, out / "wordcloud_low.png", f"lowest average entropy (count >= {min_count})")
    _write_responses_html(picked, samples, column, p99, label, out / "responses.html")
    return summary


def _write_responses_html(
    picked: list[pa.RecordBatch], samples: pa.Table, column: str, vmax: float, label: str, path: Path
) -> None:
    by_sample: dict[int, ColouredResponse] = {}
    rows = {sid: i for i, sid in enumerate(samples.column("sample_id").to_pylist())}
    table = pa.Table.from_batches(picked) if picked else None
    order: list[int] = []
    if table is not None:
        ids = table.column("sample_id").to_numpy()
        pieces = table.column("piece").to_pylist()
        entropy = table.column(column).to_numpy()
        for sid in dict.fromkeys(ids.tolist()):  # first-appearance order = store order
            where = np.flatnonzero(ids == sid)
            row = rows[sid]
            reward = samples.column("reward")[row].as_py()
            by_sample[sid] = ColouredResponse(
                sample_id=sid,
                prompt_index=samples.column("prompt_index")[row].as_py(),
                prompt=samples.column("prompt")[row].as_py(),
                pieces=[pieces[i] for i in where],
                entropy=entropy[where],
                reward=reward,
            )
            order.append(sid)
    subtitle = f"{label}, column {column}; colour scale from 0 to the store's 99th percentile ({vmax:.3g})"
    page = render_responses_html([by_sample[s] for s in order], vmax=max(vmax, 1e-6), subtitle=subtitle)
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
