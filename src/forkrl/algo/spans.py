"""Gradient masks from the text: which response tokens lie inside a span matched on the decoded text.

`selection.span_pattern` is a regular expression searched in each decoded response (the text the
reward sees: `batch_decode(..., skip_special_tokens=True)`). The span is the named group `span`
when the pattern has one (`p=(?P<span>[0-9.]+)` keeps the forecast's digits, not `p=`), else the
whole match; when a response holds several matches the **last** one counts (a forecast states its
final answer last, as the forecast parser reads it). A response without a match has no span.

A token is inside the span when its characters overlap the span's characters. Token character
offsets come from the tokenizer itself: the decoded text is encoded again with
`return_offsets_mapping` (one call for the batch, in the tokenizer's Rust code), and where that
gives back exactly the sampled ids the offsets are theirs. A sampled sequence need not be the
canonical tokenization of its text (`"0" "."` where the tokenizer would write `"0."`); for such
rows the offsets are read from decoding the row's growing prefixes (exact for any tokenizer,
quadratic in the row's length, counted in the `span_offset_fallback_rows` metric). Special tokens
(EOS) decode to nothing and are never inside a span.

`selection.region` then says where the strategy may pick: `all` (every response token), `span`
(only inside the span; with `selection.strategy=span` every token of the span is kept), or
`outside_span` (everything but the span: e.g. top-ρ entropy within the reasoning). The kept counts
of the loss normalizer follow the region exactly (⌈ρ·N_region⌉ per selection unit).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch

from forkrl.ops.token_ranking import STRATEGIES

REGIONS = ("all", "span", "outside_span")


def selection_region(selection) -> str | None:
    """The region a `SelectionConfig` narrows the selection to: `span`, `outside_span`, or None
    for every response token (a strategy registered with a `region`, e.g. `span`, implies it)."""
    implied = STRATEGIES.get(selection.strategy).region
    if implied is not None:
        return implied
    return None if selection.region == "all" else selection.region


@lru_cache(maxsize=16)
def compile_span_pattern(pattern: str) -> re.Pattern:
    """The compiled pattern; a clear error for a bad one (the config check calls this)."""
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ValueError(f"not a valid regular expression: {err}") from None


def last_span(text: str, pattern: re.Pattern) -> tuple[int, int] | None:
    """(start, end) characters of the last match's `span` group (or whole match), or None."""
    found = None
    for m in pattern.finditer(text):
        found = m.span("span") if "span" in pattern.groupindex else m.span()
    if found is None or found[0] < 0:  # an optional `span` group that did not take part
        return None
    return found


def token_char_offsets(tokenizer, rows: Sequence[Sequence[int]]) -> tuple[list[str], list[np.ndarray], int]:
    """(texts, per-row `[len(row), 2]` character offsets into each text, rows that needed the
    prefix-decoding fallback). Special tokens get empty offsets at the end of the text so far."""
    special = np.asarray(sorted(set(tokenizer.all_special_ids)), dtype=np.int64)
    texts = tokenizer.batch_decode([list(r) for r in rows], skip_special_tokens=True)
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    offsets, fallbacks = [], 0
    for row, ids, spans in zip(rows, encoded["input_ids"], encoded["offset_mapping"]):
        row = np.asarray(row, dtype=np.int64)
        plain = ~np.isin(row, special)
        out = np.zeros((len(row), 2), dtype=np.int64)
        if np.array_equal(row[plain], np.asarray(ids, dtype=np.int64)):
            out[plain] = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
            # special tokens: an empty range where they stand
            ends = np.maximum.accumulate(np.where(plain, out[:, 1], 0)) if len(row) else out[:, 1]
            out[~plain] = np.stack([ends[~plain], ends[~plain]], axis=1)
        else:
            fallbacks += 1
            row = row.tolist()
            lengths = [len(tokenizer.decode(row[: i + 1], skip_special_tokens=True)) for i in range(len(row))]
            ends = np.asarray(lengths, dtype=np.int64)
            out[:, 1] = ends
            out[:, 0] = np.concatenate([[0], ends[:-1]]) if len(row) else ends
        offsets.append(out)
    return texts, offsets, fallbacks


def span_token_mask(
    tokenizer,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    pattern: str,
    region: str = "span",
) -> tuple[torch.Tensor, dict[str, float]]:
    """`[B, T]` bool: the response tokens of `region` (`span` or `outside_span`), plus counts:
    `span_found` (responses with a match) and `span_offset_fallback_rows`."""
    if region not in ("span", "outside_span"):
        raise ValueError(f"region must be 'span' or 'outside_span', got {region!r}")
    compiled = compile_span_pattern(pattern)
    valid = response_mask.bool()
    lengths = valid.sum(dim=1).tolist()
    ids = response_ids.tolist()
    texts, offsets, fallbacks = token_char_offsets(tokenizer, [row[:n] for row, n in zip(ids, lengths)])
    inside = np.zeros(tuple(response_ids.shape), dtype=bool)
    found = 0
    for i, (text, off) in enumerate(zip(texts, offsets)):
        span = last_span(text, compiled)
        if span is None:
            continue
        found += 1
        start, end = span
        inside[i, : len(off)] = (off[:, 0] < end) & (off[:, 1] > start) & (off[:, 1] > off[:, 0])
    mask = torch.from_numpy(inside).to(valid.device) & valid
    if region == "outside_span":
        mask = valid & ~mask
    return mask, {"span_found": float(found), "span_offset_fallback_rows": float(fallbacks)}
