"""Token selection as one part: which tokens of a micro-batch carry the policy gradient, and how
many the whole optimizer step keeps (the `kept-tokens` normalizer's denominator).

Two registries meet here:

- *strategies* (`forkrl.ops.selection.register_strategy`): what a strategy ranks by (`entropy`,
  `grad_norm` or nothing) and how many tokens it keeps;
- *scopes* (`register_scope` below): which tokens are ranked together. `microbatch` ranks each
  micro-batch alone (the authors' per-device code), `batch` the optimizer step's tokens on this
  process, `global` the optimizer step's tokens on all processes (TRL). A scope says how the
  step's kept count follows from the token counts, and whether it must rank the whole mini-batch
  before the first backward.

The trainer asks `TokenSelector.for_mini_batch(...)` once per mini-batch and then
`MiniBatchSelection.kept(...)` for each micro-batch; it never branches on scope or strategy.

Which scores a strategy ranks by (`selection.entropy_source`):

- `current`: π_θ as it is when the tokens are ranked. A micro-batch scope uses the update's own
  forward pass. A mini-batch scope ranks before the first backward, so it needs π_θ's scores of
  the whole mini-batch: while no optimizer step has happened since the old-policy pass, those
  *are* the old-policy scores (the same weights), otherwise one no-grad pass computes them;
- `old`: π_old's scores from the old-policy pass (with exactly one update per batch there is no
  such pass and π_old = π_θ, so the current scores are the old ones).

A strategy that needs nothing (`all`, `random`) never causes a scoring pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from forkrl.metrics import MetricSums
from forkrl.ops.selection import STRATEGIES, num_selected, select_tokens

ENTROPY_SOURCES = ("current", "old")


@dataclass
class TokenScores:
    """Per-token values a strategy may rank by, `[B, T]` each (None when not computed)."""

    entropy: torch.Tensor | None = None
    grad_norm: torch.Tensor | None = None

    def rows(self, s: slice) -> TokenScores:
        return TokenScores(*(None if t is None else t[s] for t in (self.entropy, self.grad_norm)))


# ------------------------------------------------------------------------------------ scopes


class SelectionScope:
    """How a scope ranks and counts. Subclass, set the class attributes, register with
    `@register_scope(name)`."""

    ranks_mini_batch: bool = False
    """True: the kept mask of the whole mini-batch is fixed before its first backward."""
    across_processes: bool = False
    """True: ranking and counting span every process of the data-parallel group."""

    def local_kept(self, per_micro_tokens: Sequence[int], strategy: str, ratio: float) -> int:
        """This process's part of the step's kept count (summed over processes afterwards)."""
        raise NotImplementedError

    def total_kept(self, summed_local: float, total_tokens: int, strategy: str, ratio: float) -> float:
        """The step's kept count from the summed local parts and the global token count."""
        return summed_local


SCOPES: dict[str, SelectionScope] = {}


def register_scope(name: str) -> Callable[[type[SelectionScope]], type[SelectionScope]]:
    def add(cls: type[SelectionScope]) -> type[SelectionScope]:
        SCOPES[name] = cls()
        return cls

    return add


@register_scope("microbatch")
class MicroBatchScope(SelectionScope):
    def local_kept(self, per_micro_tokens, strategy, ratio):
        return sum(num_selected(n, ratio, strategy) for n in per_micro_tokens)


@register_scope("batch")
class BatchScope(SelectionScope):
    ranks_mini_batch = True

    def local_kept(self, per_micro_tokens, strategy, ratio):
        return num_selected(sum(per_micro_tokens), ratio, strategy)


@register_scope("global")
class GlobalScope(SelectionScope):
    ranks_mini_batch = True
    across_processes = True

    def local_kept(self, per_micro_tokens, strategy, ratio):
        return 0

    def total_kept(self, summed_local, total_tokens, strategy, ratio):
        return float(num_selected(total_tokens, ratio, strategy))


def get_scope(name: str) -> SelectionScope:
    if name not in SCOPES:
        raise ValueError(f"unknown selection scope {name!r}; expected one of {tuple(SCOPES)}")
    return SCOPES[name]


# --------------------------------------------------------------------------------- selector


class TokenSelector:
    """The run's selection settings; makes one `MiniBatchSelection` per mini-batch."""

    def __init__(self, strategy: str, ratio: float, scope: str, entropy_source: str, group=None):
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown selection strategy {strategy!r}; valid: {sorted(STRATEGIES)}")
        if entropy_source not in ENTROPY_SOURCES:
            raise ValueError(f"unknown entropy_source {entropy_source!r}; expected one of {ENTROPY_SOURCES}")
        self.strategy, self.ratio, self.entropy_source = strategy, ratio, entropy_source
        self.needs = STRATEGIES[strategy].needs
        self.scope = get_scope(scope)
        self.group = group if self.scope.across_processes else None

    @property
    def selects_all(self) -> bool:
        """Every candidate token is kept (`all`, or `span` over the span's tokens)."""
        return self.strategy in ("all", "span")

    def needs_old_grad_norm(self) -> bool:
        """The old-policy pass must return gradient norms (`gradient` ranks by them)."""
        return self.needs == "grad_norm"

    def forward_returns_grad_norm(self, have_old: bool) -> bool:
        """The update's own forward must return gradient norms: it is what a micro-batch scope
        ranks by, with the current policy as the source."""
        return self.needs == "grad_norm" and not self.scope.ranks_mini_batch and self._uses_current(have_old)

    def _uses_current(self, have_old: bool) -> bool:
        return self.entropy_source == "current" or not have_old

    def for_mini_batch(
        self,
        candidates: torch.Tensor,
        old: TokenScores | None,
        old_is_current: bool,
        score_current: Callable[[], TokenScores],
        generator: torch.Generator | None,
        stats: MetricSums,
        narrowed: bool = False,
    ) -> MiniBatchSelection:
        """The selection of one mini-batch.

        candidates: `[rows, T]` the tokens that may be kept: the mini-batch's response tokens, or
            with `narrowed` a region of them (`selection.region`, `forkrl.algo.spans`).
        old: the old-policy pass's scores of these rows (None without that pass).
        old_is_current: no optimizer step has happened since the old-policy pass.
        score_current: a no-grad pass over the mini-batch (called only if a mini-batch scope
            needs π_θ's scores that `old` cannot stand in for).
        """
        mask = None
        if self.scope.ranks_mini_batch and not self.selects_all:
            scores = TokenScores()
            if self.needs is not None:
                reuse = old is not None and (not self._uses_current(True) or old_is_current)
                scores = old if reuse else score_current()
            chosen = self._select(scores, candidates, self.group, generator)
            add_selection_stats(stats, chosen)
            mask = chosen.mask
        return MiniBatchSelection(self, candidates, old, mask, generator, stats, narrowed)

    def _select(self, scores: TokenScores, candidates, group, generator):
        return select_tokens(
            scores.entropy, candidates, self.strategy, self.ratio, group=group, generator=generator,
            grad_norm=scores.grad_norm,
        )  # fmt: skip


class MiniBatchSelection:
    """Kept masks of one mini-batch's micro-batches (`kept`), in the order they are trained."""

    def __init__(self, selector, candidates, old, mask, generator, stats, narrowed=False):
        self.selector, self.candidates, self.old = selector, candidates, old
        self.mask, self.generator, self.stats, self.narrowed = mask, generator, stats, narrowed

    def kept(self, rows: slice, current: TokenScores) -> torch.Tensor | None:
        """The kept mask of the micro-batch at `rows` (relative to the mini-batch); `current`: the
        update forward's scores of those rows. None means every response token (`all`)."""
        sel = self.selector
        if self.mask is not None:
            return self.mask[rows]
        if sel.selects_all:
            return self.candidates[rows].bool() if self.narrowed else None
        use_current = sel._uses_current(self.old is not None)
        scores = current if use_current else self.old.rows(rows)
        if sel.needs is None:
            # Nothing to rank by; the update's entropies still feed the statistics.
            scores = TokenScores(entropy=current.entropy)
        chosen = sel._select(scores, self.candidates[rows], None, self.generator)
        add_selection_stats(self.stats, chosen)
        return chosen.mask


def add_selection_stats(stats: MetricSums, chosen) -> None:
    """`entropy_threshold`: the k-th entropy of `top`/`bottom` (left out for the others)."""
    thr = chosen.threshold
    ok = ~torch.isnan(thr)
    stats.add("entropy_threshold", torch.where(ok, thr, torch.zeros_like(thr)), ok.float())
