"""Hand-made rollout stores for tests: every token's id, text and entropy chosen by the test."""

from __future__ import annotations

import numpy as np

from forkrl.analysis.store import RolloutStore, StoreWriter, add_token_columns


def write_store(
    path,
    responses: list[list[tuple[int, str, float]]],
    extra: dict[str, list[float]] | None = None,
    prompts: list[str] | None = None,
    rewards: list[float | None] | None = None,
    vocab_size: int | None = None,
    row_group_size: int = 4,
) -> RolloutStore:
    """One sample per response, each a list of `(token_id, piece, entropy)`; `extra` adds flat
    per-token columns (e.g. `{"entropy_base": [...]}`) in token order. The small row groups make
    readers cross row-group boundaries even in tiny stores."""
    prompts = prompts or [f"prompt {i}" for i in range(len(responses))]
    rewards = rewards or [None] * len(responses)
    meta = {"source": "crafted", "model": "crafted", "temperature": 1.0, "vocab_size": vocab_size}
    meta["columns"] = {"entropy": {"model": "crafted", "temperature": 1.0, "how": "crafted"}}
    with StoreWriter(path, meta, row_group_size=row_group_size) as writer:
        for i, tokens in enumerate(responses):
            samples = {
                "sample_id": [i],
                "prompt_index": [i],
                "prompt": [prompts[i]],
                "response": ["".join(piece for _, piece, _ in tokens)],
                "prompt_ids": [[3, 4]],
                "length": [len(tokens)],
                "finished": [True],
                "reward": [rewards[i]],
            }
            columns = {
                "sample_id": [i] * len(tokens),
                "prompt_index": [i] * len(tokens),
                "position": list(range(len(tokens))),
                "token_id": [t for t, _, _ in tokens],
                "piece": [p for _, p, _ in tokens],
                "entropy": [h for _, _, h in tokens],
                "logprob": [-h for _, _, h in tokens],
            }
            writer.write(samples, columns)
    store = writer.close()
    if extra:
        add_token_columns(store, {k: np.asarray(v, dtype=np.float32) for k, v in extra.items()})
    return store
