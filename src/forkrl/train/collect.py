"""Steps 1–3 of the recipe: sample responses, score them, filter groups, compute advantages.

`BatchCollector.collect` returns the step's `StepBatch` for this process (in a `Collected`, with the
time sampling and scoring took): G contiguous responses per prompt, their task scores, shaped
rewards and advantages. With dynamic sampling (DAPO) it drops groups whose task scores are all
equal and samples more prompts until every process has its quota of groups or
`rollout.max_sampling_rounds` run out; all processes then train on the same number of groups (the
fewest any of them has), as they must step together.

Row seeds: each response's seed is `mix_seed(seed, global prompt position, response index)`, so
the same prompt draw gets the same responses on any number of processes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from forkrl.algo.advantages import compute_advantages
from forkrl.algo.spans import selection_region, span_token_mask
from forkrl.config import Config
from forkrl.distributed import reduce_scalars
from forkrl.metrics import MetricSums
from forkrl.rollout.base import GenerationBackend, Rollout, SamplingParams
from forkrl.seeding import mix_seed
from forkrl.tasks.data import PromptExample, PromptSampler
from forkrl.tasks.shaping import accuracy_of, shape_rewards
from forkrl.train.context import TrainContext
from forkrl.train.inputs import TrainingInputs


class RewardFailures(RuntimeError):
    """More than `reward.max_failed_fraction` of a step's reward calls failed (the message says which)."""


@dataclass
class StepBatch:
    """The responses one process trains on in one step (groups of G contiguous rows)."""

    rollout: Rollout
    examples: list[PromptExample]
    """One per response row."""
    task_scores: torch.Tensor
    """`[N]` reward function scores (accuracy for 0/1 verifiers)."""
    rewards: torch.Tensor
    """`[N]` task score + overlong shaping: what the advantages are computed from."""
    advantages: torch.Tensor
    """`[N]`."""
    candidates: torch.Tensor | None = None
    """`[N, R]` bool: the response tokens the selection may pick when `selection.region` narrows
    it to a span of the text (`forkrl.algo.spans`); None: every response token."""


def select_rows(ro: Rollout, idx: torch.Tensor) -> Rollout:
    """The rollout's rows `idx` (fields that are None stay None)."""
    parts = {}
    for f in fields(ro):
        t = getattr(ro, f.name)
        parts[f.name] = None if t is None else t[idx.to(t.device)]
    return Rollout(**parts)


@dataclass
class Collected:
    """What `BatchCollector.collect` returns for one step."""

    batch: StepBatch | None
    """This process's batch; None when no process has a trainable group."""
    generate_s: float
    """Seconds spent sampling responses (all rounds)."""
    reward_s: float
    """Seconds spent decoding and scoring them."""


class BatchCollector:
    """Samples and scores the step's batch (see the module docstring). Owns the prompt sampler
    (`sampler`, whose position the trainer checkpoints). `row_seeds`: the backend takes a seed per
    response row (`BackendCapabilities.row_seeds`)."""

    def __init__(
        self, cfg: Config, ctx: TrainContext, inputs: TrainingInputs, backend: GenerationBackend, *, row_seeds: bool
    ):
        self.cfg, self.ctx, self.backend, self.row_seeds = cfg, ctx, backend, row_seeds
        self.tokenizer, self.rewarder, self.examples = inputs.tokenizer, inputs.rewarder, inputs.examples
        self.sampler = PromptSampler(len(inputs.examples), cfg.seed, ctx.rank, ctx.world)
        self.region = selection_region(cfg.selection)

    def sample_round(self) -> tuple[Rollout, list[PromptExample]]:
        """One round: the next prompts of this process, G responses each."""
        cfg, ctx = self.cfg.rollout, self.ctx
        g = cfg.group_size
        cursor = self.sampler.state_dict()
        start = cursor["epoch"] * cursor["num_prompts"] + cursor["position"]
        indices = self.sampler.next_batch(ctx.round_prompts_per_rank)
        # Global stream position of each prompt: the same prompt draw gets the same seeds on any
        # number of processes, which makes runs independent of the data-parallel split.
        positions = [start + ctx.rank + i * ctx.world for i in range(len(indices))]
        examples = [self.examples[i] for i in indices for _ in range(g)]
        seeds = [mix_seed(self.cfg.seed, pos, j) for pos in positions for j in range(g)]
        params = SamplingParams(
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            entropy_temperature=tuple(cfg.entropy_temperature) if cfg.entropy_temperature else None,
            row_seeds=seeds if self.row_seeds else None,
            seed=None if self.row_seeds else mix_seed(self.cfg.seed, start, ctx.rank),
        )
        return self.backend.generate([ex.prompt for ex in examples], params), examples

    def collect(self, step: int, stats: MetricSums, on_first_round: Callable | None = None) -> Collected:
        """Step `step`'s batch and the time it took; its metrics go to `stats`. `on_first_round(rows)`
        receives the first round's samples as dicts (prompt, completion, answer, score, reward)."""
        cfg, g, quota = self.cfg, self.cfg.rollout.group_size, self.ctx.prompts_per_rank
        kept: list[tuple] = []  # (rollout, examples, task scores, shaped rewards, candidates) per round
        num_kept_groups = calls = failed = 0
        generate_s = reward_s = 0.0
        first_failure = None
        for round_index in range(cfg.rollout.max_sampling_rounds):
            t0 = time.perf_counter()
            rollout, examples = self.sample_round()
            generate_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            texts = self.tokenizer.batch_decode(rollout.response_ids, skip_special_tokens=True)
            scored = self.rewarder(texts, examples)
            reward_s += time.perf_counter() - t0
            calls, failed = calls + len(texts), failed + scored.num_failed
            first_failure = first_failure or scored.first_failure
            # Checked every round: a broken reward stops the run before another generation.
            self._check_reward_failures(step, failed, calls, first_failure)
            task = torch.tensor(scored.scores, dtype=torch.float32)
            shaped = shape_rewards(task, rollout.response_lengths.cpu(), cfg.rollout.max_new_tokens, cfg.reward)
            informative = self._add_round_stats(stats, rollout, scored, task, shaped)
            candidates = self._region(rollout, stats)
            if round_index == 0 and on_first_round is not None:
                n = min(cfg.trainer.log_samples, len(texts))
                on_first_round([_sample_row(examples[i], texts[i], task[i], shaped[i]) for i in range(n)])
            keep_groups = informative if cfg.rollout.dynamic_sampling else torch.ones_like(informative)
            rows = keep_groups.repeat_interleave(g)
            if rows.any():
                idx = rows.nonzero().squeeze(1)
                region = None if candidates is None else candidates[idx]
                kept.append(
                    (select_rows(rollout, idx), [examples[i] for i in idx.tolist()], task[idx], shaped[idx], region)
                )
                num_kept_groups += int(keep_groups.sum())
            if not cfg.rollout.dynamic_sampling:
                break
            # Every process keeps sampling until all have their quota (they must step together).
            if reduce_scalars([num_kept_groups], "min")[0] >= quota:
                break
        use_groups = int(reduce_scalars([min(num_kept_groups, quota)], "min")[0])
        stats.add("groups_trained", torch.tensor(float(use_groups)), None)
        batch = self._batch(kept, use_groups) if use_groups else None
        return Collected(batch, generate_s, reward_s)

    def _batch(self, kept, use_groups: int) -> StepBatch:
        g = self.cfg.rollout.group_size
        rollout = Rollout.cat([k[0] for k in kept], self.tokenizer.pad_token_id)
        rows = torch.arange(use_groups * g)
        examples = [ex for k in kept for ex in k[1]][: use_groups * g]
        task = torch.cat([k[2] for k in kept])[rows]
        shaped = torch.cat([k[3] for k in kept])[rows]
        rollout = select_rows(rollout, rows)
        candidates = None
        if self.region is not None:
            width = rollout.response_ids.shape[1]
            padded = [torch.nn.functional.pad(k[4], (0, width - k[4].shape[1])) for k in kept]
            candidates = torch.cat(padded)[rows].to(self.ctx.device)
        adv = compute_advantages(shaped, g, self.cfg.advantage.estimator, self.cfg.advantage.std_eps)
        device = self.ctx.device
        return StepBatch(rollout.to(device), examples, task, shaped, adv.advantages.to(device), candidates)

    def _add_round_stats(self, stats: MetricSums, rollout: Rollout, scored, task, shaped) -> torch.Tensor:
        """Statistics of everything sampled in one round (before filtering), as DAPO reports them;
        returns which groups are informative (their task scores are not all equal)."""
        lengths = rollout.response_lengths.cpu()
        stats.add("reward", shaped.sum(), len(shaped))
        stats.add("accuracy", accuracy_of(task).sum(), len(task))
        stats.add("response_length", lengths.float().sum(), len(lengths))
        stats.add("response_clip_frac", (~rollout.finished.cpu()).float().sum(), len(lengths))
        # Responses the reward scored by its invalid-format rule (no parseable answer): scored, not failed.
        stats.add("reward_invalid_format", torch.tensor(float(scored.num_invalid_format)), len(task))
        stats.add("reward_errors", torch.tensor(float(scored.num_errors + scored.num_invalid)), None)
        stats.add("reward_timeouts", torch.tensor(float(scored.num_timeouts)), None)
        grouped = task.view(-1, self.cfg.rollout.group_size)
        informative = ~(grouped == grouped[:, :1]).all(dim=1)
        stats.add("groups_zero_variance", (~informative).float().sum(), None)
        stats.add("groups_sampled", torch.tensor(float(len(informative))), None)
        stats.add("sampling_rounds", torch.tensor(1.0 / self.ctx.world), None)
        return informative

    def _region(self, rollout: Rollout, stats: MetricSums) -> torch.Tensor | None:
        """The tokens of `selection.region` in this round's responses (None for every token)."""
        if self.region is None:
            return None
        mask, counts = span_token_mask(
            self.tokenizer, rollout.response_ids, rollout.response_mask, self.cfg.selection.span_pattern, self.region
        )
        stats.add("span_found_frac", torch.tensor(counts["span_found"]), rollout.batch_size)
        stats.add("span_offset_fallback_rows", torch.tensor(counts["span_offset_fallback_rows"]), None)
        return mask.cpu()

    def _check_reward_failures(self, step: int, failed: int, calls: int, example: str | None) -> None:
        """Stop when more than `reward.max_failed_fraction` of this step's reward calls failed
        (summed over processes): a reward that is broken trains on nothing but zeros."""
        failed_all, calls_all = (int(x) for x in reduce_scalars([failed, calls], "sum"))
        limit = self.cfg.reward.max_failed_fraction
        if calls_all and failed_all > limit * calls_all:
            shown = example or "(the failing calls ran on another process; see its log)"
            raise RewardFailures(
                f"reward {self.cfg.reward.function!r}: {failed_all} of {calls_all} calls failed in step "
                f"{step} (more than reward.max_failed_fraction = {limit:g}); for example, {shown}"
            )


def _sample_row(example: PromptExample, text: str, score: torch.Tensor, reward: torch.Tensor) -> dict:
    return {
        "prompt": example.prompt,
        "completion": text,
        "answer": example.answer,
        "score": float(score),
        "reward": float(reward),
    }
