"""`score_store`: the stored responses teacher-forced under another checkpoint, written as
`entropy_<name>` / `logprob_<name>` token columns (stored token ids -> scores -> new columns).

The store keeps token ids, which mean text only under the tokenizer that made them: a checkpoint with
another tokenizer would score other text, silently (same vocabulary size) or with an IndexError
(smaller). `check_tokenizer_fits` compares the tokenizer with `store.json`'s vocabulary size and the
stored pieces before the model loads, and `score_store` checks every id against the model's rows.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from forkrl.analysis.store.columns import add_token_columns
from forkrl.analysis.store.rows import model_label, pad_batch
from forkrl.analysis.store.schema import RolloutStore, StoreError

__all__ = ["check_score_name", "check_tokenizer_fits", "score_store"]

PIECES_CHECKED = 4096
"""Distinct token ids (from the start of the token table) whose stored text is compared with the tokenizer's."""


def check_score_name(name: str) -> None:
    """A scoring name makes column names: letters, digits, '_', '-' or '.' only."""
    if not name or not name.replace("_", "").replace("-", "").replace(".", "").isalnum():
        raise ValueError(f"--name {name!r}: a scoring name must be letters, digits, '_', '-' or '.'")


def check_tokenizer_fits(store: str | os.PathLike | RolloutStore, tokenizer, model_name: str) -> None:
    """`StoreError` unless `tokenizer` is the one the store was made with: the vocabulary size in
    `store.json` and the text of the first `PIECES_CHECKED` distinct stored token ids must match."""
    store = RolloutStore.open(store)
    recorded = store.meta.get("vocab_size")
    if recorded is not None and int(recorded) != len(tokenizer):
        raise StoreError(
            f"--model {model_name}: its tokenizer has {len(tokenizer)} tokens, but {store.path} was made with a "
            f"tokenizer of {recorded} (store.json vocab_size): the stored token ids would mean other text; score "
            "with a checkpoint of the model that made the store"
        )
    batch = next(store.iter_token_batches(["token_id", "piece"]), None)
    if batch is None:
        return
    ids = batch.column(0).to_numpy()
    ids, first = np.unique(ids, return_index=True)
    ids, first = ids[:PIECES_CHECKED], first[:PIECES_CHECKED]
    stored = batch.column(1).take(first).to_pylist()
    if int(ids.max()) >= len(tokenizer):
        raise StoreError(
            f"--model {model_name}: the store {store.path} holds token id {int(ids.max())}, beyond its tokenizer's "
            f"{len(tokenizer)} tokens: score with a checkpoint of the model that made the store"
        )
    decoded = tokenizer.batch_decode([[int(i)] for i in ids], skip_special_tokens=False)
    wrong = [(int(i), s, d) for i, s, d in zip(ids, stored, decoded) if s != d]
    if wrong:
        i, s, d = wrong[0]
        raise StoreError(
            f"--model {model_name}: its tokenizer is not the one that made {store.path}: token id {i} is {s!r} in "
            f"the store but {d!r} under this tokenizer ({len(wrong)} of {len(ids)} ids checked differ); score "
            "with a checkpoint of the model that made the store"
        )


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
    from forkrl.models.mode import eval_mode
    from forkrl.models.scoring import score_responses

    store = RolloutStore.open(store)
    check_score_name(name)
    samples = store.read_samples(["sample_id", "prompt_ids", "length"])
    lengths = samples.column("length").to_numpy().astype(np.int64)
    prompt_ids = samples.column("prompt_ids").combine_chunks()  # ListArray: offsets + flat values
    prompt_offsets = prompt_ids.offsets.to_numpy()
    prompt_values = prompt_ids.values.to_numpy()
    token_ids = store.read_token_column("token_id", np.int64)
    if int(lengths.sum()) != len(token_ids):
        raise ValueError(f"{store.path}: samples count {int(lengths.sum())} tokens, token table has {len(token_ids)}")
    rows = model.get_input_embeddings().num_embeddings
    largest = max(int(token_ids.max(initial=0)), int(prompt_values.max(initial=0)))
    if largest >= rows:
        raise StoreError(
            f"{model_name or model_label(model)}: the store {store.path} holds token id {largest}, but the model "
            f"has {rows} embedding rows: it was made with another model's tokenizer"
        )
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    prompt_lengths = np.diff(prompt_offsets)
    entropy = np.zeros(len(token_ids), dtype=np.float32)
    logprob = np.zeros(len(token_ids), dtype=np.float32)

    device = next(model.parameters()).device
    nonempty = np.flatnonzero(lengths > 0)
    order = nonempty[np.argsort((prompt_lengths + lengths)[nonempty], kind="stable")]
    with torch.inference_mode(), eval_mode(model):
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            prompts = [prompt_values[prompt_offsets[i] : prompt_offsets[i + 1]] for i in rows]
            responses = [token_ids[offsets[i] : offsets[i + 1]] for i in rows]
            p, pm, r, rm = pad_batch(prompts, responses, 0, device)
            lp, ent, _ = score_responses(model, p, pm, r, rm, temperature)
            lp, ent = lp.float().cpu().numpy(), ent.float().cpu().numpy()
            for j, i in enumerate(rows):
                n = lengths[i]
                entropy[offsets[i] : offsets[i] + n] = ent[j, :n]
                logprob[offsets[i] : offsets[i] + n] = lp[j, :n]
    column_meta = {"model": model_name or model_label(model), "temperature": temperature, "how": "teacher-forced"}
    add_token_columns(store, {f"entropy_{name}": entropy, f"logprob_{name}": logprob}, {f"entropy_{name}": column_meta})
    return store
