"""Rollout time of the lean decode loop against `model.generate`, on the shipped toy model with the demo's batch.

Each round samples a fresh draw of 48 train prompts x 8 responses (384 rows, one batch, up to 320
new tokens, per-row seeds, `decode_phase` 64 as in the demo) with `HFGenerationBackend` twice, once
decoding in forkrl's loop (`lean_decode=True`, the default) and once through `generate`
(`lean_decode=False`), in alternating order; the script checks that both return bit-identical
rollouts (tokens, log-probs, entropies) and prints the median wall and CPU time of each and their ratio.

    python benchmarks/lean_decode.py                        # 4 rounds, 2 threads
    python benchmarks/lean_decode.py --threads 1 --rounds 6 --decode-phase 0
"""

from __future__ import annotations

import argparse
import dataclasses
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
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=320)
    parser.add_argument("--decode-phase", type=int, default=64)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = load_policy(SHIPPED_MODEL, dtype="float32", device="cpu")
    problems = generate_problems(args.prompts * args.rounds, 0, "train", num_numbers=3, max_number=15, max_target=100)
    examples = problems_to_examples(problems)
    rows = args.prompts * args.samples
    wall: dict[bool, list[float]] = {True: [], False: []}
    cpu: dict[bool, list[float]] = {True: [], False: []}
    same = True
    for r in range(args.rounds):
        prompts = [ex.prompt for ex in examples[r * args.prompts : (r + 1) * args.prompts] for _ in range(args.samples)]
        params = SamplingParams(args.max_new_tokens, row_seeds=list(range(r * rows, (r + 1) * rows)))
        outputs = {}
        for lean in (True, False) if r % 2 == 0 else (False, True):  # alternate which goes first
            backend = HFGenerationBackend(model, tokenizer, batch_size=rows, decode_phase=args.decode_phase)
            backend.lean_decode = lean
            start, cpu0 = time.perf_counter(), time.process_time()
            outputs[lean] = backend.generate(prompts, params)
            wall[lean].append(time.perf_counter() - start)
            cpu[lean].append(time.process_time() - cpu0)
        for field in dataclasses.fields(outputs[True]):
            a, b = getattr(outputs[True], field.name), getattr(outputs[False], field.name)
            same &= (a is None and b is None) or torch.equal(a, b)
        lengths = outputs[True].response_lengths.float()
        print(
            f"round {r}: response length mean {lengths.mean():.0f}, max {lengths.max():.0f}; "
            f"lean {wall[True][-1]:.2f} s ({cpu[True][-1]:.2f} cpu-s), generate {wall[False][-1]:.2f} s "
            f"({cpu[False][-1]:.2f} cpu-s)"
        )
    print(
        f"{rows} rows per batch, up to {args.max_new_tokens} tokens, decode phase {args.decode_phase}, "
        f"{args.threads} threads, load average {os.getloadavg()[0]:.2f}; bit-identical rollouts: {same}"
    )
    for lean, label in ((False, "generate"), (True, "lean loop")):
        print(f"  {label:9s} median {statistics.median(wall[lean]):5.2f} s, {statistics.median(cpu[lean]):5.2f} cpu-s")
    ratios = [a / b for a, b in zip(cpu[True], cpu[False], strict=True)]
    per_round = ", ".join(f"{x:.2f}" for x in ratios)
    print(f"  lean / generate CPU time per round: {per_round} (median {statistics.median(ratios):.2f}x)")


if __name__ == "__main__":
    main()
