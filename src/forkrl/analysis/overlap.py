"""Do checkpoints agree on *where* the high-entropy tokens are? (paper 1, Table 1)

The same responses are scored by several checkpoints (store columns `entropy_<name>`, see
`score_store`). For each checkpoint we take the positions of its top-ρ entropies over the whole
store and report the overlap with the first and with the last checkpoint:

    overlap(A, B) = |top(A) ∩ top(B)| / |top(A)|

top() keeps exactly k = ⌈ρ·N⌉ positions of N (both sets have the same size, so the ratio is
symmetric), chosen by `forkrl.ops.token_ranking.select_tokens` on the flattened store — the same
selection, tie rule (earlier position wins) and k as the training loss. The paper (Qwen3-14B,
responses of the final RLVR model): overlap with the base model still >= 86% after 1360 steps.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from forkrl.analysis.store import RolloutStore
from forkrl.io import atomic_write_json, atomic_write_text, pyplot, save_figure
from forkrl.ops.token_ranking import num_selected, select_tokens

__all__ = ["overlap_ratio", "run_overlap", "top_entropy_mask"]


def top_entropy_mask(entropy: np.ndarray, ratio: float = 0.2) -> np.ndarray:
    """`[N]` bool: the ⌈ratio·N⌉ highest entropies of `entropy [N]` (ties to the earlier index)."""
    values = torch.from_numpy(np.ascontiguousarray(entropy, dtype=np.float32)).reshape(1, -1)
    selection = select_tokens(values, torch.ones_like(values, dtype=torch.bool), "top", ratio)
    return selection.mask.reshape(-1).numpy()


def overlap_ratio(top_a: np.ndarray, top_b: np.ndarray) -> float:
    """|A ∩ B| / |A| for two boolean position masks of the same shape (NaN when A is empty)."""
    size = int(np.count_nonzero(top_a))
    if size == 0:
        return float("nan")
    return int(np.count_nonzero(top_a & top_b)) / size


def _label(store: RolloutStore, column: str) -> str:
    if column == "entropy":
        model = store.meta.get("columns", {}).get("entropy", {}).get("model")
        return f"generator ({Path(model).name})" if model else "generator"
    return column.removeprefix("entropy_")


def _markdown(labels: list[str], with_first: list[float], with_last: list[float], ratio: float) -> str:
    def pct(x: float) -> str:
        return "n/a" if x != x else f"{100 * x:.2f}%"

    header = "| Compared w/ | " + " | ".join(labels) + " |"
    rule = "|---|" + "---:|" * len(labels)
    rows = [
        f"| {labels[0]} (first) | " + " | ".join(pct(x) for x in with_first) + " |",
        f"| {labels[-1]} (last) | " + " | ".join(pct(x) for x in with_last) + " |",
    ]
    title = f"Overlap of the top {100 * ratio:g}% entropy positions\n\n"
    return title + "\n".join([header, rule, *rows]) + "\n"


def run_overlap(
    store: str | os.PathLike | RolloutStore,
    out_dir: str | os.PathLike,
    columns: Sequence[str] | None = None,
    ratio: float = 0.2,
    labels: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Paper 1 Table 1 on a store; writes `overlap.json`, `overlap.md` and `overlap.png`.

    Args:
        columns: entropy columns (or scoring names) in checkpoint order, e.g.
            `["step0", "step100", "step200"]`; default every entropy column in the order added.
            The first is compared with as the "base", the last as the "final" model.
        ratio: ρ, the top fraction of positions (paper: 0.2).
        labels: names for the table and plot (default: the scoring names).

    Returns `overlap.json`'s contents.
    """
    store = RolloutStore.open(store)
    columns = [store.resolve_column(c) for c in (columns or store.entropy_columns)]
    if len(columns) < 2:
        raise ValueError(f"{store.path}: need at least two entropy columns to compare, have {columns}")
    labels = list(labels) if labels is not None else [_label(store, c) for c in columns]
    if len(labels) != len(columns):
        raise ValueError(f"{len(labels)} labels for {len(columns)} columns")
    n = store.num_tokens
    if n == 0:
        raise ValueError(f"{store.path}: the store has no tokens")

    # One [N] bool mask per checkpoint (1 MB per 10^6 tokens); entropies are read one column at a time.
    masks = [top_entropy_mask(store.read_token_column(c, np.float32), ratio) for c in columns]
    with_first = [overlap_ratio(m, masks[0]) for m in masks]
    with_last = [overlap_ratio(m, masks[-1]) for m in masks]
    result = {
        "store": str(store.path),
        "ratio": ratio,
        "num_tokens": n,
        "num_top": num_selected(n, ratio, "top"),
        "columns": columns,
        "labels": labels,
        "with_first": with_first,
        "with_last": with_last,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "overlap.json", result)
    atomic_write_text(out / "overlap.md", _markdown(labels, with_first, with_last, ratio))
    _plot(labels, with_first, with_last, ratio, out / "overlap.png")
    return result


def _plot(labels: list[str], with_first: list[float], with_last: list[float], ratio: float, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(labels) + 2), 4))
    x = np.arange(len(labels))
    ax.plot(x, 100 * np.asarray(with_first), marker="o", color="#4c72b0", label=f"vs {labels[0]} (first)")
    ax.plot(x, 100 * np.asarray(with_last), marker="s", color="#c44e52", label=f"vs {labels[-1]} (last)")
    ax.set_xticks(x, labels, rotation=30, ha="right")
    ax.set_ylabel(f"overlap of top-{100 * ratio:g}% positions (%)")
    ax.set_ylim(top=101)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)
