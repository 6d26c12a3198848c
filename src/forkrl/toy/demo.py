"""`forkrl demo`: forking-token RLVR end to end on CPU, on the toy Countdown task and the shipped base model.

1. measure the base model on held-out problems: Acc@8, Len@8, token entropies, and which kinds of
   positions the top-20% entropy tokens are (operand/operation choices vs determined arithmetic);
2. train it with the paper's defaults (DAPO losses, dynamic sampling, top-20% entropy tokens,
   kept-token normalizer) through the same `Trainer` a Qwen3 user runs;
3. measure again, write plots and a `report.md`, and print a before/after table.

`CountdownTask` is the Countdown toy (`--task countdown`): the build's hooks (`forkrl.toy.build`)
and the demo's below; `forkrl.toy.task.run_toy_demo` runs the steps above.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from forkrl import fast_paths
from forkrl.io import pyplot, save_figure
from forkrl.rollout.base import SamplingParams
from forkrl.rollout.hf import HFGenerationBackend
from forkrl.tasks.countdown import CountdownProblem, problems_to_examples, score_countdown, write_problems_jsonl
from forkrl.toy.build import SHIPPED_MODEL, CountdownBuild
from forkrl.toy.recipe import max_new_tokens_of, toy_config_dict, toy_problems
from forkrl.toy.task import DemoReport, DemoRun

__all__ = ["SHIPPED_MODEL", "CountdownTask", "Measurement", "measure"]

DECODE_PHASE = 64
"""`rollout.decode_phase` of the demo's rollouts and evaluations: every 64 tokens only unfinished
rows go on, so a few long traces stop holding the whole batch (same tokens; generation 0.82x on
the base model's 384-row batches, 0.63x over the demo's training steps: benchmarks/decode_phase.py)."""


def _classify_line_tokens(pieces: list[str]) -> list[str]:
    """Kind of every token of one response, from the trace grammar (see `forkrl.tasks.countdown`).

    `choice`: the first operand (or `back`/`answer:` opening a line), the operation and the second
    operand of a step — where the search decides. `result`: the arithmetic after `=`. `remaining`:
    the numbers in brackets. `check`: `vs`, the target and yes/no. `answer`: the final expression.
    `format`: spaces, newlines, brackets, EOS.
    """
    kinds, state = [], "start"
    for piece in pieces:
        text = piece.strip()
        if piece == "\n":
            kinds.append("format")
            state = "start" if state != "answer" else "answer"
            continue
        if state == "answer":
            kinds.append("answer" if text else "format")
            continue
        if not text:
            kinds.append("format")
            continue
        if state == "start":
            kinds.append("choice")
            state = {"answer:": "answer", "back": "done"}.get(text, "op")
        elif state == "op":
            kinds.append("choice")
            state = "operand2"
        elif state == "operand2":
            kinds.append("choice")
            state = "eq"
        elif state == "eq":
            kinds.append("result")  # "=" itself is determined
            state = "result"
        elif state == "result":
            if text == "[":
                kinds.append("format")
                state = "remaining"
            elif text == "vs":
                kinds.append("check")
                state = "check"
            else:
                kinds.append("result")
        elif state == "remaining":
            kinds.append("format" if text == "]" else "remaining")
        elif state in ("check", "done"):
            kinds.append("check" if state == "check" else "format")
        else:
            kinds.append("format")
    return kinds


@dataclass
class Measurement:
    """Sampled behaviour of one model on the held-out problems."""

    acc_at_k: float
    len_at_k: float
    mean_entropy: float
    share_entropy_below_0_1: float
    top20_kinds: dict[str, float]
    all_kinds: dict[str, float]
    entropies: np.ndarray


def measure(model, tokenizer, examples, k: int, max_new_tokens: int, seed: int, batch_size: int = 256) -> Measurement:
    """Sample k responses per problem at T = 1: Acc@k, Len@k, entropy structure (one generation)."""
    backend = HFGenerationBackend(model, tokenizer, batch_size=batch_size, decode_phase=DECODE_PHASE)
    rows = [ex for ex in examples for _ in range(k)]
    seeds = [seed * 1_000_003 + i for i in range(len(rows))]
    rollout = backend.generate([ex.prompt for ex in rows], SamplingParams(max_new_tokens, row_seeds=seeds))
    texts = tokenizer.batch_decode(rollout.response_ids, skip_special_tokens=True)
    scores = np.array([score_countdown(t, ex) for t, ex in zip(texts, rows)])
    mask = rollout.response_mask.bool()
    entropy = rollout.sampler_entropy[mask].float().numpy()
    # Kinds of positions: decode each valid token and parse the trace grammar per response.
    kinds: list[str] = []
    for ids, m in zip(rollout.response_ids.tolist(), rollout.response_mask.tolist()):
        valid = ids[: sum(m)]
        pieces = tokenizer.convert_ids_to_tokens(valid)
        pieces = [tokenizer.convert_tokens_to_string([p]) for p in pieces]
        kinds += [
            kind if tid != tokenizer.eos_token_id else "format"
            for kind, tid in zip(_classify_line_tokens(pieces), valid)
        ]
    kinds_arr = np.array(kinds)
    k_top = int(np.ceil(0.2 * len(entropy)))
    top = np.argsort(-entropy, kind="stable")[:k_top]

    def shares(idx) -> dict[str, float]:
        counts = Counter(kinds_arr[idx].tolist())
        return {kind: counts[kind] / max(1, len(idx)) for kind in sorted(counts)}

    return Measurement(
        acc_at_k=100.0 * float(scores.mean()),
        len_at_k=float(rollout.response_lengths.float().mean()),
        mean_entropy=float(entropy.mean()),
        share_entropy_below_0_1=float((entropy < 0.1).mean()),
        top20_kinds=shares(top),
        all_kinds=shares(np.arange(len(entropy))),
        entropies=entropy,
    )


def accuracy_plot(
    path: Path, steps: list[int], train_acc: list[float], base_acc: float, final_acc: float, k: int = 8
) -> str:
    """Training accuracy per step (and its 5-step mean) with the held-out Acc@k before and after
    (percent) as two points at step 0 and the last step; returns the file name."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    acc = 100 * np.asarray(train_acc, dtype=float)
    ax.plot(steps, acc, color="tab:blue", alpha=0.35, label="training batch (sampled)")
    if len(acc) >= 5:
        ax.plot(steps[4:], np.convolve(acc, np.ones(5) / 5, mode="valid"), color="tab:blue", label="5-step mean")
    ax.plot(
        [0, steps[-1] if steps else 0],
        [base_acc, final_acc],
        "o",
        color="tab:red",
        label=f"held-out Acc@{k} (before, after)",
    )
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy (%)")
    ax.legend(fontsize=8)
    save_figure(fig, path)
    return path.name


def _plots(run_dir: Path, final: Measurement, base: Measurement, k: int) -> list[str]:
    plt = pyplot()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]

    def series(key):
        return [r.get(key) if r.get(key) is not None else np.nan for r in records]

    files = [accuracy_plot(run_dir / "accuracy.png", steps, series("accuracy"), base.acc_at_k, final.acc_at_k, k)]
    for name, keys, ylabel in (
        ("entropy.png", ["entropy", "entropy_kept"], "mean token entropy (nats)"),
        ("response_length.png", ["response_length"], "response length (tokens)"),
    ):
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for key in keys:
            ax.plot(
                steps, series(key), label={"entropy": "all tokens", "entropy_kept": "kept (top-ρ) tokens"}.get(key, key)
            )
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if len(keys) > 1:
            ax.legend()
        save_figure(fig, run_dir / name)
        files.append(name)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    bins = np.linspace(0, max(base.entropies.max(), final.entropies.max(), 1e-3), 50)
    ax.hist(base.entropies, bins=bins, alpha=0.5, label="base model")
    ax.hist(final.entropies, bins=bins, alpha=0.5, label="after RL")
    ax.set_yscale("log")
    ax.set_xlabel("token entropy (nats)")
    ax.set_ylabel("tokens (log scale)")
    ax.legend()
    save_figure(fig, run_dir / "entropy_histogram.png")
    files.append("entropy_histogram.png")
    return files


def _table(base: Measurement, final: Measurement, kept: float, k: int) -> str:
    rows = [
        ("", "base model", "after RL"),
        (f"Acc@{k} (%)", f"{base.acc_at_k:.1f}", f"{final.acc_at_k:.1f}"),
        (f"Len@{k} (tokens)", f"{base.len_at_k:.1f}", f"{final.len_at_k:.1f}"),
        ("mean token entropy", f"{base.mean_entropy:.3f}", f"{final.mean_entropy:.3f}"),
        ("kept fraction (training)", "", f"{kept:.3f}"),
    ]
    return (
        "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows[:1])
        + "\n|---|---|---|\n"
        + "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows[1:])
    )


@dataclass
class CountdownDemoData:
    """The demo's problems: training (drawn with the demo's seed) and held-out (the build's evaluation set)."""

    train: list[CountdownProblem]
    test: list[CountdownProblem]
    max_new_tokens: int
    """The base model's response length limit (its build's), also the recipe's."""


class CountdownTask(CountdownBuild):
    """The Countdown toy: the build's hooks (`CountdownBuild`) and the demo's."""

    eval_k = 8
    """Samples per held-out problem (Acc@k, Len@k)."""

    def demo_data(self, seed: int, base: Path, num_eval: int) -> CountdownDemoData:
        # The same held-out problems as the build's evaluation (fixed seed), whatever the demo seed.
        train, test = toy_problems(seed, base, num_eval)
        return CountdownDemoData(train, test, max_new_tokens_of(base))

    def demo_recipe(self, seed: int, output_dir: Path, train_file: Path, base: Path) -> dict[str, Any]:
        # configs/toy_countdown.yaml, also the toy sweep's CONFIG
        return toy_config_dict(seed, output_dir, train_file, base=base)

    def write_demo_data(self, data_dir: Path, data: CountdownDemoData, cfg) -> None:
        write_problems_jsonl(data_dir / "train.jsonl", data.train)
        write_problems_jsonl(data_dir / "test.jsonl", data.test)

    def measure(self, model, tokenizer, data: CountdownDemoData, cfg, seed: int, out: Path, when: str) -> Measurement:
        examples = problems_to_examples(data.test)
        return measure(model, tokenizer, examples, self.eval_k, data.max_new_tokens, seed=seed)

    def measurement_line(self, measured: Measurement) -> str:
        return f"Acc@{self.eval_k} {measured.acc_at_k:.1f}%, Len@{self.eval_k} {measured.len_at_k:.1f}"

    def report(self, run: DemoRun, before: Measurement, after: Measurement) -> DemoReport:
        plots = _plots(run.out / "run", after, before, self.eval_k)
        kept = run.last_metrics.get("kept_frac")
        table = _table(before, after, float(run.last_metrics.get("kept_frac", float("nan"))), self.eval_k)
        summary = {
            "strategy": run.cfg.selection.strategy,
            "ratio": run.cfg.selection.ratio,
            "seed": run.seed,
            "steps": run.steps,
            "seconds": run.seconds(),
            "before": {k: v for k, v in vars(before).items() if k != "entropies"},
            "after": {k: v for k, v in vars(after).items() if k != "entropies"},
            "kept_frac": kept,
            **run.environment(),
        }
        return DemoReport(summary, _report_md(summary, table, plots, self.eval_k, run.num_eval), table)


def _kinds_line(kinds: dict[str, float]) -> str:
    return ", ".join(f"{kind} {100 * share:.1f}%" for kind, share in sorted(kinds.items(), key=lambda kv: -kv[1]))


def _report_md(s: dict, table: str, plots: list[str], k: int, n: int) -> str:
    b, a = s["before"], s["after"]
    return (
        f"""# forkrl demo: forking-token RLVR on the toy Countdown task

Strategy `{s["strategy"]}` (ρ = {s["ratio"]}), {s["steps"]} steps, seed {s["seed"]}, {s["seconds"]:.0f} s on CPU
({s["threads"]} threads, OpenMP wait policy {s["omp_wait_policy"]}).
Fast paths (transformers {s["transformers"]}): {fast_paths.summary_line(s["fast_paths"])}.
Held-out set: {n} test-split problems, {k} samples each at T = 1.

{table}

## Where the entropy lives (measured on the base model's own responses)

- Share of response tokens with entropy < 0.1: **{100 * b["share_entropy_below_0_1"]:.1f}%** (after RL:
  {100 * a["share_entropy_below_0_1"]:.1f}%).
- Kinds of position among the **top-20% highest-entropy tokens**: {_kinds_line(b["top20_kinds"])}.
- The same kinds among **all** response tokens: {_kinds_line(b["all_kinds"])}.

`choice` = the operands and operation of a step (or `back` / `answer:` opening a line): where the search
forks. `result`, `remaining`, `check` = arithmetic and bookkeeping determined by the text before them.

## Plots

"""
        + "\n".join(f"![{p}](run/{p})" for p in plots)
        + """

Training metrics, per step: `run/metrics.jsonl`; TensorBoard: `tensorboard --logdir run/tensorboard`;
a few sampled completions per step: `run/samples.jsonl`; the resolved config: `run/config.yaml`.
"""
    )
