"""Token selection as one part: which tokens of a micro-batch carry the policy gradient, and how
many the whole optimizer step keeps (the `kept-tokens` normalizer's denominator).

Two registries meet here:

- *strategies* (`forkrl.ops.token_ranking.register_strategy`): what a strategy ranks by (`entropy`,
  `grad_norm` or nothing), how many tokens it keeps, whether it keeps every candidate;
- *scopes* (`register_scope` below): which tokens are ranked together. `microbatch` ranks each
  micro-batch alone (the authors' per-device code), `batch` the optimizer step's tokens on this
  process, `global` the optimizer step's tokens on all processes (TRL). A scope says how the
  step's kept count follows from the token counts, and whether it must rank the whole mini-batch
  before the first backward.

The trainer asks `TokenSelector.for_mini_batch(...)` once per mini-batch for a `MiniBatchSelection`,
which holds the step's kept count (`num_kept`) and gives each micro-batch's kept mask (`kept`); the
trainer never branches on scope or strategy.

Which scores a strategy ranks by (`selection.entropy_source`):

- `current`: π_θ as it is when the tokens are ranked. A micro-batch scope uses the update's own
  forward pass. A mini-batch scope ranks before the first backward, so it needs π_θ's scores of
  the whole mini-batch: while no optimizer step has happened since the old-policy pass, those
  *are* the old-policy scores (the same weights), otherwise one no-grad pass computes them;
- `old`: π_old's scores from the old-policy pass (with exactly one update per batch there is no
  such pass and π_old = π_θ, so the current scores are the old ones).

A strategy that ranks by nothing (`all`, `random`) never causes a scoring pass.

Scores are any object with `entropy` and `grad_norm` fields, `[B, T]` each or None (the scorer's
`forkrl.models.scoring.ResponseScores`), with `rows(slice)` for the old-policy scores.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from forkrl.distributed import reduce_scalars
from forkrl.metrics import MetricSums
from forkrl.ops.token_ranking import STRATEGIES, Strategy, TokenSelection, num_selected, select_tokens
from forkrl.registry import Registry

ENTROPY_SOURCES = ("current", "old")

KeptCount = Callable[[int], int]
"""N candidate tokens -> k kept, for the run's strategy and ratio."""

# ------------------------------------------------------------------------------------ scopes


class SelectionScope:
    """How a scope ranks and counts. Subclass, set the class attributes, register with
    `@register_scope(name)`."""

    ranks_mini_batch: bool = False
    """True: the kept mask of the whole mini-batch is fixed before its first backward."""
    across_processes: bool = False
    """True: ranking and counting span every process of the data-parallel group."""

    def local_kept(self, per_micro_tokens: Sequence[int], keeps: KeptCount) -> int:
        """This process's part of the step's kept count (summed over processes afterwards)."""
        raise NotImplementedError

    def total_kept(self, summed_local: float, total_tokens: int, keeps: KeptCount) -> float:
        """The step's kept count from the summed local parts and the global token count."""
        return summed_local


SCOPES: Registry[SelectionScope] = Registry("selection scope")


def register_scope(name: str) -> Callable[[type[SelectionScope]], type[SelectionScope]]:
    """Register an instance of the decorated `SelectionScope` subclass as scope `name`."""

    def add(cls: type[SelectionScope]) -> type[SelectionScope]:
        SCOPES.register(name, cls())
        return cls

    return add


@register_scope("microbatch")
class MicroBatchScope(SelectionScope):
    def local_kept(self, per_micro_tokens, keeps):
        return sum(keeps(n) for n in per_micro_tokens)


@register_scope("batch")
class BatchScope(SelectionScope):
    ranks_mini_batch = True

    def local_kept(self, per_micro_tokens, keeps):
        return keeps(sum(per_micro_tokens))


@register_scope("global")
class GlobalScope(SelectionScope):
    ranks_mini_batch = True
    across_processes = True

    def local_kept(self, per_micro_tokens, keeps):
        return 0

    def total_kept(self, summed_local, total_tokens, keeps):
        return float(keeps(total_tokens))


# --------------------------------------------------------------------------------- selector


class TokenSelector:
    """The run's selection settings; makes one `MiniBatchSelection` per mini-batch.

    `group`: the data-parallel process group (None: the default one). The step's kept count is
    always summed over it; tokens are ranked across it only by a scope `across_processes`.
    """

    def __init__(self, strategy: str, ratio: float, scope: str, entropy_source: str, group=None):
        if entropy_source not in ENTROPY_SOURCES:
            raise ValueError(f"unknown entropy_source {entropy_source!r}; expected one of {ENTROPY_SOURCES}")
        self.strategy: Strategy = STRATEGIES.get(strategy)
        self.ratio, self.entropy_source = ratio, entropy_source
        self.scope = SCOPES.get(scope)
        self.group = group
        self.rank_group = group if self.scope.across_processes else None

    @property
    def old_pass_grad_norm(self) -> bool:
        """The old-policy pass must return gradient norms (the strategy ranks by them)."""
        return self.strategy.ranks_by == "grad_norm"

    def num_kept(self, candidate_masks: Sequence[torch.Tensor]) -> float:
        """The optimizer step's kept count over all processes, from its micro-batches' candidate
        masks on this process: exactly ⌈ρ·N⌉ per selection unit of the scope (one host copy and,
        with several processes, one all-reduce)."""
        per_micro = [int(n) for n in torch.stack([c.sum() for c in candidate_masks]).cpu().tolist()]

        def keeps(n: int) -> int:
            return num_selected(n, self.ratio, self.strategy.name)

        local, total = reduce_scalars([self.scope.local_kept(per_micro, keeps), sum(per_micro)], "sum", self.group)
        return self.scope.total_kept(local, int(total), keeps)

    def for_mini_batch(
        self,
        candidates: torch.Tensor,
        micro: Sequence[slice],
        old: Any | None,
        *,
        old_is_current: bool,
        score_current: Callable[[bool], Any],
        generator: torch.Generator | None,
        stats: MetricSums,
        narrowed: bool = False,
    ) -> MiniBatchSelection:
        """The selection of one mini-batch.

        candidates: `[rows, T]` the tokens that may be kept: the mini-batch's response tokens, or
            with `narrowed` a region of them (`selection.region`, `forkrl.algo.spans`).
        micro: the micro-batches' rows, relative to the mini-batch, in the order they are trained.
        old: the old-policy pass's scores of these rows (None without that pass).
        old_is_current: no optimizer step has happened since the old-policy pass.
        score_current: `score_current(grad_norm)`, a no-grad pass over the mini-batch (called only
            if a mini-batch scope needs π_θ's scores that `old` cannot stand in for).
        """
        num_kept = self.num_kept([candidates[s] for s in micro])
        uses_current = self.entropy_source == "current" or old is None
        mask = None
        if self.scope.ranks_mini_batch and not self.strategy.keeps_all:
            scores = None
            if self.strategy.ranks_by is not None:
                reuse = old is not None and (not uses_current or old_is_current)
                scores = old if reuse else score_current(self.old_pass_grad_norm)
            chosen = self._select(scores, candidates, self.rank_group, generator)
            add_selection_stats(stats, chosen)
            mask = chosen.mask
        # The update's own forward returns gradient norms when a micro-batch scope ranks by them.
        forward_grad_norm = self.old_pass_grad_norm and not self.scope.ranks_mini_batch and uses_current
        return MiniBatchSelection(
            self, candidates, num_kept, mask, old=None if uses_current else old, generator=generator, stats=stats,
            narrowed=narrowed, forward_grad_norm=forward_grad_norm,
        )  # fmt: skip

    def _select(self, scores, candidates: torch.Tensor, group, generator) -> TokenSelection:
        entropy, grad_norm = (None, None) if scores is None else (scores.entropy, scores.grad_norm)
        return select_tokens(
            entropy, candidates, self.strategy.name, self.ratio, group=group, generator=generator, grad_norm=grad_norm
        )


class MiniBatchSelection:
    """The selection of one mini-batch: the optimizer step's kept count (`num_kept`, summed over
    processes: the `kept-tokens` normalizer's denominator) and its micro-batches' kept masks
    (`kept`), asked in the order they are trained."""

    def __init__(self, selector, candidates, num_kept, mask, *, old, generator, stats, narrowed, forward_grad_norm):
        self.selector, self.candidates, self.num_kept, self.mask = selector, candidates, num_kept, mask
        self.old, self.generator, self.stats, self.narrowed = old, generator, stats, narrowed
        self.forward_grad_norm: bool = forward_grad_norm
        """The update's forward must return gradient norms (`return_grad_norm`): a micro-batch scope
        ranks by them, with the current policy as the source."""

    def kept(self, rows: slice, current) -> torch.Tensor | None:
        """The kept mask of the micro-batch at `rows` (relative to the mini-batch); `current`: the
        update forward's scores of those rows. None means every response token (`all`)."""
        sel = self.selector
        if self.mask is not None:
            return self.mask[rows]
        if sel.strategy.keeps_all:
            return self.candidates[rows].bool() if self.narrowed else None
        # A strategy that ranks by nothing takes the update's scores: its entropies feed the statistics.
        scores = current if self.old is None or sel.strategy.ranks_by is None else self.old.rows(rows)
        chosen = sel._select(scores, self.candidates[rows], None, self.generator)
        add_selection_stats(self.stats, chosen)
        return chosen.mask


def add_selection_stats(stats: MetricSums, chosen: TokenSelection) -> None:
    """`entropy_threshold`: the k-th entropy of `top`/`bottom` (left out for the others)."""
    thr = chosen.threshold
    ok = ~torch.isnan(thr)
    stats.add("entropy_threshold", torch.where(ok, thr, torch.zeros_like(thr)), ok.float())
