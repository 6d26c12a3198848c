"""The one GPU check: tests/gpu, then three figures, written to one JSON file, inside 8 minutes on an H200.

    (tests)          `pytest tests/gpu`: pass/fail counts and the failures' messages
    (a) logprob_entropy  fused vs naive log-prob + entropy, forward + backward, N = 16,384 tokens,
                     H = 4,096, V = 151,936, bf16 inputs: median time over `--repeats` steps after a
                     warm-up step (CUDA events) and peak memory above the inputs
                     (`torch.cuda.max_memory_allocated`, the [V, H] weight gradient included, as in
                     benchmarks/logprob_entropy.py)
    (b) forkrl_step  one full RL step of a randomly initialised Qwen3-0.6B-shaped model (hidden 1024,
                     28 layers, 16 heads / 8 KV heads, head_dim 128, intermediate 3072, V = 151,936),
                     16 prompts x 8 responses x exactly 1,024 new tokens (EOS masked), `model.dtype=auto`
                     (float32 weights, bf16 autocast), 2 optimizer steps per batch (so the old-policy
                     log-prob pass runs), top-20% entropy tokens: tokens/s of the step and of each
                     phase (generate, old log-probs, update; `metrics.jsonl`), peak GPU memory
    (c) trl_step     the same step with TRL `GRPOTrainer` (`top_entropy_quantile=0.2`; same model file,
                     batch, lengths, reward and optimizer steps, bf16 autocast), and forkrl/TRL tokens/s

Tokens are generated response tokens (16 x 8 x 1,024 = 131,072); every phase's tokens/s divides the
same count by that phase's seconds. Each figure is from the first step of a fresh process, so it
includes one-off CUDA warm-up (cuBLAS handles, allocator growth) in both frameworks alike.

(b) and (c) run benchmarks/train_step.py's workers (`_run_forkrl`, `_run_trl`; same reward, prompts,
selection and phase timing) with three settings changed from outside, as train_step.py takes no
device: the forkrl config gains `trainer.device`, `model.dtype=auto` and the mini-batch size; TRL's
`GRPOConfig` gains `use_cpu`/`bf16` and the matching gradient accumulation; forkrl's final checkpoint
is not written (7 GB of weights and Adam state that no figure needs).

Every part runs in its own subprocess (a fresh CUDA context, so memory peaks do not mix; a crash or
a hang is reported, not fatal), with a timeout so the whole check ends within `HARD_LIMIT_S`; a part
whose estimate would take the total past `BUDGET_S` is skipped with the reason.

    benchmarks/gpu_check.sh                      # the GPU machine's python3, PYTHONPATH=src
    GPU_CHECK_OUT=/some/dir benchmarks/gpu_check.sh
    benchmarks/gpu_check.sh --small              # tiny shapes on any device (CPU: about a minute)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # train_step.py, whose workers (b) and (c) reuse

BUDGET_S = 450.0
"""7.5 minutes: a part is skipped when the time so far plus its estimate would pass this."""
HARD_LIMIT_S = 470.0
"""Every subprocess is killed by this total, so the check (with Python start-up) ends inside 8 minutes."""
TESTS_LIMIT_S = 240.0
"""tests/gpu should take 1-2 minutes; a hang must not eat the figures' time."""
ESTIMATE_S = {"logprob_entropy": 60.0, "forkrl_step": 150.0, "trl_step": 200.0}
"""Guesses for one H200 before anything has run; (c)'s is refined from (b)'s wall time."""


@dataclasses.dataclass
class Shapes:
    """Every size the check uses; `FULL` is the issue's, `SMALL` a smoke run for any machine."""

    tokens: int
    """(a) N, rows of hidden states."""
    hidden_lp: int
    """(a) H of the log-prob op."""
    vocab: int
    """V of (a) and of the model of (b)/(c)."""
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    prompts: int
    group: int
    new_tokens: int
    """Every response is exactly this long (EOS masked until then)."""
    micro_batch: int
    mini_batches: int
    """Optimizer steps per batch; > 1 makes both frameworks compute old-policy log-probs."""


FULL = Shapes(
    tokens=16_384, hidden_lp=4_096, vocab=151_936,
    hidden=1_024, layers=28, heads=16, kv_heads=8, head_dim=128, intermediate=3_072,  # Qwen3-0.6B
    prompts=16, group=8, new_tokens=1_024, micro_batch=16, mini_batches=2,
)  # fmt: skip
SMALL = Shapes(
    tokens=512, hidden_lp=256, vocab=4_096,
    hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128,
    prompts=2, group=4, new_tokens=16, micro_batch=4, mini_batches=2,
)  # fmt: skip


# ---------------------------------------------------------------------------------------- workers


def _peak_memory(device: str) -> dict:
    import torch

    if device == "cuda":
        return {
            "peak_allocated_mib": torch.cuda.max_memory_allocated() / 2**20,
            "peak_reserved_mib": torch.cuda.max_memory_reserved() / 2**20,
        }
    import resource

    return {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _logprob_worker(shapes: Shapes, device: str, repeats: int) -> dict:
    """(a): each variant on the same bf16 inputs, warm-up, one step for memory, `repeats` timed steps."""
    import torch

    from forkrl.ops.logprobs import default_chunk_rows, fused_linear_logprobs_and_entropy, naive_logprobs_and_entropy

    n, h, v = shapes.tokens, shapes.hidden_lp, shapes.vocab
    dtype = torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, h, generator=gen, device=device, dtype=dtype).requires_grad_()
    # Scaled like an LM head so logits are O(1) and entropies realistic.
    weight = torch.randn(v, h, generator=gen, device=device, dtype=dtype).mul_(h**-0.5).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=gen, device=device)
    coef_logp = torch.randn(n, generator=gen, device=device)
    coef_ent = torch.randn(n, generator=gen, device=device)

    def step(variant: str) -> None:
        """Forward + backward of (a · log p + b · H).sum(), as benchmarks/logprob_entropy.py runs it."""
        hidden.grad = weight.grad = None
        if variant == "fused":
            logp, ent = fused_linear_logprobs_and_entropy(hidden, weight, targets)
        else:
            logp, ent = naive_logprobs_and_entropy(hidden @ weight.t(), targets)  # (N, V) logits
        (logp * coef_logp + ent * coef_ent).sum().backward()

    def timed(variant: str) -> float:
        if device != "cuda":
            t0 = time.perf_counter()
            step(variant)
            return time.perf_counter() - t0
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(variant)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000

    out = {
        "shape": {"tokens": n, "hidden": h, "vocab": v, "dtype": "bfloat16"},
        "fused_chunk_rows": default_chunk_rows(v, device, fused=True),
    }
    for variant in ("fused", "naive"):
        try:
            timed(variant)  # warm-up: kernels chosen, allocator grown
            hidden.grad = weight.grad = None
            extra = None
            if device == "cuda":
                torch.cuda.synchronize()
                before = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                timed(variant)
                extra = (torch.cuda.max_memory_allocated() - before) / 2**20
            times = [timed(variant) for _ in range(repeats)]
        except torch.OutOfMemoryError as err:
            out[variant] = {"error": f"out of memory: {str(err).splitlines()[0]}"}
            hidden.grad = weight.grad = None
            torch.cuda.empty_cache()
            continue
        out[variant] = {"median_s": statistics.median(times), "times_s": times, "extra_mib": extra}
    fused, naive = out.get("fused", {}), out.get("naive", {})
    if "median_s" in fused and "median_s" in naive:
        ratio = out["fused_over_naive"] = {"time": fused["median_s"] / naive["median_s"]}
        if fused["extra_mib"] is not None:
            ratio["extra_memory"] = fused["extra_mib"] / naive["extra_mib"]
            out["goal_met"] = ratio["extra_memory"] <= 1 / 8 and ratio["time"] <= 1.1
    out["goal"] = "fused extra memory <= 1/8 of naive's at <= 1.1x its time"
    if device != "cuda":
        out["note"] = "no CUDA: times by perf_counter; memory unmeasured (logprob_entropy.py measures RSS)"
    return out


def _prepare_work(work: Path, shapes: Shapes, device: str) -> None:
    """The random Qwen3 model directory, prompts and reward module of (b) and (c), once per check."""
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    import train_step
    from forkrl.models.tiny import DEFAULT_VOCAB, SPECIAL_TOKENS, build_tiny_tokenizer

    model_dir = work / "model"
    if not (model_dir / "config.json").is_file():
        # A single-character tokenizer as large as Qwen3's vocabulary: ASCII first (so prompts encode
        # as text), then as many further code points, skipping the surrogates, which are not text.
        extra = shapes.vocab - len(SPECIAL_TOKENS) - len(DEFAULT_VOCAB)
        code_points = (c for c in range(0x100, 0x110000) if not 0xD800 <= c <= 0xDFFF)
        tokenizer = build_tiny_tokenizer([*DEFAULT_VOCAB, *(chr(next(code_points)) for _ in range(extra))])
        assert len(tokenizer) == shapes.vocab, len(tokenizer)
        eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        config = Qwen3Config(
            vocab_size=shapes.vocab,
            hidden_size=shapes.hidden,
            num_hidden_layers=shapes.layers,
            num_attention_heads=shapes.heads,
            num_key_value_heads=shapes.kv_heads,
            head_dim=shapes.head_dim,
            intermediate_size=shapes.intermediate,
            max_position_embeddings=2048,
            tie_word_embeddings=True,  # as Qwen3-0.6B
            bos_token_id=eos,
            eos_token_id=eos,
            pad_token_id=pad,
        )
        torch.manual_seed(0)
        with torch.device(device):  # the random init runs where the model will (fast on a GPU)
            model = Qwen3ForCausalLM(config)
        model.generation_config = GenerationConfig(bos_token_id=eos, eos_token_id=eos, pad_token_id=pad)
        model.to("cpu").save_pretrained(model_dir)  # float32, as forkrl's `auto` trains it
        tokenizer.save_pretrained(model_dir)
        del model
    rows = train_step._questions(shapes.prompts)
    (work / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (work / "benchreward.py").write_text(train_step.REWARD_MODULE)


def _step_args(shapes: Shapes, framework: str, work: Path) -> argparse.Namespace:
    """The namespace train_step.py's workers read: one setting, one measured step, no warm-up step."""
    import torch

    return argparse.Namespace(
        worker=framework,
        work=str(work),
        prompts=shapes.prompts,
        group=shapes.group,
        max_new_tokens=shapes.new_tokens,
        min_new_tokens=shapes.new_tokens,
        micro_batch=shapes.micro_batch,
        warmup=0,
        repeats=1,
        threads=torch.get_num_threads(),  # TRL's step timer resets it to this
        gradient_checkpointing=False,
    )


@contextlib.contextmanager
def _replaced(owner, name: str, value):
    """`owner.name = value` for the duration (train_step.py's workers look these up when called)."""
    old = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, old)


def _per_second(tokens: float, phases: dict, step_s: float) -> dict:
    rates = {"step": tokens / step_s}
    for key, seconds in phases.items():
        rates[key.removesuffix("_s")] = tokens / seconds if seconds > 0 else None
    return rates


def _forkrl_worker(shapes: Shapes, device: str, work: Path) -> dict:
    """(b): train_step.py's forkrl worker on `device`, with `model.dtype=auto` and `mini_batches` updates."""
    import forkrl.config
    import train_step
    from forkrl.train.trainer import Trainer

    t0 = time.perf_counter()
    _prepare_work(work, shapes, device)
    prepare_s = time.perf_counter() - t0
    sys.path.insert(0, str(work))  # benchreward, the reward both frameworks import
    load_config = forkrl.config.load_config
    extra = [
        f"trainer.device={device}",
        "model.dtype=auto",
        f"optim.mini_batch_size={shapes.prompts // shapes.mini_batches}",
    ]

    def load_on_device(path, overrides=None, check_files=True):
        return load_config(path, [*(overrides or []), *extra], check_files)

    with _replaced(forkrl.config, "load_config", load_on_device), _replaced(Trainer, "save", lambda self: None):
        result = train_step._run_forkrl(_step_args(shapes, "forkrl", work), work)
    (step,) = result["steps"]
    return {
        "prepare_s": prepare_s,
        "tokens": step["tokens"],
        "step_s": step["step_s"],
        "phases_s": step["phases"],
        "tokens_per_s": _per_second(step["tokens"], step["phases"], step["step_s"]),
        **_peak_memory(device),
    }


def _trl_worker(shapes: Shapes, device: str, work: Path) -> dict:
    """(c): train_step.py's TRL worker on `device` (bf16 autocast on CUDA), `mini_batches` optimizer
    steps per generation; TRL logs one record per optimizer step, summed here into one RL step."""
    try:
        import datasets  # noqa: F401  (train_step's TRL worker builds its prompts as a Dataset)
        import trl
        from trl import GRPOTrainer  # noqa: F401  (imports what the trainer needs, e.g. accelerate)
    except ImportError as err:
        return {"status": "skipped", "reason": f"TRL is not importable: {err}"}
    import train_step

    _prepare_work(work, shapes, device)
    sys.path.insert(0, str(work))
    real_config = trl.GRPOConfig

    def config_on_device(**kwargs):
        kwargs.update(
            use_cpu=device == "cpu",
            bf16=device == "cuda",
            gradient_accumulation_steps=kwargs["gradient_accumulation_steps"] // shapes.mini_batches,
            max_steps=kwargs["max_steps"] * shapes.mini_batches,
        )
        return real_config(**kwargs)

    with _replaced(trl, "GRPOConfig", config_on_device):
        result = train_step._run_trl(_step_args(shapes, "trl", work), work)
    records = result["steps"]
    if len(records) != shapes.mini_batches:
        raise RuntimeError(f"TRL logged {len(records)} optimizer steps, expected {shapes.mini_batches}")
    phases = {k: sum(r["phases"][k] for r in records) for k in records[0]["phases"]}
    tokens, step_s = sum(r["tokens"] for r in records), sum(r["step_s"] for r in records)
    return {
        "version": result["version"],
        "tokens": tokens,
        "step_s": step_s,
        "phases_s": phases,  # other_rollout: old-policy log-probs and advantages
        "tokens_per_s": _per_second(tokens, phases, step_s),
        **_peak_memory(device),
    }


def _worker(args: argparse.Namespace) -> None:
    shapes = SMALL if args.small else FULL
    work = Path(args.work)
    if args.worker == "logprob_entropy":
        result = _logprob_worker(shapes, args.device, args.repeats)
    elif args.worker == "forkrl_step":
        result = _forkrl_worker(shapes, args.device, work)
    else:
        result = _trl_worker(shapes, args.device, work)
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------- driver


def _tail(text: str | bytes | None, lines: int = 25) -> str:
    """The last `lines` non-blank lines; a progress bar redrawn with \r counts by its last state."""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    kept = [line.rsplit("\r", 1)[-1] for line in (text or "").splitlines()]
    return "\n".join([line for line in kept if line.strip()][-lines:])


class Clock:
    """Seconds since the check began (`GPU_CHECK_T0`, set by gpu_check.sh before it installs wheels)."""

    def __init__(self):
        self.t0 = float(os.environ.get("GPU_CHECK_T0") or time.time())

    def elapsed(self) -> float:
        return time.time() - self.t0

    def remaining(self) -> float:
        return HARD_LIMIT_S - self.elapsed()


def _run(cmd: list[str], timeout: float, env: dict | None = None) -> tuple[int | None, str, str]:
    """(exit code, or None when it ran past `timeout`, stdout, stderr). The command runs in a session
    of its own, so a timeout ends it with every process it started (reward workers, dataloaders)."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=max(1.0, timeout))
        return proc.returncode, stdout, stderr
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        return None, stdout, stderr


def run_tests(clock: Clock, device: str) -> dict:
    if device != "cuda":
        return {"status": "skipped", "reason": "torch sees no CUDA device: tests/gpu is not collected"}
    if importlib.util.find_spec("pytest") is None:
        return {"status": "skipped", "reason": "pytest is not importable (put its wheels in benchmarks/.whl)"}
    junit = Path(tempfile.mkdtemp(prefix="gpu_check_")) / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/gpu", f"--junitxml={junit}"]
    code, stdout, stderr = _run(cmd, min(TESTS_LIMIT_S, clock.remaining()))
    if code is None:
        return {"status": "timed out", "tail": _tail(stdout + "\n" + stderr)}
    result: dict = {"status": "passed" if code == 0 else "failed", "exit_code": code}
    if junit.is_file():
        suite = ET.parse(junit).getroot()
        suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
        result.update({k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")})
        result["tests_s"] = {
            f"{case.get('classname', '').removeprefix('tests.gpu.')}::{case.get('name')}": round(
                float(case.get("time", 0)), 2
            )
            for case in suite.iter("testcase")
        }
        result["failed"] = {
            f"{case.get('classname', '')}::{case.get('name')}": (bad.get("message") or "")[:1500]
            for case in suite.iter("testcase")
            for bad in [*case.findall("failure"), *case.findall("error")]
        }
    if code != 0:
        result["tail"] = _tail(stdout, 40)
    return result


def run_part(name: str, clock: Clock, args: argparse.Namespace, work: Path, estimate: float) -> dict:
    if clock.elapsed() + estimate > BUDGET_S:
        return {
            "status": "skipped",
            "reason": f"{clock.elapsed():.0f} s so far + ~{estimate:.0f} s estimated would pass {BUDGET_S:.0f} s",
        }
    cmd = [sys.executable, __file__, "--worker", name, "--work", str(work), "--device", args.device]
    cmd += ["--repeats", str(args.repeats), *(["--small"] if args.small else [])]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    t0 = time.perf_counter()
    code, stdout, stderr = _run(cmd, clock.remaining(), env)
    wall = time.perf_counter() - t0
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if code is None:
        return {"status": "timed out", "wall_s": wall, "tail": _tail(stderr or stdout)}
    if code != 0 or not lines:
        return {"status": "failed", "wall_s": wall, "exit_code": code, "tail": _tail(stderr or stdout)}
    return {"status": "ok", "wall_s": wall, **json.loads(lines[-1][len("RESULT ") :])}


def _environment(device: str) -> dict:
    import torch
    import transformers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "trl": None,
    }
    if importlib.util.find_spec("trl") is not None:
        from importlib.metadata import version

        env["trl"] = version("trl")
    try:  # the tree may travel without .git, or the machine without git
        git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT)
        env["commit"] = git.stdout.strip() if git.returncode == 0 else None
    except OSError:
        env["commit"] = None
    return env


def _output_path(arg: str | None, small: bool) -> Path:
    """`out` (a .json file, or a directory), else $GPU_CHECK_OUT (a directory), else runs/."""
    name = "gpu_check_small.json" if small else "gpu_check.json"
    if arg:
        path = Path(arg)
        return path if path.suffix == ".json" else path / name
    return Path(os.environ.get("GPU_CHECK_OUT") or ROOT / "runs") / name


def _print_part(name: str, result: dict, clock: Clock) -> None:
    status = result["status"]
    detail = result.get("reason") or ""
    if name == "tests" and "tests" in result:
        detail = f"{result['tests']} tests, {result['failures']} failed, {result['errors']} errors"
        for test, message in result.get("failed", {}).items():
            detail += f"\n    {test}: {message.splitlines()[0] if message else ''}"
    elif name == "logprob_entropy" and status == "ok":
        for variant in ("fused", "naive"):
            r = result.get(variant, {})
            mem = "-" if r.get("extra_mib") is None else f"{r['extra_mib']:.0f} MiB extra"
            detail += f"\n    {variant}: " + (r["error"] if "error" in r else f"{r['median_s'] * 1e3:.1f} ms, {mem}")
        if "fused_over_naive" in result:
            ratio = result["fused_over_naive"]
            mem = f", extra memory {ratio['extra_memory']:.3f}x" if "extra_memory" in ratio else ""
            detail += f"\n    fused/naive: time {ratio['time']:.2f}x{mem} (goal: <= 1.1x, <= 0.125x)"
    elif name in ("forkrl_step", "trl_step") and status == "ok":
        rates = "  ".join(f"{k} {v:,.0f}" for k, v in result["tokens_per_s"].items() if v is not None)
        mem = result.get("peak_allocated_mib", result.get("peak_rss_mib"))
        detail = f"{result['tokens']:,.0f} tokens in {result['step_s']:.1f} s; tokens/s: {rates}; peak {mem:,.0f} MiB"
    if status in ("failed", "timed out") and result.get("tail"):
        detail += "\n    " + result["tail"].replace("\n", "\n    ")
    wall = f" in {result['wall_s']:.0f} s" if "wall_s" in result else ""
    print(f"[{clock.elapsed():5.0f} s] {name}: {status}{wall} {detail}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", help="the JSON file, or its directory (default: $GPU_CHECK_OUT or runs/)")
    parser.add_argument("--small", action="store_true", help="tiny shapes on any device: a smoke run")
    parser.add_argument("--repeats", type=int, default=5, help="(a) timed steps per variant (median)")
    parser.add_argument("--device", help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=["logprob_entropy", "forkrl_step", "trl_step"], help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return

    import torch

    clock = Clock()
    # forkrl from this tree in every subprocess, also when this file is run without gpu_check.sh.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
    has_cuda = torch.cuda.is_available()
    if not has_cuda and not args.small:
        raise SystemExit(f"gpu_check: torch {torch.__version__} sees no CUDA device; use --small for a CPU smoke run")
    args.device = "cuda" if has_cuda else "cpu"
    out_path = _output_path(args.out, args.small)
    shapes = SMALL if args.small else FULL
    report: dict = {
        "check": "benchmarks/gpu_check.py" + (" --small" if args.small else ""),
        "environment": _environment(args.device),
        "shapes": dataclasses.asdict(shapes),
        "budget_s": BUDGET_S,
    }
    print(f"gpu_check: {report['environment']} -> {out_path}", flush=True)

    report["tests"] = run_tests(clock, args.device)
    _print_part("tests", report["tests"], clock)
    with tempfile.TemporaryDirectory(prefix="gpu_check_work_") as tmp:
        work = Path(tmp)
        for name in ("logprob_entropy", "forkrl_step", "trl_step"):
            estimate = ESTIMATE_S[name] * (0.1 if args.small else 1.0)
            if name == "trl_step":
                if report["environment"]["trl"] is None:
                    reason = "TRL is not installed (put its wheels in benchmarks/.whl)"
                    report[name] = {"status": "skipped", "reason": reason}
                    _print_part(name, report[name], clock)
                    continue
                forkrl_wall = report["forkrl_step"].get("wall_s")
                if report["forkrl_step"]["status"] == "ok" and forkrl_wall:
                    # TRL decodes through `generate` without forkrl's shared-prompt prefill: ~1.5x (b)'s step.
                    estimate = 1.5 * (forkrl_wall - report["forkrl_step"]["prepare_s"]) + 20
            report[name] = run_part(name, clock, args, work, estimate)
            _print_part(name, report[name], clock)

    fk, trl = report["forkrl_step"], report["trl_step"]
    if fk["status"] == trl["status"] == "ok":
        ratio = fk["tokens_per_s"]["step"] / trl["tokens_per_s"]["step"]
        # forkrl's first step also starts its reward worker processes (TRL scores in-process): the
        # ratio without either reward phase shows what that one-off cost weighs.
        without = (trl["step_s"] - trl["phases_s"]["reward_s"]) / (fk["step_s"] - fk["phases_s"]["reward_s"])
        report["forkrl_over_trl"] = {
            "tokens_per_s": ratio,
            "tokens_per_s_without_reward": without,
            "goal": ">= 1.5x",
            "goal_met": ratio >= 1.5,
        }
        print(
            f"[{clock.elapsed():5.0f} s] forkrl / TRL tokens/s: {ratio:.2f}x, {without:.2f}x without the reward "
            "phases (goal >= 1.5x)",
            flush=True,
        )
    report["elapsed_s"] = clock.elapsed()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"gpu_check: done in {report['elapsed_s']:.0f} s; wrote {out_path}", flush=True)
    failed = [k for k in ("tests", *ESTIMATE_S) if report[k]["status"] in ("failed", "timed out")]
    if failed:
        raise SystemExit(f"gpu_check: {', '.join(failed)} did not pass (see {out_path})")


if __name__ == "__main__":
    main()
