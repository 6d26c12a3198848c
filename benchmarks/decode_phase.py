"""Rollout time with `rollout.decode_phase` (decode in phases, continue only unfinished rows)
against one `generate` call per batch, on the shipped toy model with the demo's batch shape.

Each round samples a fresh draw of 48 train prompts x 8 responses (384 rows, one batch, up to 320
new tokens, per-row seeds) once per phase setting, in turn; the script checks that every setting
samples the same tokens and prints the median time per setting and its ratio to one call.

    python benchmarks/decode_phase.py                       # phases 0, 32, 64, 96, 128; 4 rounds
    python benchmarks/decode_phase.py --phases 0 64 --rounds 6
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from forkrl.models.loading import load_policy
from forkrl.rollout import SamplingParams
from forkrl.rollout.hf import HFGenerationBackend
from forkrl.tasks.countdown import generate_problems, problems_to_examples
from forkrl.toy.demo import SHIPPED_MODEL


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phases", type=int, nargs="+", default=[0, 32, 64, 96, 128])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=320)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if 0 not in args.phases:
        args.phases = [0, *args.phases]

    model, tokenizer = load_policy(SHIPPED_MODEL, dtype="float32", device="cpu")
    problems = generate_problems(args.prompts * args.rounds, 0, "train", num_numbers=3, max_number=15, max_target=100)
    examples = problems_to_examples(problems)
    rows = args.prompts * args.samples
    times: dict[int, list[float]] = {phase: [] for phase in args.phases}
    same = True
    for r in range(args.rounds):
        prompts = [ex.prompt for ex in examples[r * args.prompts : (r + 1) * args.prompts] for _ in range(args.samples)]
        params = SamplingParams(args.max_new_tokens, row_seeds=list(range(r * rows, (r + 1) * rows)))
        outputs = {}
        for phase in args.phases:
            backend = HFGenerationBackend(model, tokenizer, batch_size=rows, decode_phase=phase)
            start = time.perf_counter()
            outputs[phase] = backend.generate(prompts, params)
            times[phase].append(time.perf_counter() - start)
        lengths = outputs[0].response_lengths.float()
        same &= all(torch.equal(outputs[0].response_ids, out.response_ids) for out in outputs.values())
        print(f"round {r}: response length mean {lengths.mean():.0f}, max {lengths.max():.0f}")
    print(f"{rows} rows per batch, up to {args.max_new_tokens} tokens, {args.threads} threads, same tokens: {same}")
    base = statistics.median(times[0])
    for phase, values in times.items():
        label = "one call" if phase == 0 else f"phase {phase}"
        runs = ", ".join(f"{t:.2f}" for t in values)
        median = statistics.median(values)
        print(f"  {label:10s} median {median:5.2f} s ({runs})  {median / base:.2f}x")


if __name__ == "__main__":
    main()
