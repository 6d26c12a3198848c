"""Memory per process of a training run under DDP and under FSDP2 (`trainer.strategy`).

Two gloo CPU processes (`torchrun --nproc_per_node 2`) train a Qwen3-shaped model built in code
(default ~32M parameters) for two steps, once per strategy. Each process reports RSS above what it
held before the model was loaded (torch and the libraries): resident after the training steps,
the peak during them, and the peak including the final checkpoint (which gathers the full weights
and Adam state on the main process, in CPU memory). DDP holds weights, gradients and Adam state
whole on every process; FSDP2 holds shards of them, plus the full weights while a rollout is
generated. Workers run with `MALLOC_MMAP_THRESHOLD_=131072` so that buffers FSDP2 frees go back
to the OS and RSS shows what is in use (`--glibc-default` to leave malloc alone). Runs alternate
between the strategies; medians of `--repeats` runs are printed.

    python benchmarks/fsdp_memory.py                       # hidden 512, 8 layers
    python benchmarks/fsdp_memory.py --hidden 768 --layers 12
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch.distributed as dist


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(args) -> None:
    from forkrl.config import load_config
    from forkrl.train.trainer import Trainer

    before = _rss_mib()
    trainer = Trainer(load_config(None, args.overrides))
    record = {}
    save = trainer.save

    def measured_save():
        # The final checkpoint gathers the full weights and Adam state on the main process (CPU
        # memory): reported apart from the training steps.
        record.setdefault("train_peak", _peak_mib() - before)
        record.setdefault("resident", _rss_mib() - before)
        return save()

    trainer.save = measured_save
    trainer.train()
    record["peak_with_save"] = _peak_mib() - before
    rank = dist.get_rank() if dist.is_initialized() else 0
    Path(args.report).with_suffix(f".rank{rank}.json").write_text(json.dumps(record))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--micro", type=int, default=16, help="micro-batch rows (16 = no accumulation)")
    parser.add_argument("--glibc-default", action="store_true", help="leave glibc's malloc thresholds alone")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    from forkrl.models.tiny import save_tiny_model_dir

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = save_tiny_model_dir(
            tmp / "model",
            hidden_size=args.hidden,
            num_layers=args.layers,
            num_heads=8,
            num_kv_heads=4,
            intermediate_size=4 * args.hidden,
            tie_word_embeddings=False,
        )
        data = tmp / "prompts.jsonl"
        data.write_text("".join(json.dumps({"question": f"q{i} abc", "answer": "1"}) + "\n" for i in range(16)))
        n_params = _count_params(model_dir)
        results: dict[str, list[dict[str, float]]] = {"ddp": [], "fsdp2": []}
        for repeat in range(args.repeats):
            for strategy in results:
                out = tmp / f"run_{strategy}_{repeat}"
                overrides = [
                    f"model.name={model_dir}",
                    f"data.train_files=[{data}]",
                    f"output_dir={out}",
                    "reward.function=math",
                    "reward.overlong_shaping=false",
                    "rollout.dynamic_sampling=false",
                    "rollout.prompts_per_step=4",
                    "rollout.group_size=4",
                    "rollout.max_new_tokens=32",
                    "optim.mini_batch_size=4",
                    f"optim.micro_batch_size={args.micro}",
                    "trainer.total_steps=2",
                    "trainer.save_every=0",
                    "trainer.tensorboard=false",
                    "trainer.device=cpu",
                    f"trainer.strategy={strategy}",
                ]
                report = tmp / f"report_{strategy}_{repeat}"
                cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29561"]
                cmd += [__file__, "--worker", f"--report={report}", *overrides]
                env = {**os.environ, "OMP_NUM_THREADS": "1"}
                if not args.glibc_default:
                    # Freed large buffers go back to the OS at once, so RSS shows what is in use
                    # (by default glibc keeps FSDP2's freed all-gather buffers in its heap).
                    env["MALLOC_MMAP_THRESHOLD_"] = "131072"
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if proc.returncode:
                    sys.exit(f"{strategy} run failed:\n{proc.stderr[-3000:]}")
                ranks = [json.loads(report.with_suffix(f".rank{r}.json").read_text()) for r in range(2)]
                results[strategy].append({key: max(r[key] for r in ranks) for key in ranks[0]})
    weights = n_params * 4 / 2**20
    malloc = "glibc default malloc" if args.glibc_default else "MALLOC_MMAP_THRESHOLD_=131072"
    print(f"{n_params / 1e6:.1f}M parameters ({weights:.0f} MiB fp32), 2 gloo processes, 2 steps, CPU, {malloc}")
    print("MiB above the pre-load baseline, max over the 2 processes, median of runs:")
    labels = {
        "resident": "resident after training",
        "train_peak": "peak during training",
        "peak_with_save": "peak with the final checkpoint",
    }
    medians = {s: {k: statistics.median(r[k] for r in runs) for k in labels} for s, runs in results.items()}
    print(f"  {'':32s}{'ddp':>8s}{'fsdp2':>8s}{'ratio':>8s}")
    for key, label in labels.items():
        a, b = medians["ddp"][key], medians["fsdp2"][key]
        print(f"  {label:32s}{a:8.0f}{b:8.0f}{b / a:7.2f}x")


def _count_params(model_dir: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


if __name__ == "__main__":
    main()
