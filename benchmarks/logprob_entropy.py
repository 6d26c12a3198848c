"""Time and peak extra memory of naive vs chunked vs fused token log-prob + entropy.

Each variant runs forward + backward of `(logp * a + H * b).sum()` from hidden states
`[N, H]` and an LM-head weight `[V, H]`, so gradients flow through both outputs:

    naive    logits = hidden @ W.T, then a full log_softmax + entropy under autograd
    chunked  logits = hidden @ W.T, then `token_logprobs_and_entropy` (chunked Function)
    fused    `fused_linear_logprobs_and_entropy` (logits never materialized)

Every (shape, variant) runs in a fresh subprocess so that peak-memory readings do not
see each other's allocator caches. Memory is the peak *extra* over what the inputs
already use: on CPU the kernel's VmHWM after resetting it through /proc/self/clear_refs,
minus VmRSS just before the run; on CUDA `torch.cuda.max_memory_allocated` minus the
allocation before the run. Parameter gradients (`[V, H]` for the weight) count as extra
for every variant alike. Each process times its one full run (after a tiny warm-up
that starts thread pools); `--repeats` rounds interleave the variants, and the table
shows medians over rounds.

    python benchmarks/logprob_entropy.py                 # N=4096, H=1024, V=65536 and 151936
    python benchmarks/logprob_entropy.py --quick         # small shapes, seconds
    python benchmarks/logprob_entropy.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from forkrl.ops.logprobs import (
    default_chunk_rows,
    fused_linear_logprobs_and_entropy,
    naive_logprobs_and_entropy,
    token_logprobs_and_entropy,
)

VARIANTS = ("naive", "chunked", "fused")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Float32-sized [N, V] tensors the naive variant keeps alive at its peak: logits,
# log-softmax, probabilities, their product, and gradients in backward. Measured on CPU
# at about 5; 6 leaves headroom when deciding whether it fits in RAM.
NAIVE_NV_TENSORS = 6


def _read_proc_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _mem_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable not in /proc/meminfo")


def _worker(args: argparse.Namespace) -> dict:
    """Run one variant in this process; return its timings and peak extra memory."""
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    gen = torch.Generator().manual_seed(0)
    n, h, v = args.tokens, args.hidden, args.vocab[0]
    hidden = torch.randn(n, h, generator=gen).to(device, dtype).requires_grad_()
    # Scaled like an LM head so logits are O(1) and entropies are realistic.
    weight = (torch.randn(v, h, generator=gen) * h**-0.5).to(device, dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=gen).to(device)
    coef_logp = torch.randn(n, generator=gen).to(device)
    coef_ent = torch.randn(n, generator=gen).to(device)
    chunk = args.chunk_size

    def step(hidden, weight, targets, coef_logp, coef_ent) -> None:
        hidden.grad, weight.grad = None, None
        if args.variant == "fused":
            logp, ent = fused_linear_logprobs_and_entropy(hidden, weight, targets, chunk_size=chunk)
        else:
            logits = hidden @ weight.t()  # (N, V)
            if args.variant == "naive":
                logp, ent = naive_logprobs_and_entropy(logits, targets)
            else:
                logp, ent = token_logprobs_and_entropy(logits, targets, chunk_size=chunk)
            del logits
        (logp * coef_logp + ent * coef_ent).sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    # Start thread pools and BLAS workspaces on a tiny problem first, so that their one-off
    # allocations do not count as the variant's extra memory.
    tiny = [t[:16].detach().requires_grad_(t.requires_grad) for t in (hidden, weight)]
    step(*tiny, targets[:16] % 16, coef_logp[:16], coef_ent[:16])
    del tiny
    inputs = (hidden, weight, targets, coef_logp, coef_ent)

    # One full run per process: its peak memory is not blurred by allocator caches from
    # earlier runs, and it pays the page faults a real training step pays on CPU too (glibc
    # hands large blocks back to the kernel when they are freed).
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        step(*inputs)
        elapsed = time.perf_counter() - t0
        extra = torch.cuda.max_memory_allocated() - before
    else:
        before = _read_proc_kib("VmRSS") * 1024
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        t0 = time.perf_counter()
        step(*inputs)
        elapsed = time.perf_counter() - t0
        extra = _read_proc_kib("VmHWM") * 1024 - before
    return {"time_s": elapsed, "extra_bytes": extra}


def _run_variant(args: argparse.Namespace, variant: str, vocab: int) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        variant,
        "--tokens",
        str(args.tokens),
        "--hidden",
        str(args.hidden),
        "--vocab",
        str(vocab),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--threads",
        str(args.threads),
    ]
    if args.chunk_size:
        cmd += ["--chunk-size", str(args.chunk_size)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or [f"exit code {out.returncode}"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--tokens", type=int, default=4096, help="N, rows of hidden states")
    parser.add_argument("--hidden", type=int, default=1024, help="H, hidden size")
    parser.add_argument("--vocab", type=int, nargs="+", default=[65536, 151936], help="V values")
    parser.add_argument("--repeats", type=int, default=3, help="runs per variant, interleaved (median)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--chunk-size", type=int, default=None, help="rows per chunk (default: auto)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--quick", action="store_true", help="N=512, H=256, V=8192 smoke run")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        args.variant = args.worker
        print(json.dumps(_worker(args)))
        return
    if args.quick:
        args.tokens, args.hidden, args.vocab = 512, 256, [8192]

    print(
        f"device={args.device} dtype={args.dtype} threads={args.threads} N={args.tokens} "
        f"H={args.hidden} repeats={args.repeats} torch={torch.__version__} "
        f"loadavg={os.getloadavg()[0]:.1f}"
    )
    header = f"{'V':>7} {'variant':>8} {'chunk':>6} {'time s':>8} {'extra MiB':>10}"
    for vocab in args.vocab:
        chunks = {
            "chunked": args.chunk_size or default_chunk_rows(vocab, args.device),
            "fused": args.chunk_size or default_chunk_rows(vocab, args.device, fused=True),
        }
        print(f"\n{header}")
        variants = list(args.variants)
        naive_bytes = NAIVE_NV_TENSORS * args.tokens * vocab * 4
        available = _mem_available_bytes()
        if "naive" in variants and args.device == "cpu" and naive_bytes > 0.85 * available:
            variants.remove("naive")
            reason = f"skipped: needs ~{naive_bytes / 2**30:.1f} GiB, {available / 2**30:.1f} GiB available"
            print(f"{vocab:>7} {'naive':>8} {'-':>6} {reason}")
        # Rounds interleave the variants so that load from other processes on a shared
        # machine hits them alike; each figure is the median over rounds.
        runs: dict[str, list[dict]] = {v: [] for v in variants}
        errors: dict[str, str] = {}
        for _ in range(max(1, args.repeats)):
            for variant in variants:
                if variant not in errors:
                    res = _run_variant(args, variant, vocab)
                    if "error" in res:
                        errors[variant] = res["error"]
                    else:
                        runs[variant].append(res)
        results = {}
        for variant in variants:
            if variant in errors:
                print(f"{vocab:>7} {variant:>8} {'-':>6} failed: {errors[variant]}")
                continue
            results[variant] = {key: statistics.median(r[key] for r in runs[variant]) for key in runs[variant][0]}
            print(
                f"{vocab:>7} {variant:>8} {chunks.get(variant, '-'):>6} {results[variant]['time_s']:8.2f} "
                f"{results[variant]['extra_bytes'] / 2**20:10.0f}",
                flush=True,
            )
        if "naive" in results:
            base = results["naive"]
            for variant in ("chunked", "fused"):
                if variant in results:
                    mem_ratio = results[variant]["extra_bytes"] / base["extra_bytes"]
                    time_ratio = results[variant]["time_s"] / base["time_s"]
                    print(f"{vocab:>7} {variant}/naive: extra mem {mem_ratio:.3f}x, time {time_ratio:.2f}x")
    # Timings on a shared machine are only as good as its idleness; say how busy it was.
    print(f"\nloadavg at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
