"""What one decode step's attention costs at reasoning length, and whether a half-precision KV cache helps.

At 1,024-token responses the tiny Qwen3 of `benchmarks/train_step.py` spends ~60% of its decode time
in `scaled_dot_product_attention` reading the KV cache (torch profiler, 1 thread). This script times
that call alone, as the model makes it: GQA packed for one query token (`[B, kv_heads, n_rep, d]`
queries, transformers' `pack_gqa`), keys/values as views of capacity-doubling buffers
(`rollout/kv_cache.py`), a `[B, 1, 1, L]` boolean padding mask, one buffer pair per layer so that
the layers' caches together exceed the CPU's caches as in the model. For each context length it
prints the median time per call, the KV bytes read per second, and the same call with the cache
stored in bfloat16 (half the bytes; it would also change the sampled tokens, since keys and values
are rounded).

    python benchmarks/decode_attention.py                     # 1 thread, L = 256 .. 2048
    python benchmarks/decode_attention.py --threads 2 --rows 64
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def time_calls(query, layers, length, mask, calls: int, repeats: int) -> float:
    """Median seconds per call of SDPA over `layers` (one call per layer, cycling)."""
    scale = query.shape[-1] ** -0.5

    def one_pass():
        for keys, values in layers:
            F.scaled_dot_product_attention(
                query, keys[:, :, :length], values[:, :, :length], attn_mask=mask, scale=scale
            )

    one_pass()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            one_pass()
        times.append((time.perf_counter() - start) / (calls * len(layers)))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=32, help="sequences decoded together (B)")
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--n-rep", type=int, default=2, help="query heads per key/value head")
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 540, 1040, 2064])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    B, H, R, D = args.rows, args.kv_heads, args.n_rep, args.head_dim
    print(
        f"torch {torch.__version__}, {args.threads} thread(s): B {B}, kv heads {H} x {R} query heads, d {D}, "
        f"{args.layers} layers; median of {args.repeats} x {args.calls} passes"
    )
    print(f"{'L':>6} | {'fp32 ms/call':>12} | {'fp32 GB/s':>9} | {'bf16 ms/call':>12} | bf16 / fp32")
    for length in args.lengths:
        capacity = 1 << (length - 1).bit_length()
        mask = torch.ones(B, 1, 1, length, dtype=torch.bool)
        mask[: B // 8, :, :, :5] = False  # a few left-padded rows
        result = {}
        for dtype in (torch.float32, torch.bfloat16):
            layers = [
                tuple(torch.randn(B, H, capacity, D, generator=gen).to(dtype) for _ in range(2))
                for _ in range(args.layers)
            ]
            query = torch.randn(B, H, R, D, generator=gen).to(dtype)
            result[dtype] = time_calls(query, layers, length, mask, args.calls, args.repeats)
        fp32, bf16 = result[torch.float32], result[torch.bfloat16]
        gbps = 2 * B * H * length * D * 4 / fp32 / 1e9
        print(f"{length:>6} | {fp32 * 1e3:>12.3f} | {gbps:>9.1f} | {bf16 * 1e3:>12.3f} | {bf16 / fp32:.2f}x")


if __name__ == "__main__":
    main()
