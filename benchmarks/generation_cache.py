"""Rollout time with forkrl's in-place KV cache (`rollout.kv_cache.GrowingLayer`) against
transformers' default concatenating `DynamicCache`, on the shipped toy model.

Both runs go through `HFGenerationBackend` with the same row seeds, so they sample the same tokens
(the script checks it); only the cache differs. Rounds alternate between the two to spread machine
noise; the median of `--repeats` rounds is printed with the ratio.

    python benchmarks/generation_cache.py                      # 64 problems x 8 samples, batch 256
    python benchmarks/generation_cache.py --problems 256 --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from transformers import DynamicCache

from forkrl.models.loading import load_policy
from forkrl.rollout import SamplingParams
from forkrl.rollout import hf as hf_module
from forkrl.rollout.hf import HFGenerationBackend
from forkrl.tasks.countdown import generate_problems, problems_to_examples
from forkrl.toy.demo import SHIPPED_MODEL


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=64)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = load_policy(SHIPPED_MODEL, dtype="float32", device="cpu")
    problems = generate_problems(args.problems, 1234, "test", num_numbers=3, max_number=15, max_target=100)
    prompts = [ex.prompt for ex in problems_to_examples(problems) for _ in range(args.samples)]
    params = SamplingParams(args.max_new_tokens, row_seeds=list(range(len(prompts))))
    backend = HFGenerationBackend(model, tokenizer, batch_size=args.batch_size)
    growing = hf_module.growing_cache
    # Both caches go through the same shared-prompt prefill; only how the layers append differs.
    factories = {"growing (forkrl)": growing, "DynamicCache (transformers)": DynamicCache}

    times: dict[str, list[float]] = {name: [] for name in factories}
    outputs = {}
    warm_up = SamplingParams(8, row_seeds=params.row_seeds[: args.batch_size])
    backend.generate(prompts[: args.batch_size], warm_up)
    try:
        for _ in range(args.repeats):
            for name, factory in factories.items():
                hf_module.growing_cache = factory
                start = time.perf_counter()
                outputs[name] = backend.generate(prompts, params)
                times[name].append(time.perf_counter() - start)
    finally:
        hf_module.growing_cache = growing

    a, b = outputs.values()
    same = torch.equal(a.response_ids, b.response_ids)
    tokens = int(a.response_lengths.sum())
    print(
        f"{len(prompts)} responses ({tokens} tokens, longest {a.response_ids.shape[1]}), batch {args.batch_size}, "
        f"{args.threads} threads, same tokens: {same}, loadavg {os.getloadavg()[0]:.1f}"
    )
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, median in medians.items():
        print(f"  {name:30s} median {median:6.2f} s  ({', '.join(f'{t:.2f}' for t in times[name])})")
    base = medians["DynamicCache (transformers)"]
    print(f"  ratio growing / DynamicCache: {medians['growing (forkrl)'] / base:.2f}x")


if __name__ == "__main__":
    main()
