"""Peak memory and time of `analyze entropy` on a synthetic store of 10^6 tokens (target < 2 GB).

The store is written directly with pyarrow in row groups (random data shaped like the paper's:
about half the tokens near-deterministic, a long tail of high entropies, Zipf-distributed token
ids), then `run_entropy` reads it back batch by batch. Peak memory is the kernel's high-water
mark of resident memory (VmHWM), reset through /proc/self/clear_refs just before the analysis
where the kernel allows it, so that it measures the analysis and not the store writing;
`ru_maxrss` (peak over the whole process) is printed too.

    python benchmarks/analysis_memory.py                  # 10^6 tokens
    python benchmarks/analysis_memory.py --tokens 4000000 --vocab 151936
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from forkrl.analysis.entropy import run_entropy
from forkrl.analysis.store import META_FILE, SAMPLE_SCHEMA, SAMPLES_FILE, TOKEN_SCHEMA, TOKENS_FILE


def _proc_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def write_synthetic_store(path: Path, num_tokens: int, vocab: int, mean_length: int, seed: int = 0) -> None:
    """A store of `num_tokens` random tokens in responses of about `mean_length` tokens."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    pieces = pa.array([f" w{i}" for i in range(vocab)], type=pa.string())
    lengths = []
    remaining = num_tokens
    while remaining > 0:
        n = int(min(remaining, max(1, rng.poisson(mean_length))))
        lengths.append(n)
        remaining -= n
    lengths = np.asarray(lengths, dtype=np.int64)
    sample_of_token = np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)
    position = (np.arange(num_tokens) - np.repeat(np.cumsum(lengths) - lengths, lengths)).astype(np.int32)

    chunk = 1 << 18
    with pq.ParquetWriter(path / TOKENS_FILE, TOKEN_SCHEMA, compression="zstd") as writer:
        for start in range(0, num_tokens, chunk):
            n = min(chunk, num_tokens - start)
            low = rng.random(n) < 0.5
            entropy = np.where(low, rng.exponential(2e-3, n), rng.lognormal(-0.7, 1.2, n))
            ids = ((rng.zipf(1.3, n) - 1) % vocab).astype(np.int32)
            batch = {
                "sample_id": sample_of_token[start : start + n],
                "prompt_index": sample_of_token[start : start + n] // 16,
                "position": position[start : start + n],
                "token_id": ids,
                "piece": pieces.take(pa.array(ids)),
                "entropy": np.minimum(entropy, np.log(vocab)).astype(np.float32),
                "logprob": -rng.exponential(0.5, n).astype(np.float32),
            }
            writer.write_table(pa.table(batch, schema=TOKEN_SCHEMA))
    num_samples = len(lengths)
    samples = pa.table(
        {
            "sample_id": np.arange(num_samples, dtype=np.int32),
            "prompt_index": np.arange(num_samples, dtype=np.int32) // 16,
            "prompt": [f"question {i // 16}" for i in range(num_samples)],
            "response": ["(synthetic)"] * num_samples,
            "prompt_ids": [[1, 2, 3]] * num_samples,
            "length": lengths.astype(np.int32),
            "finished": [True] * num_samples,
            "reward": [None] * num_samples,
        },
        schema=SAMPLE_SCHEMA,
    )
    pq.write_table(samples, path / SAMPLES_FILE)
    meta = {"format_version": 1, "source": "synthetic", "model": "synthetic", "temperature": 1.0}
    meta.update(vocab_size=vocab, num_samples=num_samples, num_tokens=num_tokens)
    (path / META_FILE).write_text(json.dumps(meta))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--mean-length", type=int, default=4000, help="mean response length in tokens")
    parser.add_argument("--min-count", type=int, default=100)
    parser.add_argument("--dir", type=str, default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.dir) if args.dir else Path(tmp)
        store, out = root / "store", root / "out"
        t0 = time.perf_counter()
        write_synthetic_store(store, args.tokens, args.vocab, args.mean_length)
        t_write = time.perf_counter() - t0
        size_mb = sum(p.stat().st_size for p in store.iterdir()) / 2**20

        rss_before = _proc_kib("VmRSS")
        reset = _reset_peak()
        t0 = time.perf_counter()
        summary = run_entropy(store, out, min_count=args.min_count)
        t_analysis = time.perf_counter() - t0
        hwm = _proc_kib("VmHWM")
        maxrss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux

        print(f"tokens            {args.tokens:,} in {summary['num_samples']:,} responses, vocab {args.vocab:,}")
        print(f"store on disk     {size_mb:.1f} MiB (written in {t_write:.1f} s)")
        print(f"analysis time     {t_analysis:.1f} s")
        print(f"RSS before        {rss_before / 1024:.0f} MiB" if rss_before else "RSS before        n/a")
        label = "peak RSS (VmHWM)  " if reset else "peak RSS (process)"
        print(f"{label}{(hwm or maxrss_kib) / 1024:.0f} MiB during the analysis (target < 2048 MiB)")
        print(f"ru_maxrss         {maxrss_kib / 1024:.0f} MiB over the whole process")
        print(f"p80 {summary['p80']:.3f}, share below 1e-2 {summary['share_below_0.01']:.2%}")


if __name__ == "__main__":
    main()
