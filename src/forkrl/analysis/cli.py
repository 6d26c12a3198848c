"""`forkrl analyze …`: the paper's entropy analyses as subcommands (each also a Python function)."""

from __future__ import annotations

import json
from typing import Any

import typer

app = typer.Typer(help="The papers' entropy analyses on any model: stores, plots, tables.", no_args_is_help=True)


def _report(summary: dict[str, Any]) -> None:
    typer.echo(json.dumps(summary, indent=2, default=str))


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _errors():
    """Input errors the analyses raise (a missing column is a KeyError), shown as one line, exit 2."""
    from forkrl.analysis.runs import RunError

    return (RunError, ValueError, KeyError)


def _run(fn, *args, fresh: str | None = None, **kwargs) -> None:
    """Run one analysis; `fresh`: its output directory, moved aside (never overwritten) if it
    already holds results, and put back if the analysis fails before writing."""
    from forkrl.errors import user_errors
    from forkrl.io import fresh_output_dir

    with user_errors(*_errors()), fresh_output_dir(fresh):
        summary = fn(*args, **kwargs)
    _report(summary)


@app.command(
    "store", epilog="Example: forkrl analyze store --model Qwen/Qwen3-8B-Base --data aime24.jsonl -k 16 --out store/"
)
def store(
    model: str = typer.Option(..., "--model", help="Model that generates (or scores) the responses."),
    out: str = typer.Option(..., "--out", help="Store directory (tokens.parquet, samples.parquet, store.json)."),
    data: list[str] = typer.Option(None, "--data", help="Prompt files to sample from (repeatable)."),
    responses: str = typer.Option(None, "--responses", help="Or: a jsonl of existing prompt/response pairs."),
    k: int = typer.Option(4, "-k", help="Responses per prompt."),
    max_new_tokens: int = typer.Option(1024, "--max-new-tokens"),
    temperature: float = typer.Option(1.0, "--temperature"),
    batch_size: int = typer.Option(16, "--batch-size"),
    seed: int = typer.Option(0, "--seed"),
    reward: str = typer.Option(None, "--reward", help="Score responses too: math or module:function."),
    question_key: str = typer.Option("question", "--question-key"),
    answer_key: str = typer.Option("answer", "--answer-key"),
    template: str = typer.Option("paper", "--template"),
    limit: int = typer.Option(None, "--limit", help="Only the first N prompts."),
    device: str = typer.Option(None, "--device"),
    backend: str = typer.Option("hf", "--backend", help="What samples: hf, or vllm (forkrl[vllm])."),
) -> None:
    """Generate k responses per prompt (or load them) and store per-token entropy and log-prob in parquet."""
    from forkrl.analysis.store import StoreOptions, run_store
    from forkrl.errors import user_errors

    with user_errors(*_errors()):  # a bad setting (k < 1) is reported like the analysis's own errors
        options = StoreOptions(
            k=k,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            batch_size=batch_size,
            seed=seed,
            reward=reward,
            question_key=question_key,
            answer_key=answer_key,
            template=template,
            limit=limit,
        )
    _run(
        run_store,
        model,
        out,
        data=data or None,
        responses=responses,
        options=options,
        device=device,
        backend=backend,
        fresh=out,
    )


@app.command(
    "score", epilog="Example: forkrl analyze score store/ --model runs/x/checkpoints/step_000100 --name step100"
)
def score(
    store_dir: str = typer.Argument(..., help="Store directory."),
    model: str = typer.Option(..., "--model", help="Checkpoint to score the stored responses under."),
    name: str = typer.Option(..., "--name", help="Column suffix: adds entropy_<name> and logprob_<name>."),
    temperature: float = typer.Option(1.0, "--temperature"),
    batch_size: int = typer.Option(16, "--batch-size"),
    device: str = typer.Option(None, "--device"),
) -> None:
    """Teacher-force the stored responses under another checkpoint and add its entropy/log-prob columns."""
    from forkrl.analysis.store import run_score

    _run(run_score, store_dir, model, name, temperature=temperature, batch_size=batch_size, device=device)


@app.command("entropy", epilog="Example: forkrl analyze entropy store/ --out analysis/entropy --min-count 100")
def entropy(
    store_dir: str = typer.Argument(..., help="Store directory."),
    out: str = typer.Option(..., "--out"),
    column: str = typer.Option("entropy", "--column", help="Entropy column (or a score name, e.g. step100)."),
    min_count: int = typer.Option(100, "--min-count", help="Tokens seen fewer times are left out of the tables."),
    top_n: int = typer.Option(100, "--top-n", help="Rows of the highest/lowest average-entropy tables."),
    num_responses: int = typer.Option(3, "--num-responses", help="Responses rendered in responses.html."),
) -> None:
    """Paper Fig. 2: histogram, percentiles, highest/lowest average-entropy tokens, word clouds, HTML."""
    from forkrl.analysis.entropy import run_entropy

    _run(
        run_entropy,
        store_dir,
        out,
        column=column,
        min_count=min_count,
        top_n=top_n,
        num_responses=num_responses,
        fresh=out,
    )


@app.command("temperature", epilog="Example: forkrl analyze temperature --model M --data aime24.jsonl --out t/")
def temperature(
    model: str = typer.Option(..., "--model"),
    data: list[str] = typer.Option(..., "--data", help="Benchmark files (repeatable)."),
    out: str = typer.Option(..., "--out"),
    t_high: str = typer.Option("0.6,0.8,1.0,1.2,1.4", "--t-high", help="T_high values swept with T_low = 1."),
    t_low: str = typer.Option("0.6,0.8,1.0,1.2,1.4", "--t-low", help="T_low values swept with T_high = 1."),
    threshold: float = typer.Option(None, "--threshold", help="h; default: p80 of --entropy-json or measured."),
    entropy_json: str = typer.Option(None, "--entropy-json", help="entropy.json of `analyze entropy` for h."),
    k: int = typer.Option(16, "-k"),
    max_new_tokens: int = typer.Option(2048, "--max-new-tokens"),
    batch_size: int = typer.Option(32, "--batch-size"),
    seed: int = typer.Option(0, "--seed"),
    reward: str = typer.Option("math", "--reward"),
    limit: int = typer.Option(None, "--limit"),
    device: str = typer.Option(None, "--device"),
) -> None:
    """Paper Fig. 3 / Eq. 5: accuracy with forking tokens (H > h) at T_high and the rest at T_low."""
    from forkrl.analysis.temperature import run_temperature

    _run(
        run_temperature,
        model,
        data,
        out,
        t_high_values=_floats(t_high),
        t_low_values=_floats(t_low),
        threshold=threshold,
        entropy_json=entropy_json,
        k=k,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        seed=seed,
        reward=reward,
        limit=limit,
        device=device,
        fresh=out,
    )


@app.command(
    "overlap", epilog="Example: forkrl analyze overlap store/ --column entropy --column entropy_step100 --out o/"
)
def overlap(
    store_dir: str = typer.Argument(..., help="Store scored under several checkpoints."),
    out: str = typer.Option(..., "--out"),
    column: list[str] = typer.Option(None, "--column", help="Checkpoint columns in order (default: all)."),
    ratio: float = typer.Option(0.2, "--ratio", help="ρ: top fraction of positions compared."),
) -> None:
    """Paper Table 1: overlap of the top-ρ entropy positions of each checkpoint with the first and the last."""
    from forkrl.analysis.overlap import run_overlap

    _run(run_overlap, store_dir, out, columns=column or None, ratio=ratio, fresh=out)


@app.command("shift", epilog="Example: forkrl analyze shift store/ --before entropy --after entropy_final --out s/")
def shift(
    store_dir: str = typer.Argument(..., help="Store scored under two checkpoints."),
    out: str = typer.Option(..., "--out"),
    before: str = typer.Option(..., "--before", help="Entropy column of the first (base) checkpoint."),
    after: str = typer.Option(..., "--after", help="Entropy column of the second checkpoint."),
    num_buckets: int = typer.Option(20, "--buckets", help="Percentile buckets of the first model (20 = 5%)."),
) -> None:
    """Paper Fig. 4: mean entropy change per entropy-percentile bucket of the first checkpoint."""
    from forkrl.analysis.shift import run_shift

    _run(run_shift, store_dir, out, before=before, after=after, num_buckets=num_buckets, fresh=out)


@app.command("evolution", epilog="Example: forkrl analyze evolution runs/qwen3_8b_forking --out e/")
def evolution(
    source: str = typer.Argument(..., help="A run directory (metrics.jsonl) or a JSON/CSV of percentiles."),
    out: str = typer.Option(..., "--out"),
) -> None:
    """Paper Fig. 5: entropy percentiles over training."""
    from forkrl.analysis.evolution import run_evolution

    _run(run_evolution, source, out, fresh=out)


@app.command("law", epilog="Example: forkrl analyze law runs/a runs/b docs/ablation/results --out law/")
def law(
    run_dirs: list[str] = typer.Argument(..., help="Run directories and/or sweep results folders (CELL/seed_N)."),
    out: str = typer.Option(..., "--out"),
    accuracy: str = typer.Option("accuracy", "--accuracy", help="Training `accuracy` or a benchmark name."),
    fit_fraction: float = typer.Option(0.5, "--fit-fraction", help="Fit on this first part, predict the rest."),
    bootstrap: int = typer.Option(1000, "--bootstrap", help="Resamples of runs for the intervals (0: none)."),
    seed: int = typer.Option(0, "--seed", help="The bootstrap's seed."),
    exclude: list[str] = typer.Option(None, "--exclude", help="A group left out of the pooled fit (repeatable)."),
) -> None:
    """Paper 2: fit R = −a·e^H + b across runs and sweeps: the ceiling b − a with bootstrap intervals,
    the held-out error, per-group departures from the pooled curve; covariance plots."""
    from forkrl.analysis.law import run_law

    _run(
        run_law,
        run_dirs,
        out,
        accuracy_key=accuracy,
        fit_fraction=fit_fraction,
        bootstrap=bootstrap,
        seed=seed,
        exclude=exclude or (),
        fresh=out,
    )


@app.command("compare", epilog="Example: forkrl analyze compare runs/top20_s* runs/all_s* --out cmp/ --smooth 5")
def compare(
    run_dirs: list[str] = typer.Argument(..., help="Run directories (seeds of one setting are aggregated)."),
    out: str = typer.Option(..., "--out"),
    smooth: int = typer.Option(1, "--smooth", help="Moving-average window of the curves."),
    accuracy: str = typer.Option("accuracy", "--accuracy", help="Training `accuracy` or a benchmark name."),
) -> None:
    """Paper Figs. 6–7 and Table 2: curves and an Acc@k/Len@k table across runs, mean ± s.e. over seeds."""
    from forkrl.analysis.compare import run_compare

    _run(run_compare, run_dirs, out, smooth=smooth, accuracy_key=accuracy, fresh=out)


@app.command(
    "calibration",
    epilog="Example: forkrl analyze calibration runs/demo_forecast/forecasts_after.jsonl --out cal/",
)
def calibration_command(
    file: str = typer.Argument(..., help="Forecasts jsonl: outcome (0/1), p or completion/text, optional true_p."),
    out: str = typer.Option(None, "--out", help="Directory for calibration.json, reliability.png, sharpness.png."),
    bins: int = typer.Option(10, "--bins", help="Equal-width bins (0: one bin per distinct forecast value)."),
    outcome_key: str = typer.Option("outcome", "--outcome-key", help="Field with the 0/1 outcome."),
    forecast_key: str = typer.Option("p", "--forecast-key", help="Field with a numeric forecast (read first)."),
    text_key: str = typer.Option(None, "--text-key", help="Field with the response text (default: completion, text)."),
    true_key: str = typer.Option("true_p", "--true-key", help="Field with the true probability, when known."),
) -> None:
    """Calibration of stored forecasts: ECE, Brier with its Murphy decomposition, reliability diagram, sharpness."""
    from forkrl.analysis.calibration import run_calibration

    _run(run_calibration, file, out, bins, outcome_key, forecast_key, text_key, true_key, fresh=out)
