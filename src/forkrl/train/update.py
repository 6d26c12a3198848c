"""Steps 4–5 of the recipe: old-policy log-probs, then the policy-gradient updates on the kept tokens.

`PolicyUpdater.update(batch, step, stats)` returns an `UpdateResult` (the old policy's entropies,
the time of each phase) after it:

1. scores the batch with the policy as it was at sampling (π_old: log-probs, entropies, and gradient
   norms when the strategy ranks by them), except with exactly one update per batch (then
   π_old = π_θ and the update's own log-probs stand in, detached); and with the reference policy
   for the KL term when `loss.ref_kl_coef > 0`;
2. for each epoch and mini-batch: asks the selection (`forkrl.algo.selection`) for each
   micro-batch's kept mask, accumulates the normalized loss over micro-batches (gradients are
   synchronized across processes on the last one only), then takes one clipped optimizer step.

The loss denominators are sums over the whole mini-batch on all processes, so the update equals
the one-process update on the same global batch whatever the micro-batch size.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from forkrl.algo.losses import PolicyLossInput, compute_policy_loss, loss_denominators, mis_keep, mismatch_metrics
from forkrl.algo.selection import TokenSelector
from forkrl.config import Config
from forkrl.metrics import MetricSums
from forkrl.models.scoring import ResponseScores
from forkrl.rollout.base import Rollout
from forkrl.seeding import mix_seed
from forkrl.train.collect import StepBatch
from forkrl.train.context import TrainContext
from forkrl.train.optim import clipped_step
from forkrl.train.setup import PolicyModels


@dataclass
class UpdateResult:
    """What `PolicyUpdater.update` returns for one step."""

    old_entropy: torch.Tensor
    """`[N, T]` the old policy's entropies of the batch's tokens (for the entropy percentiles when
    the backend recorded no sampler entropy)."""
    old_logprobs_s: float
    """Seconds of the no-grad passes (old policy, reference)."""
    update_s: float
    """Seconds of the updates."""


@dataclass
class _StepPass:
    """What every mini-batch of one step shares."""

    batch: StepBatch
    old: ResponseScores | None
    """The old policy's scores of the batch (None on-policy: the update's own pass stands in)."""
    ref_logp: torch.Tensor | None
    loss_mask: torch.Tensor
    """`[N, T]` the tokens the loss sees (`_loss_mask`)."""
    generator: torch.Generator
    stats: MetricSums


class PolicyUpdater:
    """Runs the updates of one step (module docstring). `on_optimizer_step(taken)` is called after
    every optimizer step with whether it was taken (False: a NaN/inf gradient, skipped)."""

    def __init__(
        self,
        cfg: Config,
        ctx: TrainContext,
        models: PolicyModels,
        optimizer,
        scheduler,
        *,
        on_optimizer_step: Callable[[bool], None],
    ):
        self.cfg, self.ctx, self.models, self.optimizer, self.scheduler = cfg, ctx, models, optimizer, scheduler
        self.on_optimizer_step = on_optimizer_step
        sel = cfg.selection
        self.selector = TokenSelector(sel.strategy, sel.ratio, sel.scope, sel.entropy_source, ctx.group)

    # ------------------------------------------------------------------ scoring without gradient

    def _micro_slices(self, rows: range) -> list[slice]:
        mb = self.ctx.micro_batch_rows
        return [slice(i, min(i + mb, rows.stop)) for i in range(rows.start, rows.stop, mb)]

    @torch.no_grad()
    def score(self, scorer, ro: Rollout, rows: range, grad_norm: bool = False) -> ResponseScores:
        """The scores of `rows`, micro-batch by micro-batch, concatenated."""
        parts = []
        for s in self._micro_slices(rows):
            with self.models.autocast():
                parts.append(
                    scorer(
                        ro.prompt_ids[s],
                        ro.prompt_mask[s],
                        ro.response_ids[s],
                        ro.response_mask[s],
                        self.cfg.rollout.temperature,
                        return_grad_norm=grad_norm,
                    )  # fmt: skip
                )
        return ResponseScores.cat(parts)

    # ------------------------------------------------------------------ the updates

    def update(self, batch: StepBatch, step: int, stats: MetricSums) -> UpdateResult:
        """Train on `batch` (its metrics go to `stats`)."""
        cfg, ro = self.cfg, batch.rollout
        rows_per_mini = self.ctx.mini_batch_rows
        minis = [range(i, min(i + rows_per_mini, ro.batch_size)) for i in range(0, ro.batch_size, rows_per_mini)]
        # `mis` masks tokens by π_old/π_sampler before the loss is normalized: π_old must be known first.
        on_policy = cfg.optim.epochs == 1 and len(minis) == 1 and cfg.loss.rollout_correction != "mis"
        self.models.model.train()
        t0 = time.perf_counter()
        old = None
        if not on_policy:  # one no-grad pass of π_old
            old = self.score(self.models.policy_scorer, ro, range(ro.batch_size), self.selector.old_pass_grad_norm)
        ref_logp = None
        if self.models.ref_scorer is not None:
            ref_logp = self.score(self.models.ref_scorer, ro, range(ro.batch_size)).logprobs
        old_logprobs_s = time.perf_counter() - t0
        loss_mask = self._loss_mask(ro, None if old is None else old.logprobs, stats)

        t0 = time.perf_counter()
        generator = torch.Generator(device=self.ctx.device).manual_seed(mix_seed(cfg.seed, step, self.ctx.rank, 7))
        shared = _StepPass(batch, old, ref_logp, loss_mask, generator, stats)
        update_entropies = []
        for epoch in range(cfg.optim.epochs):
            for mini_index, rows in enumerate(minis):
                # Before the step's first optimizer step the weights are those of the old pass.
                ents = self._mini_batch(shared, rows, weights_unchanged=epoch == 0 and mini_index == 0)
                if on_policy:
                    update_entropies = ents
        update_s = time.perf_counter() - t0
        old_entropy = old.entropy if old is not None else torch.cat(update_entropies)
        return UpdateResult(old_entropy, old_logprobs_s, update_s)

    def _loss_mask(self, ro: Rollout, old_logp: torch.Tensor | None, stats: MetricSums) -> torch.Tensor:
        """`[N, T]` the response tokens the loss sees: all of them, or under `loss.rollout_correction=mis`
        those whose π_old/π_sampler lies in [1/C, C]. Logs the largest |log π_old − log π_sampler|
        when π_old is known here (on-policy, the update's own pass logs it)."""
        mask = ro.response_mask
        if old_logp is None:
            return mask
        delta = (old_logp - ro.sampler_logprobs).abs().masked_fill(mask == 0, 0.0)
        stats.add_max("rollout_mismatch_abs_max", delta.max() if delta.numel() else delta.sum())
        if self.cfg.loss.rollout_correction != "mis":
            return mask
        keep = mis_keep(old_logp, ro.sampler_logprobs, self.cfg.loss.rollout_correction_threshold)
        masked = mask * keep.to(mask.dtype)
        stats.add("rollout_mis_masked_frac", (mask - masked).sum().float(), mask.sum().float())
        return masked

    def _mini_batch(self, shared: _StepPass, rows: range, weights_unchanged: bool) -> list[torch.Tensor]:
        """Accumulate one mini-batch's loss over its micro-batches and step; returns the
        micro-batches' entropies (detached). `weights_unchanged`: no optimizer step yet this step."""
        cfg, batch, old, stats, loss_mask = self.cfg, shared.batch, shared.old, shared.stats, shared.loss_mask
        ro, old_logp = batch.rollout, None if old is None else old.logprobs
        micro = self._micro_slices(rows)
        narrowed = batch.candidates is not None  # selection.region: a span of the text
        candidates = batch.candidates * loss_mask if narrowed else loss_mask
        selection = self.selector.for_mini_batch(
            candidates[rows.start : rows.stop],
            [slice(s.start - rows.start, s.stop - rows.start) for s in micro],
            None if old is None else old.rows(slice(rows.start, rows.stop)),
            old_is_current=weights_unchanged,
            score_current=lambda grad_norm: self.score(self.models.policy_scorer, ro, rows, grad_norm),
            generator=shared.generator,
            stats=stats,
            narrowed=narrowed,
        )
        denoms = loss_denominators([loss_mask[s] for s in micro], selection.num_kept, group=self.ctx.group)
        entropies = []
        for i, s in enumerate(micro):
            # Gradients are reduced across processes only on the last micro-batch of the mini-batch.
            with self._gradient_sync(i == len(micro) - 1):
                with self.models.autocast():
                    current = self.models.scorer(
                        ro.prompt_ids[s], ro.prompt_mask[s], ro.response_ids[s], ro.response_mask[s],
                        cfg.rollout.temperature, return_grad_norm=selection.forward_grad_norm,
                    )  # fmt: skip
                kept = selection.kept(slice(s.start - rows.start, s.stop - rows.start), current)
                logp, ent = current.logprobs, current.entropy
                old_logp_s = logp.detach() if old_logp is None else old_logp[s]
                self._log_mismatch(old_logp_s, ro, s, stats, with_max=old_logp is None)
                inp = PolicyLossInput(
                    logprobs=logp,
                    old_logprobs=old_logp_s,
                    advantages=batch.advantages[s],
                    response_mask=loss_mask[s],
                    sampler_logprobs=ro.sampler_logprobs[s],
                    kept_mask=kept,
                    entropy=ent,
                    ref_logprobs=None if shared.ref_logp is None else shared.ref_logp[s],
                )
                out = compute_policy_loss(inp, cfg.loss, denoms, shared.generator)
                out.loss.backward()
            stats.update(out.metrics)
            entropies.append(ent.detach())
        self._optimizer_step(stats)
        return entropies

    def _optimizer_step(self, stats: MetricSums) -> None:
        grad_norm = clipped_step(
            self.models.trainable_parameters(), self.optimizer, self.scheduler, self.cfg.optim.grad_clip
        )
        if grad_norm is not None:
            stats.add("grad_norm", grad_norm, 1)
        else:
            stats.add("skipped_updates", torch.tensor(1.0 / self.ctx.world), None)
        self.on_optimizer_step(grad_norm is not None)

    @staticmethod
    def _log_mismatch(old_logp: torch.Tensor, ro: Rollout, s: slice, stats: MetricSums, with_max: bool) -> None:
        """The mismatch metrics of micro-batch `s` over all its response tokens (those `mis` masks
        included); the max here only when π_old comes from this pass (else `_loss_mask` logged it)."""
        stats.update(mismatch_metrics(old_logp, ro.sampler_logprobs[s], ro.response_mask[s]))
        if with_max:
            gap = (old_logp - ro.sampler_logprobs[s]).abs().masked_fill(ro.response_mask[s] == 0, 0.0)
            stats.add_max("rollout_mismatch_abs_max", gap.max() if gap.numel() else gap.sum())

    def _gradient_sync(self, last: bool):
        if self.ctx.world == 1:
            return contextlib.nullcontext()
        if self.models.sharded:
            self.models.scorer.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if last else self.models.scorer.no_sync()
