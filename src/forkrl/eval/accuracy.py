"""Acc@k and Len@k per benchmark file (paper 1, Table 2): k samples per question at T = 1.0.

For every question of a benchmark file we sample k responses, score each with a reward function
and count its tokens. Per file:

- **Acc@k**: mean accuracy over all k·n samples, in percent. A sample's accuracy is its reward
  clipped to [0, 1]; the math reward is already 0/1, so this is the fraction of correct samples.
- **Len@k**: mean response length in tokens over the same samples, counting the EOS token when
  the response has one (= `Rollout.response_mask.sum(-1)`).
- **std_err**: standard error of Acc@k over questions, `100 · std(acc_q, ddof=1) / sqrt(n)`
  with `acc_q` a question's mean accuracy over its k samples. It treats the questions as drawn
  from a population and includes the sampling noise of the k draws; it is what an error bar on
  Acc@k between two checkpoints should use. Undefined (None) for a single question.
- **pass_at_k**: percent of questions with at least one sample at full accuracy (clipped
  reward = 1), the plain empirical pass@k over exactly these k samples.

The "average" row of the table is the unweighted mean over files, as the paper's Avg. column.

Determinism: sampling runs in chunks of `batch_size` sequences (question-major, each question's
k samples consecutive), chunk c of a file seeded with a seed derived from `(seed, c)`. So the
same seed, model, files and batch size give the same report, a file's result does not depend on
which other files are evaluated with it, and the caller's RNG state is left alone. Different
batch sizes pad differently and may change samples.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from forkrl import fast_paths
from forkrl.errors import UserError
from forkrl.io import atomic_write_json, atomic_write_text, check_writable, fresh_output_dir
from forkrl.rollout.base import GenerationBackend, SamplingParams
from forkrl.rollout.hf import HFGenerationBackend
from forkrl.seeding import mix_seed
from forkrl.tasks.data import PromptDataError, PromptExample, load_prompts
from forkrl.tasks.math import DEFAULT_TIMEOUT_S
from forkrl.tasks.rewards import RewardComputer, RewardFn

__all__ = [
    "EvalInputError",
    "EvalReport",
    "FileResult",
    "QuestionResult",
    "evaluate_model",
    "run_eval_command",
    "write_eval_report",
]

logger = logging.getLogger(__name__)

PAPER_MAX_RESPONSE_LENGTH = 20480
"""Paper 1's maximum response length (tokens), also used for its evaluation."""


@dataclass
class QuestionResult:
    """The k samples of one question."""

    index: int
    """Position of the question in its file (after `limit`)."""
    question: str
    answer: str
    scores: list[float]
    """Raw reward of each sample (0 where the reward raised, timed out or returned garbage)."""
    accuracies: list[float]
    """`scores` clipped to [0, 1]."""
    lengths: list[int]
    """Response length of each sample in tokens, EOS included when present."""
    finished: list[bool]
    """Whether each sample ended with EOS (False: cut at `max_new_tokens`)."""
    completions: list[str] | None = None
    """Decoded responses (special tokens skipped); only kept with `keep_completions=True`."""

    @property
    def accuracy(self) -> float:
        """Mean accuracy over the k samples, in [0, 1]."""
        return sum(self.accuracies) / len(self.accuracies)

    @property
    def mean_length(self) -> float:
        return sum(self.lengths) / len(self.lengths)


@dataclass
class FileResult:
    """Acc@k and Len@k of one benchmark file."""

    name: str
    """Short name for tables: the file name without its extension (`aime24.jsonl` -> `aime24`)."""
    source: str
    """The path or dataset id as given."""
    num_questions: int
    k: int
    acc_at_k: float
    """Mean accuracy over all samples, percent."""
    len_at_k: float
    """Mean response length over all samples, tokens."""
    std_err: float | None
    """Standard error of `acc_at_k` over questions, percent; None with a single question."""
    pass_at_k: float
    """Percent of questions with at least one fully correct sample."""
    num_reward_errors: int
    """Samples scored 0 because the reward raised, timed out or returned a non-number."""
    num_truncated: int
    """Samples that hit `max_new_tokens` without EOS (their length is a lower bound)."""
    questions: list[QuestionResult] | None = field(default=None, repr=False)
    """Per-question details, in file order (None when not requested)."""

    def summary(self) -> dict[str, Any]:
        """The fields above without the per-question details."""
        return {k: v for k, v in asdict(self).items() if k != "questions"}


@dataclass
class EvalReport:
    """Results per benchmark file plus the settings that produced them."""

    results: list[FileResult]
    config: dict[str, Any] = field(default_factory=dict)
    """Sampling and scoring settings (k, max_new_tokens, temperature, seed, reward, ...)."""

    def average(self) -> dict[str, Any] | None:
        """Unweighted mean over files (the paper's Avg. column); None with fewer than two files.

        Its `std_err` combines the files' as independent estimates, `sqrt(Σ se²) / n_files`.
        """
        if len(self.results) < 2:
            return None
        n = len(self.results)
        errs = [r.std_err for r in self.results]
        return {
            "name": "average",
            "num_questions": sum(r.num_questions for r in self.results),
            "acc_at_k": sum(r.acc_at_k for r in self.results) / n,
            "len_at_k": sum(r.len_at_k for r in self.results) / n,
            "std_err": None if None in errs else math.sqrt(sum(e * e for e in errs)) / n,
            "pass_at_k": sum(r.pass_at_k for r in self.results) / n,
        }

    def to_json(self, include_details: bool = False) -> dict[str, Any]:
        """A JSON-serialisable dict; `include_details` adds the per-question results."""
        results = []
        for r in self.results:
            row = r.summary()
            if include_details and r.questions is not None:
                row["questions"] = [asdict(q) for q in r.questions]
            results.append(row)
        out: dict[str, Any] = {"config": dict(self.config), "results": results}
        if (avg := self.average()) is not None:
            out["average"] = avg
        return out

    def to_markdown(self) -> str:
        """The paper's Table 2 layout: benchmark | Acc@k (± std err) | Len@k | questions."""
        k = self.results[0].k if self.results else self.config.get("k", "k")
        rows = [f"| benchmark | Acc@{k} | Len@{k} | questions |", "|---|---:|---:|---:|"]
        entries = [r.summary() for r in self.results]
        if (avg := self.average()) is not None:
            entries.append(avg)
        for e in entries:
            acc = f"{e['acc_at_k']:.2f}" + ("" if e["std_err"] is None else f" ± {e['std_err']:.2f}")
            rows.append(f"| {e['name']} | {acc} | {e['len_at_k']:.1f} | {e['num_questions']} |")
        return "\n".join(rows) + "\n"


# ---------------------------------------------------------------------------- evaluation


def evaluate_model(
    model: PreTrainedModel | None,
    tokenizer: PreTrainedTokenizerBase,
    files: Sequence[str | os.PathLike] | str | os.PathLike,
    k: int = 16,
    max_new_tokens: int = PAPER_MAX_RESPONSE_LENGTH,
    temperature: float = 1.0,
    top_p: float = 1.0,
    reward_fn: str | RewardFn = "math",
    question_key: str = "question",
    answer_key: str = "answer",
    template: str = "paper",
    batch_size: int = 64,
    seed: int | None = 0,
    limit: int | None = None,
    backend: GenerationBackend | None = None,
    split: str = "test",
    reward_timeout_s: float = DEFAULT_TIMEOUT_S,
    reward_kwargs: dict[str, Any] | None = None,
    keep_completions: bool = False,
) -> EvalReport:
    """Sample `k` responses per question of each file and report Acc@k / Len@k (module docstring).

    Args:
        model: the policy; unused when `backend` is given (may then be None).
        tokenizer: decodes responses (special tokens skipped) and renders `template="chat"`.
        files: benchmark files (.jsonl/.json/.parquet) or `datasets` sources, see `load_prompts`.
        k: samples per question (paper: 16).
        max_new_tokens: response length limit (paper: 20480).
        temperature, top_p: sampling settings (paper: T = 1.0, no nucleus).
        reward_fn: "math", "module:function", "file.py:function" or a callable
            `(completion, example) -> float`; scores are clipped to [0, 1] as accuracy.
        question_key, answer_key, template, split: passed to `load_prompts`.
        batch_size: sequences per generation call.
        seed: sampling seed (None: unseeded, from the global RNG).
        limit: evaluate only the first `limit` questions of each file.
        backend: a `GenerationBackend` to sample with; default `HFGenerationBackend(model, ...)`.
        reward_timeout_s: per-sample time limit of the reward.
        reward_kwargs: the reward's options (`reward.kwargs`, `forkrl.tasks.rewards.configure_reward`).
        keep_completions: keep the decoded responses in the per-question details.
    """
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    if not files:
        raise ValueError("no benchmark files given")
    if k < 1 or batch_size < 1:
        raise ValueError(f"need k >= 1 and batch_size >= 1, got k={k}, batch_size={batch_size}")
    if backend is None:
        if model is None:
            raise ValueError("pass a model or a backend")
        backend = HFGenerationBackend(model, tokenizer, batch_size=batch_size)
    rewards = RewardComputer(reward_fn, timeout_s=reward_timeout_s, reward_kwargs=reward_kwargs)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)

    names = _short_names([os.fspath(f) for f in files])
    results = []
    try:
        for source, name in zip(files, names):
            examples = load_prompts(
                source, question_key, answer_key, split=split, limit=limit, template=template, tokenizer=tokenizer
            )
            if not examples:
                raise ValueError(f"{os.fspath(source)}: no questions to evaluate")
            logger.info("eval %s: %d questions x %d samples", name, len(examples), k)
            result = _evaluate_file(
                backend, tokenizer, rewards, examples, params, k, batch_size, seed, keep_completions
            )
            result.name, result.source = name, os.fspath(source)
            logger.info("eval %s: Acc@%d %.2f, Len@%d %.1f", name, k, result.acc_at_k, k, result.len_at_k)
            results.append(result)
    finally:
        rewards.close()  # its worker processes, if the reward runs in any

    config = {
        "model": getattr(getattr(model, "config", None), "name_or_path", None),
        "k": k,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "seed": seed,
        "reward": rewards.name,
        "template": template,
        "batch_size": batch_size,
        "limit": limit,
    }
    return EvalReport(results=results, config=config)


def _evaluate_file(
    backend: GenerationBackend,
    tokenizer: PreTrainedTokenizerBase,
    rewards: RewardComputer,
    examples: list[PromptExample],
    params: SamplingParams,
    k: int,
    batch_size: int,
    seed: int | None,
    keep_completions: bool,
) -> FileResult:
    # Sample j of question q is sequence q * k + j. Generating chunk by chunk and keeping only
    # text and lengths bounds memory: one whole-file Rollout for MATH500 x 16 x 20k tokens would
    # hold several GB of per-token tensors we do not need here.
    owners = [ex for ex in examples for _ in range(k)]
    completions: list[str] = []
    lengths: list[int] = []
    finished: list[bool] = []
    for chunk, start in enumerate(range(0, len(owners), batch_size)):
        chunk_params = SamplingParams(**{**vars(params), "seed": _chunk_seed(seed, chunk)})
        rollout = backend.generate([ex.prompt for ex in owners[start : start + batch_size]], chunk_params)
        chunk_lengths = rollout.response_lengths.tolist()
        ids = rollout.response_ids.tolist()
        completions += tokenizer.batch_decode([row[:n] for row, n in zip(ids, chunk_lengths)], skip_special_tokens=True)
        lengths += chunk_lengths
        finished += rollout.finished.tolist()

    batch = rewards(completions, owners)
    accuracies = [min(max(s, 0.0), 1.0) for s in batch.scores]
    questions = []
    for q, ex in enumerate(examples):
        part = slice(q * k, (q + 1) * k)
        questions.append(
            QuestionResult(
                index=ex.index,
                question=ex.question,
                answer=ex.answer,
                scores=batch.scores[part],
                accuracies=accuracies[part],
                lengths=lengths[part],
                finished=finished[part],
                completions=completions[part] if keep_completions else None,
            )
        )

    per_question = np.array([q.accuracy for q in questions], dtype=np.float64)
    n = len(questions)
    return FileResult(
        name="",
        source="",
        num_questions=n,
        k=k,
        acc_at_k=100.0 * float(np.mean(accuracies)),
        len_at_k=float(np.mean(lengths)),
        std_err=100.0 * float(per_question.std(ddof=1)) / math.sqrt(n) if n > 1 else None,
        pass_at_k=100.0 * sum(max(q.accuracies) >= 1.0 for q in questions) / n,
        num_reward_errors=batch.num_errors + batch.num_timeouts + batch.num_invalid,
        num_truncated=finished.count(False),
        questions=questions,
    )


def _chunk_seed(seed: int | None, chunk: int) -> int | None:
    """An independent seed for each chunk: `mix_seed(seed, chunk)`, the run-wide seed mixer (not
    `seed + chunk`, so that seeds 0 and 1 do not share streams shifted by one chunk)."""
    if seed is None:
        return None
    return mix_seed(seed, chunk)


def _short_names(sources: list[str]) -> list[str]:
    """File names without extension for the table; the full source where two would collide."""
    stems = []
    for s in sources:
        base = Path(s.rstrip("/\\")).name
        for ext in (".jsonl", ".json", ".parquet"):
            if base.lower().endswith(ext):
                base = base[: -len(ext)]
                break
        stems.append(base or s)
    return [stem if stems.count(stem) == 1 else src for stem, src in zip(stems, sources)]


# ---------------------------------------------------------------------------- output


def evaluate_with_run_config(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cfg, backend: GenerationBackend | None = None
) -> EvalReport:
    """Acc@k / Len@k on `cfg.data.eval_files` with a run's own settings (`cfg`: a `forkrl.config.Config`):
    k = `trainer.eval_samples`, the rollout temperature and length limit, the reward, the data keys
    and template, and the run's seed. The trainer's eval steps and a sweep's final evaluation both
    call it, so they sample with the same seeds. `trainer.eval_reward`, when set, scores instead."""
    return evaluate_model(
        model,
        tokenizer,
        cfg.data.eval_files,
        k=cfg.trainer.eval_samples,
        max_new_tokens=cfg.trainer.eval_max_new_tokens or cfg.rollout.max_new_tokens,
        temperature=cfg.rollout.temperature,
        reward_fn=cfg.trainer.eval_reward or cfg.reward.function,
        question_key=cfg.data.question_key,
        answer_key=cfg.data.answer_key,
        template=cfg.data.template,
        batch_size=cfg.rollout.generation_batch_size,
        seed=cfg.seed,
        reward_timeout_s=cfg.reward.timeout_s,
        reward_kwargs=None if cfg.trainer.eval_reward else cfg.reward.kwargs,
        backend=backend,
    )


def write_eval_report(report: EvalReport, out_dir: str | os.PathLike, include_details: bool = True) -> Path:
    """Write `eval.json` (with per-question details unless disabled) and `eval.md` into `out_dir`.

    Each file is written to a temporary file in `out_dir` and then renamed over the target, so a
    reader never sees a half-written report and a crash leaves the previous one intact.
    Returns `out_dir`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "eval.json", report.to_json(include_details))
    atomic_write_text(out / "eval.md", report.to_markdown())
    return out


# ---------------------------------------------------------------------------- CLI


class EvalInputError(UserError):
    """A `forkrl eval` argument that cannot work; the message names the option and the value."""


def _check_eval_inputs(
    model: str,
    data: Sequence[str],
    k: int,
    max_new_tokens: int,
    out: str | None,
    temperature: float,
    top_p: float,
    reward: str | RewardFn,
    batch_size: int,
    limit: int | None,
    question_key: str,
    answer_key: str,
    template: str,
    split: str,
):
    """Everything that can be checked before the model loads; returns the tokenizer."""
    from forkrl.models.loading import check_model_source, load_tokenizer

    for name, value, ok, expected in (
        ("-k", k, k >= 1, ">= 1 sample per question"),
        ("--max-new-tokens", max_new_tokens, max_new_tokens >= 1, ">= 1"),
        ("--batch-size", batch_size, batch_size >= 1, ">= 1"),
        ("--temperature", temperature, math.isfinite(temperature) and temperature > 0, "> 0"),
        ("--top-p", top_p, 0 < top_p <= 1, "in (0, 1]"),
        ("--limit", limit, limit is None or limit >= 1, ">= 1 question"),
    ):
        if not ok:
            raise EvalInputError(f"{name} {value}: expected {expected}")
    if not data:
        raise EvalInputError("--data: give at least one benchmark file")
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise EvalInputError(f"--out {out!r}: is a file; expected a directory for eval.json and eval.md")
    if out is not None:
        check_writable(out, "--out")  # now, not after the evaluation
    for source in data:
        looks_local = source.endswith((".jsonl", ".json", ".parquet")) or os.sep in source or source.startswith(".")
        if looks_local and not os.path.exists(source):
            raise EvalInputError(f"--data {source!r}: file not found")
    try:
        RewardComputer(reward).close()  # imports it: a bad spec fails now, not after sampling
    except ValueError as err:
        raise EvalInputError(f"--reward {reward!r}: {str(err).removeprefix(f'reward {reward!r}: ')}") from err
    try:
        tokenizer = load_tokenizer(check_model_source(model))
    except (OSError, ValueError) as err:  # OSError: what transformers raises for a missing Hub repo
        raise EvalInputError(f"--model {model!r}: {err}") from err
    for source in data:
        # Read once here, so a bad row is reported before the model loads (files are small).
        try:
            rows = load_prompts(source, question_key, answer_key, split=split, limit=limit, template=template,
                                tokenizer=tokenizer)  # fmt: skip
        except PromptDataError:
            raise
        except ValueError as err:  # the template
            raise EvalInputError(f"--template {template!r}: {err}") from err
        if not rows:
            raise EvalInputError(f"--data {source!r}: no questions to evaluate")
    return tokenizer


def run_eval_command(
    model: str,
    data: Sequence[str],
    k: int = 16,
    max_new_tokens: int = PAPER_MAX_RESPONSE_LENGTH,
    out: str | None = None,
    temperature: float = 1.0,
    seed: int | None = 0,
    reward: str | RewardFn = "math",
    question_key: str = "question",
    answer_key: str = "answer",
    template: str = "paper",
    batch_size: int = 64,
    limit: int | None = None,
    dtype: str = "auto",
    device: str | None = None,
    top_p: float = 1.0,
    split: str = "test",
    backend: str = "hf",
) -> EvalReport:
    """`forkrl eval`: check the inputs, load `model` with `load_policy`, evaluate `data`, print the
    markdown table, and write `eval.json` / `eval.md` into `out` when given (an `out` that already
    holds files is moved aside to `OUT.old-<time>` first, never overwritten). `backend`: the
    generation backend (`hf`, or `vllm`: an engine loaded with the model's weights)."""
    from forkrl.models.loading import load_policy
    from forkrl.rollout.registry import build_standalone_backend, close_backend, get_backend, missing_package

    _check_eval_inputs(model, data, k, max_new_tokens, out, temperature, top_p, reward, batch_size, limit,
                       question_key, answer_key, template, split)  # fmt: skip
    try:
        get_backend(backend)
    except ValueError as err:
        raise EvalInputError(f"--backend {backend!r}: {err}") from err
    if missing_package(backend):
        raise EvalInputError(f"--backend {backend!r}: {missing_package(backend)}")
    try:
        policy, tokenizer = load_policy(model, dtype=dtype, device=device)
    except (OSError, ValueError) as err:
        raise EvalInputError(f"--model {model!r}: {err}") from err
    engine = None
    if backend != "hf":
        engine = build_standalone_backend(
            backend, policy, tokenizer, next(policy.parameters()).device, batch_size, seed=seed or 0
        )
    fast_paths.reset()
    from forkrl.models import precision

    try:
        with precision.autocast(dtype, next(policy.parameters()).device):  # `auto`: bf16 autocast on CUDA
            report = evaluate_model(
                policy,
                tokenizer,
                list(data),
                k=k,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                reward_fn=reward,
                question_key=question_key,
                answer_key=answer_key,
                template=template,
                batch_size=batch_size,
                seed=seed,
                limit=limit,
                split=split,
                backend=engine,
            )
    finally:
        if engine is not None:
            close_backend(engine)
    report.config["model"] = model
    report.config["backend"] = backend
    report.config["fast_paths"] = fast_paths.status()  # which speed-ups ran; a declined one is also warned
    print(report.to_markdown(), end="")
    errors = sum(r.num_reward_errors for r in report.results)
    if errors:
        print(f"note: {errors} samples scored 0 because the reward failed (see the log)")
    if out is not None:
        with fresh_output_dir(out):
            write_eval_report(report, out)
        print(f"wrote {Path(out) / 'eval.json'} and {Path(out) / 'eval.md'}")
    return report
