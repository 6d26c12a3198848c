"""The rollout store: sampled responses with per-token entropy and log-prob, on disk in parquet.

Every analysis of paper 1 reads token entropies of responses, often of the *same* responses
under several checkpoints (Table 1, Fig. 4). The store keeps them in one directory:

    tokens.parquet   one row per response token, in sample order then position order:
                     sample_id, prompt_index, position, token_id, piece (the decoded token),
                     entropy, logprob, and entropy_<name> / logprob_<name> per re-scoring
    samples.parquet  one row per response: sample_id, prompt_index, prompt, response,
                     prompt_ids, length (tokens), finished (ended with EOS), reward (null
                     without a reward function)
    store.json       how it was made, and for every entropy column its model and temperature

`entropy` and `logprob` are recorded where the responses come from: the sampler's statistics
when the store is generated (entropy of softmax(z / T) at the sampling temperature, SPEC Eq. 1;
log-prob of the sampled token under the distribution it was drawn from, which is the plain
softmax(z / T) without top-k / top-p), or a teacher-forced scoring when responses are loaded
from a jsonl file. `score_store` adds the same two numbers under another checkpoint.

Memory: everything is written batch by batch as arrow arrays (no per-token Python objects),
coalesced into row groups of `ROW_GROUP_SIZE` rows, and readers go through
`ParquetFile.iter_batches`; 10^6 tokens cost a few MB per numeric column. Each file is written
to a temporary name and renamed into place, so a crash never leaves a truncated file.

One job per module, in the order data flows:

    options.py   `StoreOptions`: how a store is made (sampling, reward, input fields)
    schema.py    file names, column schemas, `RolloutStore` (reading a store)
    writer.py    `StoreWriter` (writing one, batch by batch, atomically)
    rows.py      one batch of tensors -> the samples/tokens rows the writer takes
    generate.py  `generate_store`: sample with any `GenerationBackend`
    ingest.py    `store_from_jsonl`: responses from a file, teacher-forced
    rescore.py   `score_store`: the stored responses under another checkpoint
    columns.py   `add_token_columns`: set or replace token columns in place
    commands.py  `run_store`, `run_score`, `store_summary`: the `forkrl analyze` entry points

Model code (transformers) and rewards (math-verify) are imported where they are used, so that
reading a store and analysing it does not pay several seconds of imports.
"""

from forkrl.analysis.store.columns import add_token_columns
from forkrl.analysis.store.commands import run_score, run_store, store_summary
from forkrl.analysis.store.generate import generate_store
from forkrl.analysis.store.ingest import store_from_jsonl
from forkrl.analysis.store.options import StoreOptions
from forkrl.analysis.store.rescore import score_store
from forkrl.analysis.store.schema import (
    FORMAT_VERSION,
    META_FILE,
    ROW_GROUP_SIZE,
    SAMPLE_SCHEMA,
    SAMPLES_FILE,
    TOKEN_SCHEMA,
    TOKENS_FILE,
    RolloutStore,
    StoreError,
)
from forkrl.analysis.store.writer import StoreWriter

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
    "StoreOptions",
    "StoreWriter",
    "add_token_columns",
    "generate_store",
    "run_score",
    "run_store",
    "score_store",
    "store_from_jsonl",
    "store_summary",
]
