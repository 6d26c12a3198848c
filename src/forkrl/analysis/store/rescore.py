"""`score_store`: the stored responses teacher-forced under another checkpoint, written as
`entropy_<name>` / `logprob_<name>` token columns (stored token ids -> scores -> new columns)."""

from __future__ import annotations

import os

import numpy as np
import torch

from forkrl.analysis.store.columns import add_token_columns
from forkrl.analysis.store.rows import model_label, pad_batch
from forkrl.analysis.store.schema import RolloutStore

__all__ = ["score_store"]


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
