"""Tokens/s of one full RL step (rollout, reward, log-probs, update) on a tiny model on CPU: forkrl vs TRL.

Both frameworks train the same tiny random Qwen3 model (built by `save_tiny_model_dir`, ASCII
tokenizer) on the same prompts (rendered with the paper template) with the same cheap
deterministic reward (the share of vowels in the completion, so every group has varied rewards),
and keep the top 20% highest-entropy tokens per micro-batch (forkrl `selection.*` defaults; TRL
`top_entropy_quantile=0.2`). One step is: generate `prompts x group` responses in one batch of
up to `--max-new-tokens` tokens, score them, compute advantages, then one optimizer step over all
of them in micro-batches of `--micro-batch` sequences (fully on-policy, so neither framework needs
a separate old-policy log-prob pass). forkrl runs without dynamic sampling, so both train on the
same number of sequences. Gradient checkpointing is off in both (`--gradient-checkpointing` turns
it on in both; TRL's own default is on, which costs it 10-15% of a step here).

    tokens/s = generated response tokens (sum of response lengths, EOS included) / step wall time
    decode tok/s = the same tokens / the generation phase's wall time (and per CPU-second of it)

Reasoning length: `--min-new-tokens max` masks EOS until `--max-new-tokens`, so every response is
exactly that long (forkrl `SamplingParams.min_new_tokens`, TRL `generation_kwargs={"min_new_tokens"}`,
both HF's `MinNewTokensLengthLogitsProcessor` rule); several `--max-new-tokens` values are run as
separate settings, each with its own alternating rounds, and summed up in one table at the end,
which also splits each step's CPU time into generation and the rest (reward, log-probs, update).

Each framework runs in its own subprocess with the same `torch.set_num_threads(--threads)` and
`OMP_NUM_THREADS`; `--warmup` steps are run and dropped, then the median of `--repeats` steps is
reported. The forkrl phases come from its `metrics.jsonl` (`generate_s`, `reward_s`,
`old_logprobs_s`, `update_s`, `step_s`); TRL's are measured by wrapping `GRPOTrainer._generate`,
`_calculate_rewards` and `_generate_and_score_completions` (update = step - all of rollout).
A TRL step is timed from `on_step_begin` to the `on_log` of that step, so that, like forkrl's
`step_s`, it includes computing and logging the step's metrics.

The machine may be shared: each step also reports its process CPU time (`cpu-s`, all threads),
and `tok/cpu-s` is the figure to compare when the load average exceeds the core count (then
wall times of multi-threaded runs swing by 2-10x). `--rounds N` alternates the frameworks N times
and pools their measured steps, so both see the same drift in load.

    python benchmarks/train_step.py                  # 8 prompts x 8 responses, <= 64 tokens
    python benchmarks/train_step.py --repeats 5 --threads 1
    # responses of exactly 64 / 256 / 1024 / 2048 tokens, 4 prompts x 8, 1 thread:
    python benchmarks/train_step.py --prompts 4 --max-new-tokens 64 256 1024 2048 --min-new-tokens max \
        --threads 1 --warmup 1 --repeats 2 --rounds 2
    pip install trl accelerate                       # to add the TRL comparison
    # with vLLM (.venv-vllm: make test-vllm, then pip install trl): forkrl and TRL on both samplers
    .venv-vllm/bin/python benchmarks/train_step.py --backend vllm --prompts 32 --max-new-tokens 1024 \
        --min-new-tokens max --threads 1
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

FRAMEWORKS = ("forkrl", "trl", "forkrl-generate", "forkrl-vllm", "trl-vllm")
"""`forkrl-generate`: forkrl decoding through `model.generate` (`HFGenerationBackend(lean_decode=False)`,
the path before the lean decode loop), for before/after figures in one run. `forkrl-vllm`: forkrl
with `rollout.backend=vllm` (an in-process engine; needs vllm, e.g. .venv-vllm). `trl-vllm`: TRL's
`GRPOTrainer` with `use_vllm=True, vllm_mode="colocate"`."""
KV_CACHE_BYTES = 2 * 2**30
"""KV cache of the vLLM engines (32 prompts x 8 x 1,024 tokens of the default model take ~0.55 GB)."""
FORKRL_PHASES = ("generate_s", "reward_s", "old_logprobs_s", "update_s")

# Written into the work directory and imported by both frameworks (forkrl through
# `reward.function=benchreward:forkrl_reward`, TRL as a `reward_funcs` entry).
REWARD_MODULE = '''"""Benchmark reward: share of vowels in the completion (cheap, deterministic, varied)."""

completion_tokens = []
"""TRL: response tokens (EOS included) of each reward call, i.e. of each generation batch."""


def vowel_fraction(text):
    return sum(c in "aeiou" for c in text) / len(text) if text else 0.0


def forkrl_reward(completion, example):
    return vowel_fraction(completion)


def trl_reward(completions, completion_ids, **kwargs):
    completion_tokens.append(sum(len(ids) for ids in completion_ids))
    return [vowel_fraction(c) for c in completions]
'''


def _questions(num_prompts: int) -> list[dict]:
    return [{"question": f"what is {i} plus {i + 1}?", "answer": str(2 * i + 1)} for i in range(num_prompts)]


def _prepare(args: argparse.Namespace, work: Path) -> None:
    """Tiny model dir, prompts jsonl and reward module under `work`."""
    from forkrl.models.tiny import save_tiny_model_dir

    save_tiny_model_dir(
        work / "model",
        seed=0,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        intermediate_size=4 * args.hidden,
        # Room for prompt + response (RoPE does not depend on it, so the weights are the same).
        max_position_embeddings=max(2048, max(args.max_new_tokens) + 256),
    )
    rows = _questions(args.prompts)
    (work / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (work / "benchreward.py").write_text(REWARD_MODULE)


# ---------------------------------------------------------------------------------------- workers


def _run_forkrl(args: argparse.Namespace, work: Path) -> dict:
    from forkrl.config import load_config
    from forkrl.train.trainer import Trainer

    steps = args.warmup + args.repeats
    run_dir = Path(tempfile.mkdtemp(prefix="forkrl_run_", dir=work))  # fresh per round
    overrides = {
        "model.name": str(work / "model"),
        "model.gradient_checkpointing": str(args.gradient_checkpointing).lower(),
        "data.train_files": f"[{work / 'prompts.jsonl'}]",
        "output_dir": str(run_dir),
        "seed": 0,
        "reward.function": "benchreward:forkrl_reward",
        "reward.overlong_shaping": "false",  # TRL has no overlong shaping
        "rollout.prompts_per_step": args.prompts,
        "rollout.group_size": args.group,
        "rollout.max_new_tokens": args.max_new_tokens,
        "rollout.temperature": 1.0,
        "rollout.generation_batch_size": args.prompts * args.group,  # one generate call, like TRL
        "rollout.dynamic_sampling": "false",
        "rollout.max_sampling_rounds": 1,
        "selection.strategy": "top",
        "selection.ratio": 0.2,
        "selection.scope": "microbatch",  # TRL's entropy mask is per micro-batch too
        "optim.lr": 1e-6,
        "optim.mini_batch_size": args.prompts,  # one optimizer step per batch
        "optim.micro_batch_size": args.micro_batch,
        "trainer.total_steps": steps,
        "trainer.save_every": 0,
        "trainer.tensorboard": "false",
        "trainer.device": "cpu",
    }
    if args.worker == "forkrl-vllm":
        overrides["rollout.backend"] = "vllm"
        overrides["rollout.backend_kwargs.kv_cache_memory_bytes"] = KV_CACHE_BYTES
    cfg = load_config(None, [f"{k}={v}" for k, v in overrides.items()])
    trainer = Trainer(cfg)
    threads = torch.get_num_threads()
    # The logger is called once at the end of every step: CPU time between calls is the step's.
    cpu_marks = [time.process_time()]
    generation_cpu = [0.0]  # CPU time in the backend since the last step ended
    generation_cpu_per_step: list[float] = []
    log = trainer.logger.log
    generate = trainer.backend.generate

    def timed_generate(prompts, params):
        # The trainer has no min_new_tokens setting: the benchmark adds it to the trainer's params.
        params = dataclasses.replace(params, min_new_tokens=min(args.min_new_tokens, params.max_new_tokens))
        cpu0 = time.process_time()
        try:
            return generate(prompts, params)
        finally:
            generation_cpu[0] += time.process_time() - cpu0

    def log_and_mark(step, metrics):
        log(step, metrics)
        cpu_marks.append(time.process_time())
        generation_cpu_per_step.append(generation_cpu[0])
        generation_cpu[0] = 0.0

    trainer.backend.generate = timed_generate  # an instance attribute shadows the method
    if args.worker != "forkrl-vllm":
        trainer.backend.lean_decode = args.worker != "forkrl-generate"

    trainer.logger.log = log_and_mark
    trainer.train()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    out = []
    for i, r in enumerate(records):
        tokens = r["tokens_per_s"] * r["step_s"]
        out.append(
            {
                "step_s": r["step_s"],
                "cpu_s": cpu_marks[i + 1] - cpu_marks[i],
                "tokens": tokens,
                "sequences": r.get("groups_trained", 0.0) * args.group,
                "phases": {k: r.get(k, 0.0) for k in FORKRL_PHASES},
                "generate_cpu_s": generation_cpu_per_step[i],
                "threads": threads,
            }
        )
    return {"steps": out}


def _run_trl(args: argparse.Namespace, work: Path) -> dict:
    import benchreward
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from forkrl.tasks.data import render_prompt

    n_seq = args.prompts * args.group
    if n_seq % args.micro_batch:
        raise SystemExit(f"--micro-batch {args.micro_batch} must divide prompts x group = {n_seq}")
    steps = args.warmup + args.repeats
    dataset = Dataset.from_list([{"prompt": render_prompt(r["question"], "paper")} for r in _questions(args.prompts)])
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_run_", dir=work),
        seed=0,
        num_generations=args.group,
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=n_seq // args.micro_batch,  # one optimizer step covers all n_seq
        steps_per_generation=n_seq // args.micro_batch,  # ... and generates them all at once
        num_iterations=1,
        max_completion_length=args.max_new_tokens,
        # HF's name for the EOS mask, or vLLM's (TRL passes generation_kwargs to the sampler as they are).
        generation_kwargs=(
            {"min_tokens" if args.worker == "trl-vllm" else "min_new_tokens": args.min_new_tokens}
            if args.min_new_tokens
            else None
        ),
        temperature=1.0,
        top_entropy_quantile=0.2,
        beta=0.0,
        loss_type="dapo",
        epsilon=0.2,
        epsilon_high=0.28,
        learning_rate=1e-6,
        max_grad_norm=1.0,
        gradient_checkpointing=args.gradient_checkpointing,  # TRL's default is True, forkrl's False
        report_to=[],
        bf16=False,
        use_cpu=True,
        logging_steps=1,
        max_steps=steps,
        save_strategy="no",
        dataloader_num_workers=0,
        **_trl_vllm_options(args),
    )
    assert config.generation_batch_size == n_seq, config.generation_batch_size
    trainer = GRPOTrainer(
        model=str(work / "model"), reward_funcs=[benchreward.trl_reward], args=config, train_dataset=dataset
    )

    phase_totals = {"generate_s": 0.0, "generate_cpu_s": 0.0, "reward_s": 0.0, "rollout_s": 0.0, "generations": 0}

    def timed(method, key):
        def wrapper(*a, **kw):
            t0, cpu0 = time.perf_counter(), time.process_time()
            try:
                return method(*a, **kw)
            finally:
                phase_totals[key] += time.perf_counter() - t0
                if key == "generate_s":
                    phase_totals["generate_cpu_s"] += time.process_time() - cpu0
                if key == "rollout_s":
                    phase_totals["generations"] += 1

        return wrapper

    # Instance attributes shadow the class methods the trainer calls through `self`.
    trainer._generate = timed(trainer._generate, "generate_s")
    trainer._calculate_rewards = timed(trainer._calculate_rewards, "reward_s")
    trainer._generate_and_score_completions = timed(trainer._generate_and_score_completions, "rollout_s")

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.steps: list[dict] = []
            self.t0 = None

        def on_step_begin(self, *_, **__):
            torch.set_num_threads(args.threads)  # no-op unless something changed it
            self.threads = torch.get_num_threads()
            for key in phase_totals:
                phase_totals[key] = 0
            self.tokens_before = len(benchreward.completion_tokens)
            self.cpu0 = time.process_time()
            self.t0 = time.perf_counter()

        def on_log(self, *_, **__):
            if self.t0 is None:  # the end-of-training summary
                return
            step_s = time.perf_counter() - self.t0
            cpu_s = time.process_time() - self.cpu0
            self.t0 = None
            calls = benchreward.completion_tokens[self.tokens_before :]
            generate, reward, rollout = (phase_totals[k] for k in ("generate_s", "reward_s", "rollout_s"))
            self.steps.append(
                {
                    "step_s": step_s,
                    "cpu_s": cpu_s,
                    "tokens": float(sum(calls)),
                    "sequences": float(n_seq * phase_totals["generations"]),
                    "generations": phase_totals["generations"],
                    "phases": {
                        "generate_s": generate,
                        "reward_s": reward,
                        "other_rollout_s": rollout - generate - reward,
                        "update_s": step_s - rollout,
                    },
                    "generate_cpu_s": phase_totals["generate_cpu_s"],
                    "threads": self.threads,
                }
            )

    timer = StepTimer()
    trainer.add_callback(timer)
    trainer.train()
    return {"steps": timer.steps, "version": trl.__version__}


def _trl_vllm_options(args: argparse.Namespace) -> dict:
    """TRL's own vLLM path (colocate: an engine in the trainer's process) for `trl-vllm`."""
    if args.worker != "trl-vllm":
        return {"use_vllm": False}
    # Colocate mode starts vLLM with the torchrun-style external launcher: it reads these.
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", "29599")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    return {
        "use_vllm": True,
        "vllm_mode": "colocate",
        "vllm_enable_sleep_mode": False,  # CUDA only
        "vllm_gpu_memory_utilization": 0.1,
    }


def _worker(args: argparse.Namespace) -> None:
    work = Path(args.work)
    sys.path.insert(0, str(work))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    # A worker runs one setting: one response length, `--min-new-tokens` already resolved to an int.
    args.max_new_tokens, args.min_new_tokens = args.max_new_tokens[0], int(args.min_new_tokens)
    result = _run_trl(args, work) if args.worker.startswith("trl") else _run_forkrl(args, work)
    print("RESULT " + json.dumps(result))


# ---------------------------------------------------------------------------------------- driver


def _min_new_tokens(args: argparse.Namespace, max_new_tokens: int) -> int:
    return max_new_tokens if args.min_new_tokens == "max" else min(int(args.min_new_tokens), max_new_tokens)


def _spawn(args: argparse.Namespace, framework: str, work: Path, max_new_tokens: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", framework, "--work", str(work)]
    for key in ("prompts", "group", "micro_batch", "warmup", "repeats", "threads"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    cmd += ["--max-new-tokens", str(max_new_tokens), "--min-new-tokens", str(_min_new_tokens(args, max_new_tokens))]
    if args.gradient_checkpointing:
        cmd.append("--gradient-checkpointing")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    env["TOKENIZERS_PARALLELISM"] = "false"
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        tail = "\n".join((out.stderr or out.stdout).strip().splitlines()[-15:])
        return {"error": f"exit code {out.returncode}\n{tail}"}
    result = json.loads(lines[-1][len("RESULT ") :])
    result.update(load_before=load_before, load_after=os.getloadavg()[0], wall_s=wall)
    return result


def _summary(measured: list[dict]) -> dict:
    """Medians over the measured steps (warmup already dropped), pooled over rounds."""
    return {
        "steps": len(measured),
        "step_s": statistics.median(s["step_s"] for s in measured),
        "cpu_s": statistics.median(s["cpu_s"] for s in measured),
        "tokens": statistics.median(s["tokens"] for s in measured),
        "tokens_per_s": statistics.median(s["tokens"] / s["step_s"] for s in measured),
        "tokens_per_cpu_s": statistics.median(s["tokens"] / s["cpu_s"] for s in measured),
        "decode_tokens_per_s": statistics.median(s["tokens"] / s["phases"]["generate_s"] for s in measured),
        "decode_tokens_per_cpu_s": statistics.median(s["tokens"] / s["generate_cpu_s"] for s in measured),
        "generate_cpu_s": statistics.median(s["generate_cpu_s"] for s in measured),
        "rest_cpu_s": statistics.median(s["cpu_s"] - s["generate_cpu_s"] for s in measured),
        "phases": {k: statistics.median(s["phases"][k] for s in measured) for k in measured[0]["phases"]},
    }


def _print_steps(name: str, result: dict, warmup: int) -> None:
    print(
        f"\n{name}: load avg {result['load_before']:.2f} -> {result['load_after']:.2f}, "
        f"process wall {result['wall_s']:.1f} s" + (f", version {result['version']}" if "version" in result else "")
    )
    for i, s in enumerate(result["steps"]):
        tag = "warmup" if i < warmup else "step"
        phases = "  ".join(f"{k.removesuffix('_s')} {v:5.2f}" for k, v in s["phases"].items())
        extra = f"  gens {s['generations']}" if "generations" in s else ""
        print(
            f"  {tag:>6} {i + 1}: {s['step_s']:6.2f} s ({s['cpu_s']:6.2f} cpu-s)  {s['tokens']:5.0f} tok"
            f"  {s['tokens'] / s['step_s']:6.1f} tok/s  seqs {s['sequences']:.0f}  threads {s['threads']}{extra}"
            f"  | {phases}  (generate {s['generate_cpu_s']:.2f} cpu-s)"
        )


def _run_setting(args: argparse.Namespace, frameworks: list[str], work: Path, max_new_tokens: int) -> dict:
    """Alternating rounds of every framework at one response length; their summaries by name."""
    min_new = _min_new_tokens(args, max_new_tokens)
    print(f"\n=== {args.prompts} x {args.group} responses, {min_new}-{max_new_tokens} new tokens ===")
    measured: dict[str, list[dict]] = {name: [] for name in frameworks}
    # Alternate the frameworks round by round, so that both see the same drift in machine load.
    for round_index in range(args.rounds):
        for name in frameworks:
            result = _spawn(args, name, work, max_new_tokens)
            label = name if args.rounds == 1 else f"{name} (round {round_index + 1})"
            if "error" in result:
                print(f"\n{label}: failed: {result['error']}")
                continue
            _print_steps(label, result, args.warmup)
            measured[name] += result["steps"][args.warmup :]

    summaries = {name: _summary(steps) for name, steps in measured.items() if steps}
    if not summaries:
        return summaries
    print(
        f"\n{'framework':>15} | {'steps':>5} | {'step s':>6} | {'cpu-s':>6} | {'tokens':>6} | {'tokens/s':>8} "
        f"| {'tok/cpu-s':>9} | {'decode tok/s':>12} | {'decode tok/cpu-s':>16} | phases (median s)"
    )
    for name, s in summaries.items():
        phases = "  ".join(f"{k.removesuffix('_s')} {v:.2f}" for k, v in s["phases"].items())
        print(
            f"{name:>15} | {s['steps']:5d} | {s['step_s']:6.2f} | {s['cpu_s']:6.2f} | {s['tokens']:6.0f} "
            f"| {s['tokens_per_s']:8.1f} | {s['tokens_per_cpu_s']:9.1f} | {s['decode_tokens_per_s']:12.1f} "
            f"| {s['decode_tokens_per_cpu_s']:16.1f} | {phases}"
        )
    best = _fastest(summaries)
    if best:
        (fk_name, fk), (trl_name, trl) = best
        print(
            f"\nforkrl ({fk_name}) / TRL ({trl_name}), each with its fastest sampler here: tokens/s "
            f"{fk['tokens_per_s'] / trl['tokens_per_s']:.2f}x (goal >= 2x at 1024 tokens), tokens per CPU-second "
            f"{fk['tokens_per_cpu_s'] / trl['tokens_per_cpu_s']:.2f}x, decode tokens per CPU-second "
            f"{fk['decode_tokens_per_cpu_s'] / trl['decode_tokens_per_cpu_s']:.2f}x"
        )
    if "forkrl" in summaries and "forkrl-generate" in summaries:
        fk, gen = summaries["forkrl"], summaries["forkrl-generate"]
        print(
            f"forkrl lean loop / forkrl via generate: decode tokens per CPU-second "
            f"{fk['decode_tokens_per_cpu_s'] / gen['decode_tokens_per_cpu_s']:.2f}x, "
            f"step tokens per CPU-second {fk['tokens_per_cpu_s'] / gen['tokens_per_cpu_s']:.2f}x"
        )
    return summaries


def _fastest(summaries: dict) -> tuple[tuple[str, dict], tuple[str, dict]] | None:
    """(name, summary) of the fastest forkrl and the fastest TRL variant by step tokens/s, if both ran."""
    fk = [(n, s) for n, s in summaries.items() if n.startswith("forkrl") and n != "forkrl-generate"]
    trl = [(n, s) for n, s in summaries.items() if n.startswith("trl")]
    if not fk or not trl:
        return None
    key = lambda item: item[1]["tokens_per_s"]  # noqa: E731
    return max(fk, key=key), max(trl, key=key)


def _print_table(results: dict[int, dict]) -> None:
    """One line per response length: step and decode tokens/s of every framework, and the ratio of
    the fastest forkrl to the fastest TRL."""
    names = [n for n in FRAMEWORKS if any(n in s for s in results.values())]
    head = " | ".join(f"{n} step / decode tok/s" for n in names)
    print(f"\n| new tokens | {head} | fastest forkrl / fastest TRL (step tok/s) |")
    print("|---" * (len(names) + 2) + "|")
    for length, s in results.items():
        cells = [f"{s[n]['tokens_per_s']:.0f} / {s[n]['decode_tokens_per_s']:.0f}" if n in s else "—" for n in names]
        best = _fastest(s)
        ratio = "—"
        if best:
            (fk_name, fk), (trl_name, trl) = best
            ratio = f"{fk['tokens_per_s'] / trl['tokens_per_s']:.2f}x ({fk_name} / {trl_name})"
        print(f"| {length} | {' | '.join(cells)} | {ratio} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
    parser.add_argument("--group", type=int, default=8, help="responses per prompt (G)")
    parser.add_argument(
        "--max-new-tokens", type=int, nargs="+", default=[64], help="max response length; several: one setting each"
    )
    parser.add_argument(
        "--min-new-tokens",
        default="0",
        help="EOS masked before this many tokens (an int, or `max` for responses of exactly --max-new-tokens)",
    )
    parser.add_argument("--micro-batch", type=int, default=16, help="sequences per forward/backward")
    parser.add_argument("--warmup", type=int, default=1, help="steps run and dropped")
    parser.add_argument("--repeats", type=int, default=3, help="measured steps (median)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--rounds", type=int, default=1, help="alternating runs of each framework (pooled)")
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute activations in backward in both frameworks (TRL's own default; forkrl's is off)",
    )
    parser.add_argument("--hidden", type=int, default=128, help="tiny model hidden size")
    parser.add_argument("--layers", type=int, default=4, help="tiny model layers")
    parser.add_argument("--heads", type=int, default=4, help="attention heads")
    parser.add_argument("--kv-heads", type=int, default=2, help="key/value heads")
    parser.add_argument("--frameworks", nargs="+", default=["forkrl", "trl"], choices=FRAMEWORKS)
    parser.add_argument(
        "--backend",
        choices=("hf", "vllm"),
        default="hf",
        help="vllm: add forkrl-vllm and trl-vllm (TRL's colocate mode) to --frameworks",
    )
    parser.add_argument("--worker", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.min_new_tokens != "max" and not args.min_new_tokens.isdigit():
        parser.error("--min-new-tokens takes an int >= 0 or `max`")
    if args.worker:
        _worker(args)
        return
    if args.backend == "vllm":
        args.frameworks += [f for f in ("forkrl-vllm", "trl-vllm") if f not in args.frameworks]

    print(
        f"torch={torch.__version__} threads={args.threads} model: qwen3 hidden={args.hidden} layers={args.layers} "
        f"| {args.prompts} prompts x {args.group} responses, <= {args.max_new_tokens} new tokens "
        f"(min {args.min_new_tokens}), micro-batch {args.micro_batch}, 1 optimizer step per batch, top 20% entropy "
        f"tokens, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'} "
        f"| warmup {args.warmup}, median of {args.repeats} x {args.rounds} rounds"
    )
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if args.threads > 1 and load + args.threads > cores:
        print(
            f"warning: load average {load:.2f} + {args.threads} threads > {cores} CPUs: multi-threaded steps "
            "stall on descheduled threads and both wall and CPU times swing by several x; use --threads 1 "
            "and compare tok/cpu-s"
        )
    frameworks = list(args.frameworks)
    if importlib.util.find_spec("trl") is None and any(f.startswith("trl") for f in frameworks):
        print("TRL not installed: pip install trl to compare")
        frameworks = [f for f in frameworks if not f.startswith("trl")]
    if importlib.util.find_spec("vllm") is None and any(f.endswith("vllm") for f in frameworks):
        print("vllm not installed (e.g. use .venv-vllm of `make test-vllm`): the vllm variants are left out")
        frameworks = [f for f in frameworks if not f.endswith("vllm")]

    with tempfile.TemporaryDirectory(prefix="forkrl_bench_") as tmp:
        work = Path(tmp)
        _prepare(args, work)
        results = {length: _run_setting(args, frameworks, work, length) for length in args.max_new_tokens}
    if len(results) > 1:
        _print_table(results)
    print(f"load average now: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
