"""Metric accumulation without host syncs: sums and counts stay tensors until one reduction."""

from __future__ import annotations

import torch

from forkrl.distributed import all_reduce, all_reduce_sum

MetricTerms = dict[str, tuple[torch.Tensor, "torch.Tensor | None"]]
"""name -> (sum of values, number of values), 0-dim tensors; the metric is sum / count.

A count of None marks a total: the sums are added up and reported as they are (e.g. a loss
whose micro-batch parts already carry the whole-batch normalization)."""


class MetricSums:
    """Adds up `(sum, count)` pairs across micro-batches; `compute` reduces once across processes.

    Keeping both as tensors means the training loop never calls `.item()` per micro-batch;
    the only device→host copy is the single one in `compute`.

    `device`: where the sums live (the trainer's device). Values made elsewhere (counts of
    sampled groups on the CPU, a loss on the GPU) are moved here as they are added, so `compute`
    stacks tensors of one device and reduces them in one collective.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, torch.Tensor] = {}
        self._totals: set[str] = set()
        self._maxima: dict[str, torch.Tensor] = {}

    def add(self, name: str, value_sum: torch.Tensor, count: torch.Tensor | float | None) -> None:
        """Add `value_sum` over `count` values to metric `name`; count None makes `name` a total."""
        value_sum = value_sum.detach().to(self.device, torch.float64, non_blocking=True)
        if count is None:
            self._totals.add(name)
            count = 1.0
        if isinstance(count, torch.Tensor):
            count = count.detach().to(self.device, torch.float64, non_blocking=True)
        else:
            count = torch.tensor(float(count), dtype=torch.float64, device=self.device)
        if name in self._sums:
            self._sums[name] = self._sums[name] + value_sum
            self._counts[name] = self._counts[name] + count
        else:
            self._sums[name], self._counts[name] = value_sum, count

    def add_max(self, name: str, value: torch.Tensor) -> None:
        """Keep the largest `value` seen for metric `name` (reported as the max over processes)."""
        value = value.detach().to(self.device, torch.float64, non_blocking=True).reshape(())
        self._maxima[name] = torch.maximum(self._maxima[name], value) if name in self._maxima else value

    def update(self, terms: MetricTerms) -> None:
        for name, (value_sum, count) in terms.items():
            self.add(name, value_sum, count)

    def compute(self, group=None) -> dict[str, float]:
        """Mean of every metric over everything added on all processes of `group`.

        Metrics whose total count is 0 are left out rather than reported as 0 or NaN; totals
        are reported as their sum.
        """
        out = self._compute_maxima(group)
        if not self._sums:
            return out
        names = sorted(self._sums)
        stacked = torch.stack([torch.stack([self._sums[n].reshape(()), self._counts[n].reshape(())]) for n in names])
        all_reduce_sum(stacked, group)
        values = stacked.cpu().tolist()
        out.update(
            {n: (s if n in self._totals else s / c) for n, (s, c) in zip(names, values) if c > 0 or n in self._totals}
        )
        return out

    def _compute_maxima(self, group) -> dict[str, float]:
        if not self._maxima:
            return {}
        names = sorted(self._maxima)
        stacked = torch.stack([self._maxima[n] for n in names])
        all_reduce(stacked, "max", group)
        return dict(zip(names, stacked.cpu().tolist()))
