"""The `forkrl` command: one entry point, one subcommand per job."""

from __future__ import annotations

import os
import sys
import time

import typer
from typer.core import TyperGroup

from forkrl import __version__
from forkrl.errors import set_debug, user_errors


def _busy_cores(interval: float = 0.1) -> float:
    """Cores busy right now (Linux: two `/proc/stat` reads `interval` s apart; elsewhere the
    1-minute load average, which lags: a job that just ended still counts)."""
    try:
        with open("/proc/stat") as f:
            first = [int(x) for x in f.readline().split()[1:]]
        time.sleep(interval)
        with open("/proc/stat") as f:
            second = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    delta = [b - a for a, b in zip(first, second)]
    total = sum(delta)
    idle = delta[3] + (delta[4] if len(delta) > 4 else 0)  # idle + iowait
    return (os.cpu_count() or 1) * (total - idle) / total if total > 0 else 0.0


def _omp_wait_policy(busy_cores=_busy_cores) -> str | None:
    """PASSIVE when this process's OpenMP threads would compete for cores, else None (library default).

    Idle OpenMP threads spin-wait by default. On cores of their own that is the fast choice (toy
    generation on an idle 2-core machine: 2.1 s spinning vs 3.8 s passive); when other work wants
    the same cores (several torchrun processes on one CPU host, or an already loaded machine) the
    spinning starves it (measured: 11.5 s vs 2.0 s per toy training step). "Loaded" is what the
    cores are doing now, not the load average, which still counts a job that ended a minute ago
    (it made `forkrl demo` after a killed run take 11.6 min instead of 7). Must be decided before
    torch is imported; an explicit `OMP_WAIT_POLICY` always wins.
    """
    if "OMP_WAIT_POLICY" in os.environ:
        return None
    cores = os.cpu_count() or 1
    local_procs = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    threads = min(int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or cores, cores)
    # Half a core of slack for background noise (a shell, an editor).
    if local_procs * threads > cores or busy_cores() + threads > cores + 0.5:
        return "PASSIVE"
    return None


def configure_openmp() -> None:
    """Set `OMP_WAIT_POLICY` (`_omp_wait_policy`) for this process and its children. Called when a
    command starts, not at import (importing `forkrl.cli` neither sleeps nor changes the environment);
    it has an effect only before torch is imported, which no command does before this."""
    if "torch" in sys.modules:
        return  # OpenMP has read its settings already; measuring would only cost 0.1 s
    if (policy := _omp_wait_policy()) is not None:
        os.environ["OMP_WAIT_POLICY"] = policy


class _Commands(TyperGroup):
    """The root command: whatever subcommand runs, its user errors (`forkrl.errors`) are shown as one
    line, `error: ...`, with exit code 2, including those of parsing its arguments."""

    def make_context(self, info_name, args, parent=None, **extra):
        set_debug(None)  # `--debug` (parsed here or by the subcommand) turns it on for this invocation
        with user_errors():
            return super().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx):
        with user_errors():
            return super().invoke(ctx)


app = typer.Typer(
    cls=_Commands,
    name="forkrl",
    help="RL with verifiable rewards on language models, built around high-entropy forking tokens.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"forkrl {__version__}")
        raise typer.Exit()


def _debug_option(value: bool) -> bool:
    if value:
        set_debug(True)
    return value


DEBUG_OPTION = typer.Option(
    False, "--debug", callback=_debug_option, help="Show the full traceback of an error instead of one line."
)


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
    debug: bool = DEBUG_OPTION,
) -> None:
    """RL with verifiable rewards on language models, built around high-entropy forking tokens."""
    set_debug(True if debug else None)  # per invocation (an in-process caller may run several)
    configure_openmp()


@app.command("info")
def info() -> None:
    """Print the versions of forkrl and its core dependencies and the devices torch can see."""
    import torch
    import transformers

    typer.echo(f"forkrl        {__version__}")
    typer.echo(f"torch         {torch.__version__}")
    typer.echo(f"transformers  {transformers.__version__}")
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    typer.echo(f"devices       cpu ({torch.get_num_threads()} threads), {cuda} CUDA GPU(s)")


@app.command(
    "train",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": False},
    epilog="Example: forkrl train configs/qwen3_8b_forking.yaml model.name=Qwen/Qwen3-0.6B-Base optim.lr=2e-6",
)
def train(
    config: str = typer.Argument(None, help="YAML recipe (e.g. configs/qwen3_8b_forking.yaml); omit with --resume."),
    overrides: list[str] = typer.Argument(None, help="key.sub=value overrides, e.g. selection.ratio=0.1"),
    resume: str = typer.Option(
        None,
        "--resume",
        help="Continue the run in RUN_DIR from its newest valid checkpoint, or from RUN_DIR/checkpoints/step_N; "
        "key=value overrides apply to the run's saved config.",
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Start afresh in a non-empty output_dir: move it aside to OUTPUT_DIR.old-<time>."
    ),
    debug: bool = DEBUG_OPTION,
) -> None:
    """Train a causal LM with RLVR (DAPO + forking-token selection, Clip-Cov or KL-Cov)."""
    args = list(overrides or [])
    if config is not None and "=" in config:  # `forkrl train --resume DIR key=value`
        args.insert(0, config)
        config = None
    if config is None and resume is None and not args:
        raise typer.BadParameter("give a config file, key=value overrides, or --resume RUN_DIR")
    if resume is not None and overwrite:
        raise typer.BadParameter("--resume continues a run and --overwrite starts afresh: give one of them")
    from forkrl.train.trainer import run_training

    run_training(config, args, resume=resume, overwrite=overwrite)


@app.command(
    "eval",
    epilog="Example: forkrl eval --model runs/qwen3_8b_forking/checkpoints/step_000100 "
    "--data aime24.jsonl --data math500.jsonl -k 16 --out runs/eval",
)
def eval_command(
    model: str = typer.Option(..., "--model", help="Model directory or hub id (e.g. a run's checkpoint)."),
    data: list[str] = typer.Option(..., "--data", help="Benchmark file (jsonl/parquet/json) or dataset; repeat."),
    k: int = typer.Option(16, "-k", "--k", help="Samples per question (Acc@k, Len@k)."),
    max_new_tokens: int = typer.Option(20480, "--max-new-tokens", help="Maximum response length."),
    temperature: float = typer.Option(1.0, "--temperature", help="Sampling temperature (paper: 1.0)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling threshold."),
    reward: str = typer.Option("math", "--reward", help="Reward function: math or module:function."),
    question_key: str = typer.Option("question", "--question-key", help="Field with the question."),
    answer_key: str = typer.Option("answer", "--answer-key", help="Field with the reference answer."),
    template: str = typer.Option("paper", "--template", help="paper, chat, or a format string with {question}."),
    batch_size: int = typer.Option(64, "--batch-size", help="Sequences generated at once."),
    limit: int = typer.Option(None, "--limit", help="Evaluate only the first N questions of each file."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, float32, bfloat16 or float16."),
    device: str = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available)."),
    backend: str = typer.Option("hf", "--backend", help="Generation backend: hf, or vllm (forkrl[vllm])."),
    out: str = typer.Option(
        None, "--out", help="Directory for eval.json and eval.md (an existing one is moved aside to OUT.old-<time>)."
    ),
    debug: bool = DEBUG_OPTION,
) -> None:
    """Acc@k and Len@k per benchmark file (the paper's Table 2), as a markdown table and JSON."""
    from forkrl.eval.accuracy import run_eval_command

    run_eval_command(
        model,
        data,
        k=k,
        max_new_tokens=max_new_tokens,
        out=out,
        temperature=temperature,
        seed=seed,
        reward=reward,
        question_key=question_key,
        answer_key=answer_key,
        template=template,
        batch_size=batch_size,
        limit=limit,
        dtype=dtype,
        device=device,
        top_p=top_p,
        backend=backend,
    )


from forkrl.analysis.cli import app as analyze_app  # noqa: E402  (grouped with its registration)

app.add_typer(analyze_app, name="analyze")

from forkrl.sweep.cli import app as sweep_app  # noqa: E402  (grouped with its registration)

app.add_typer(sweep_app, name="sweep")


@app.command("demo", epilog="Example: forkrl demo --steps 50 --strategy top --ratio 0.2 --seed 0 --out runs/demo")
def demo(
    task: str = typer.Option(
        "countdown", "--task", help="countdown (forking-token RLVR) or forecast (calibration with the win-rate reward)."
    ),
    steps: int = typer.Option(
        None,
        "--steps",
        help="RL steps (default: countdown 50, each 32 prompts x 8 responses drawn from 48; forecast 100).",
    ),
    strategy: str = typer.Option(
        None, "--strategy", help="top, all, bottom, random or gradient (default: countdown top, forecast all)."
    ),
    ratio: float = typer.Option(
        None, "--ratio", help="ρ: fraction of tokens kept by top/bottom/random (default: countdown 0.2)."
    ),
    seed: int = typer.Option(0, "--seed"),
    out: str = typer.Option(
        None,
        "--out",
        help="Run directory (report.md, plots, metrics; default runs/demo, or runs/demo_forecast); an earlier demo "
        "there is moved aside to OUT.old-<time>.",
    ),
    eval_problems: int = typer.Option(
        None, "--eval-problems", help="Held-out problems for Acc@8 (default 256), or games for forecast (default 2048)."
    ),
    base_model: str = typer.Option(None, "--base-model", help="Toy base model dir (default: the shipped one)."),
    overrides: list[str] = typer.Argument(None, help="key=value overrides of the training config, e.g. optim.lr=3e-4"),
    debug: bool = DEBUG_OPTION,
) -> None:
    """RLVR end to end on CPU on a toy task (Countdown or forecasting): before/after table, plots, report."""
    from transformers.utils import logging as hf_logging

    toy = _toy_task(task)
    hf_logging.disable_progress_bar()  # the model is tiny; load/save bars would only clutter the table
    with user_errors(ValueError):  # the toy's own checks (e.g. --ratio) raise ValueError
        from forkrl.toy.task import run_toy_demo

        run_toy_demo(toy, steps, strategy, ratio, seed, out, base_model, eval_problems, overrides or [])


def _toy_task(name: str):
    """The registered toy task `name` (`forkrl.toy.task.TOY_TASKS`); a usage error naming them otherwise."""
    from forkrl.toy.task import TOY_TASKS, toy_task

    if name not in TOY_TASKS:
        raise typer.BadParameter(f"--task must be {' or '.join(TOY_TASKS)}, got {name!r}")
    return toy_task(name)


toy_app = typer.Typer(help="The embedded toy task and its base model.", no_args_is_help=True)
app.add_typer(toy_app, name="toy")


@toy_app.command("build", epilog="Example: forkrl toy build --seed 0 --out toy_model")
def toy_build(
    seed: int = typer.Option(0, "--seed", help="Seeds problems, traces, weights and batch order."),
    out: str = typer.Option(..., "--out", help="Directory for the HF model (config.json, model.safetensors, ...)."),
    task: str = typer.Option(
        "countdown", "--task", help="countdown (noisy solver traces) or forecast (over-confident forecasts)."
    ),
    steps: int = typer.Option(None, "--steps", help="Supervised steps (default: the shipped model's)."),
    num_traces: int = typer.Option(None, "--num-traces", help="Traces to fit (default 60000)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUT."),
) -> None:
    """Rebuild a toy base model from scratch: supervised training on a noisy Countdown solver's traces,
    or (--task forecast) on deliberately over-confident forecasts of synthetic games."""
    from forkrl.toy.task import build_command

    toy = _toy_task(task)
    extra = {k: v for k, v in (("steps", steps), ("num_traces", num_traces)) if v is not None}
    build_command(toy, seed, out, overwrite=overwrite, **extra)


config_app = typer.Typer(help="Inspect training configs.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("show", epilog="Example: forkrl config show configs/qwen3_8b_forking.yaml selection.ratio=0.1")
def config_show(
    config: str = typer.Argument(None, help="YAML recipe; omit to start from the defaults."),
    overrides: list[str] = typer.Argument(None, help="key.sub=value overrides"),
) -> None:
    """Print the fully resolved config (every field) without checking that files exist."""
    from forkrl.config import dump_config, load_config

    args = list(overrides or [])
    if config is not None and "=" in config:
        args.insert(0, config)
        config = None
    typer.echo(dump_config(load_config(config, args, check_files=False)), nl=False)


@config_app.command("reference", epilog="Example: forkrl config reference > docs/config.md")
def config_reference() -> None:
    """Print the config reference (every key, default and meaning) as markdown."""
    from forkrl.config import config_reference_markdown

    typer.echo(config_reference_markdown(), nl=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
