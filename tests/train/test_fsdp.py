"""FSDP2 helpers on 2 gloo CPU processes: the weights are really sharded, `gathered` restores the
full ones for `generate`, and generation inside it equals generation with the plain model."""

from __future__ import annotations

import torch

from forkrl.models.loading import load_policy
from forkrl.models.scoring import ResponseScorer
from forkrl.rollout import SamplingParams
from forkrl.rollout.hf import HFGenerationBackend
from forkrl.train.fsdp import gathered, shard_scorer
from tests.dist_utils import run_distributed

PROMPTS = [[3, 4, 5], [6, 7], [3, 4, 5], [8]]


def _generate(model, tokenizer) -> torch.Tensor:
    backend = HFGenerationBackend(model, tokenizer, batch_size=4)
    return backend.generate(PROMPTS, SamplingParams(6, row_seeds=[11, 12, 13, 14])).response_ids


def _sharded_worker(rank: int, world: int, model_dir: str):
    model, tokenizer = load_policy(model_dir, dtype="float32", device="cpu")
    full_numel = {n: p.numel() for n, p in model.named_parameters()}
    scorer = ResponseScorer(model)
    shard_scorer(scorer, model)
    local = {n: p.to_local().numel() for n, p in model.named_parameters()}
    with gathered(scorer):
        inside = {n: p.numel() for n, p in model.named_parameters()}
        tokens = _generate(model, tokenizer)
    after = {n: p.to_local().numel() for n, p in model.named_parameters()}
    from torch.distributed.fsdp import FSDPModule

    return isinstance(scorer, FSDPModule), full_numel, local, inside, after, tokens


def test_shards_gathers_and_generates_like_the_plain_model(tiny_model_dir):
    model, tokenizer = load_policy(tiny_model_dir, dtype="float32", device="cpu")
    expected = _generate(model, tokenizer)
    results = run_distributed(_sharded_worker, 2, tiny_model_dir)
    full = results[0][1]
    for name, n in full.items():
        # Every weight is split between the two processes: each holds a part, together all of it.
        assert results[0][2][name] < n and results[0][2][name] + results[1][2][name] == n, name
    for sharded, _, local, inside, after, tokens in results:
        assert sharded
        assert inside == full  # full parameters while gathered
        assert after == local  # and back to shards afterwards
        torch.testing.assert_close(tokens, expected, rtol=0, atol=0)
