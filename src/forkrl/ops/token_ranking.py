"""Token ranking kernels: keep the top k response tokens by entropy (or another per-token value).

These are the tensor operations of token selection; `forkrl.algo.selection` decides, per scope,
which tokens are ranked together and how many the optimizer step keeps.

This is the indicator 1[H_i,t >= tau_rho] of the forking-token objective (paper 1, Eq. 6):
keep the top-rho fraction of valid response tokens by entropy, and the controls the paper
and its referee ask for (all tokens, the bottom fraction, a random fraction of equal size),
plus `gradient`: the top-rho fraction by the norm of the sampled token's log-prob gradient
with respect to the logits, ‖e_y − p‖₂ / T (GMTS's ranking; computed by the fused log-prob op,
`forkrl.ops.logprobs`, and passed in as `grad_norm`), exact-k with the same radix select.

Choices fixed here, because the paper leaves them implicit:

- *Exactly* k = ceil(rho * N) tokens are kept (top-k, like the authors' code), not "every
  token at or above a quantile", so ties at the threshold never inflate the count. Among
  equal entropies the earlier token in row-major order wins, for top and bottom alike.
- k is computed with decimal arithmetic on the ratio as written (`num_selected`), so
  rho = 0.55, N = 100 keeps 55 tokens, not the 56 that float `ceil(0.55 * 100)` gives
  (0.55 * 100 = 55.00000000000001 in binary floating point). The
  authors' code uses `int(N * rho + 0.9999)`; it agrees with this except where the exact
  fractional part of rho * N is in (0, 1e-4] (it then rounds down), which needs unusual
  ratios such as 1e-5.
- Scope is the caller's: ranking happens within the tensor it is given. Pass one
  micro-batch for the authors' per-device scope; pass `group` for TRL's whole-batch
  scope across data-parallel ranks, which selects exactly as if every rank's `[B, T]`
  tensor were concatenated along dim 0 in rank order, without gathering the entropies.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal

import torch
import torch.distributed as dist

from forkrl.distributed import all_gather_scalars, all_reduce_sum, is_distributed, rank
from forkrl.registry import Registry

__all__ = [
    "STRATEGIES",
    "RankGroup",
    "Strategy",
    "TokenSelection",
    "num_selected",
    "register_strategy",
    "select_tokens",
    "top_k_by_key",
]


@dataclass
class TokenSelection:
    """The tokens a strategy kept, plus statistics a trainer can accumulate without host syncs.

    With `group` the counts and means are over all ranks; the mask is always this rank's.
    """

    mask: torch.Tensor
    """(B, T) bool: True for kept tokens; always False on padding."""
    threshold: torch.Tensor
    """() fp32: the k-th entropy, i.e. the smallest kept entropy for `top`, the largest kept
    for `bottom` (strategies registered with `reports_threshold`); NaN for the others (`all`,
    `random`, `gradient`, which ranks by another value) and when nothing is kept."""
    num_kept: torch.Tensor
    """() int64: k, the number of kept tokens."""
    num_valid: torch.Tensor
    """() int64: N, the number of valid (non-padding) tokens."""
    kept_fraction: torch.Tensor
    """() fp32: k / N (0 when N = 0)."""
    mean_entropy_kept: torch.Tensor
    """() fp32: mean entropy of the kept tokens (0 when none)."""
    mean_entropy_all: torch.Tensor
    """() fp32: mean entropy of all valid tokens (0 when none)."""


def num_selected(num_valid: int, ratio: float, strategy: str) -> int:
    """How many tokens `strategy` keeps out of `num_valid` (its registered `keeps` rule): N for
    `all`, else ceil(ratio * N) for the built-in strategies.

    Exact: the ratio is read as the decimal it is written as (`repr`), so 0.55 * 100 -> 55.
    The loss normalizer uses this to know the kept count from token counts alone.
    """
    keeps = STRATEGIES.get(strategy).keeps
    _check_ratio(ratio)
    if num_valid < 0:
        raise ValueError(f"num_valid must be >= 0, got {num_valid}")
    return keeps(num_valid, ratio)


def ceil_fraction(num_valid: int, ratio: float) -> int:
    """ceil(ratio * N) with the ratio read as the decimal it is written as."""
    # float(ratio) first so that numpy scalars, whose repr is "np.float64(0.2)", work too
    return math.ceil(Decimal(repr(float(ratio))) * num_valid)


def every_token(num_valid: int, ratio: float) -> int:
    return num_valid


# --------------------------------------------------------------------------- the registry

SelectFn = Callable[["torch.Tensor | None", torch.Tensor, int, "RankGroup", "torch.Generator | None"], tuple]
"""(values (B, T) fp32 or None, valid (B, T) bool, k >= 1, group, generator) -> (mask, threshold)."""


@dataclass(frozen=True)
class Strategy:
    """A registered selection strategy: everything the rest of forkrl asks of one.

    What it ranks by, how many it keeps, whether it keeps every candidate, and how it picks them.
    """

    name: str
    ranks_by: str | None
    """The per-token values it ranks by: `entropy`, `grad_norm` (‖∂ log π(o_t)/∂z_t‖₂, from the
    fused op's `return_grad_norm`) or None (it needs no forward pass: `all`, `random`)."""
    keeps: Callable[[int, float], int]
    """(N valid tokens, ratio) -> k kept: exact, so the loss normalizer knows k from counts alone."""
    select: SelectFn
    keeps_all: bool = False
    """Every candidate token is kept (`all`; `span` over the span's tokens): nothing is ranked."""
    reports_threshold: bool = False
    """Whether the k-th value is an entropy threshold worth logging (`top`, `bottom`)."""
    region: str | None = None
    """The region of the response (`selection.region`, `forkrl.algo.spans`) the strategy always
    picks within (`span`: the span), or None for any region."""


STRATEGIES: Registry[Strategy] = Registry("selection strategy")
RANKS_BY = ("entropy", "grad_norm", None)


def register_strategy(
    name: str,
    ranks_by: str | None = "entropy",
    keeps: Callable[[int, float], int] = ceil_fraction,
    *,
    keeps_all: bool = False,
    reports_threshold: bool = False,
    region: str | None = None,
) -> Callable[[SelectFn], SelectFn]:
    """Register `fn(values, valid, k, group, generator) -> (mask, threshold)` as strategy `name`.

    `values` holds what `ranks_by` names (None when it ranks by nothing); `valid` the tokens it may
    keep; k = `keeps(N, ratio)` >= 1 tokens must be kept over the group (use `RankGroup.sum` /
    `RankGroup.gather` for anything that spans ranks, or `top_k_by_key` for an exact top-k). The
    other fields are those of `Strategy`.
    """
    if ranks_by not in RANKS_BY:
        raise ValueError(f"strategy {name!r}: ranks_by must be one of {RANKS_BY}, got {ranks_by!r}")

    def add(fn: SelectFn) -> SelectFn:
        STRATEGIES.register(name, Strategy(name, ranks_by, keeps, fn, keeps_all, reports_threshold, region))
        return fn

    return add


def select_tokens(
    entropy: torch.Tensor | None,
    response_mask: torch.Tensor,
    strategy: str = "top",
    ratio: float = 0.2,
    *,
    group: dist.ProcessGroup | None = None,
    generator: torch.Generator | None = None,
    grad_norm: torch.Tensor | None = None,
) -> TokenSelection:
    """Select response tokens by entropy (or what else the strategy ranks by).

    Args:
        entropy: (B, T) per-token entropy, any float dtype (compared in fp32), or None for a
            strategy that does not need it (`all`, `random`; the entropy statistics are then 0).
            NaN is not supported (it would order by its bit pattern).
        response_mask: (B, T) bool or int, nonzero on the tokens that may be kept (response
            tokens, optionally narrowed further), 0 on padding.
        strategy: a registered name (`STRATEGIES`): `all` (every valid token), `top`
            (highest-entropy ceil(ratio * N)), `bottom` (lowest-entropy ceil(ratio * N)),
            `random` (ceil(ratio * N) uniformly at random: the referee's control, same count
            without entropy), `gradient` (largest `grad_norm` ceil(ratio * N), ties to the
            earlier token as for `top`).
        ratio: rho in (0, 1]; ignored by `all` but still validated.
        group: None selects within this tensor (per micro-batch / per device). A process
            group (e.g. `torch.distributed.group.WORLD`) selects over all its ranks' tensors
            at once, as if concatenated along dim 0 in rank order; every rank must call.
        generator: RNG for `random`, on the device of the mask. For a global random
            selection give each rank a differently seeded generator: the count is exact,
            but the draws differ from a single-process selection of the concatenation.
        grad_norm: (B, T) ‖∂ log π(o_t)/∂z_t‖₂ per token (`score_responses(...,
            return_grad_norm=True)`); required by `gradient`, ignored otherwise.

    Returns:
        A `TokenSelection`. Host syncs: one to read N (k must be a Python int to apply the
        decimal ceil) and one per radix pass inside `torch.bincount` (4 for top/bottom/random).
    """
    spec = STRATEGIES.get(strategy)
    _check_ratio(ratio)
    for name, t in (("entropy", entropy), ("grad_norm", grad_norm)):
        if t is not None and t.shape != response_mask.shape:
            raise ValueError(
                f"{name} and response_mask must have the same shape, got "
                f"{tuple(t.shape)} and {tuple(response_mask.shape)}"
            )
    values = {"entropy": entropy, "grad_norm": grad_norm, None: None}[spec.ranks_by]
    if spec.ranks_by is not None and values is None:
        hint = " (score_responses(return_grad_norm=True))" if spec.ranks_by == "grad_norm" else ""
        raise ValueError(f"selection strategy {strategy!r} needs {spec.ranks_by}{hint}")
    ranked = RankGroup(group)
    valid = response_mask.bool()
    # fp32 everywhere; "+ 0.0" turns -0.0 into +0.0 so that the two zeros tie, as they
    # compare equal (the bit-level keys below would otherwise put -0.0 first)
    if values is not None:
        values = values.detach().float() + 0.0

    num_valid = ranked.sum(valid.sum())  # (), int64
    k = num_selected(int(num_valid.item()), ratio, strategy)  # host sync: decimal ceil needs N

    nan = torch.full((), math.nan, device=valid.device)
    if k == 0:
        mask, threshold = torch.zeros_like(valid), nan
    else:
        mask, threshold = spec.select(values, valid, k, ranked, generator)
        if not spec.reports_threshold:
            threshold = nan

    return _with_statistics(mask, threshold, k, num_valid, entropy, valid, ranked)


def _with_statistics(mask, threshold, k: int, num_valid, entropy, valid, ranked: RankGroup) -> TokenSelection:
    """The `TokenSelection` of `mask`, with its entropy means over the group."""
    # fp64 sums so that the means of 10^8 tokens do not drift; one all-reduce for both
    # (torch.where rather than boolean indexing, which would sync on the GPU)
    if entropy is not None:
        entropy64 = entropy.detach().double() + 0.0
        sums = torch.stack([torch.where(valid, entropy64, 0.0).sum(), torch.where(mask, entropy64, 0.0).sum()])
        sum_all, sum_kept = ranked.sum(sums)
    else:
        sum_all = sum_kept = torch.zeros((), dtype=torch.float64, device=valid.device)
    num_kept = torch.tensor(k, dtype=torch.int64, device=valid.device)
    return TokenSelection(
        mask=mask,
        threshold=threshold,
        num_kept=num_kept,
        num_valid=num_valid,
        kept_fraction=(num_kept.double() / num_valid.clamp(min=1)).float(),
        mean_entropy_kept=(sum_kept / max(k, 1)).float(),
        mean_entropy_all=(sum_all / num_valid.clamp(min=1)).float(),
    )


# --------------------------------------------------------------------------- strategies

# Keys are unsigned 32-bit integers held in int64; this flips their order.
_KEY_MAX = 2**32 - 1


@register_strategy("all", ranks_by=None, keeps=every_token, keeps_all=True)
def _select_all(values, valid, k, ranked, generator):
    return valid.clone(), None


@register_strategy("top", reports_threshold=True)
def _select_top(values, valid, k, ranked, generator):
    mask, tau_key = top_k_by_key(_float_to_key(values), valid, k, ranked)
    return mask, _key_to_float(tau_key)


@register_strategy("bottom", reports_threshold=True)
def _select_bottom(values, valid, k, ranked, generator):
    # bottom-k is top-k on reversed keys; ties still go to the earlier token
    mask, tau_key = top_k_by_key(_KEY_MAX - _float_to_key(values), valid, k, ranked)
    return mask, _key_to_float(_KEY_MAX - tau_key)


@register_strategy("random", ranks_by=None)
def _select_random(values, valid, k, ranked, generator):
    # top-k on i.i.d. uniform keys is a uniform random k-subset, and reuses the exact
    # distributed top-k; key ties (rare with 32-bit keys) go deterministically by order
    keys = torch.randint(0, 2**32, valid.shape, generator=generator, device=valid.device)
    mask, _ = top_k_by_key(keys, valid, k, ranked)
    return mask, None


# top-k on the gradient norms instead of the entropies
register_strategy("gradient", ranks_by="grad_norm")(_select_top)
# every candidate token: with `selection.region=span` (implied) the tokens of a span matched on the
# decoded text (`forkrl.algo.spans`), which the caller passes in as the mask
register_strategy("span", ranks_by=None, keeps=every_token, keeps_all=True, region="span")(_select_all)


# ----------------------------------------------------------------------- exact radix select

_DIGIT_BITS = 8
_NUM_BUCKETS = 2**_DIGIT_BITS


def _float_to_key(x: torch.Tensor) -> torch.Tensor:
    """Map fp32 to int64 keys in [0, 2^32) whose integer order is the float order.

    IEEE-754 bits order positive floats like integers; negative floats are sign-magnitude,
    so their order is reversed. Positive: bits + 2^31 (upper half); negative: -1 - bits,
    where bits (as int32) is negative, which lands in [0, 2^31) with the order flipped.
    """
    bits = x.contiguous().view(torch.int32).to(torch.int64)
    return torch.where(bits >= 0, bits + 2**31, -1 - bits)


def _key_to_float(key: torch.Tensor) -> torch.Tensor:
    """Inverse of `_float_to_key`."""
    bits = torch.where(key >= 2**31, key - 2**31, -1 - key)
    return bits.to(torch.int32).view(torch.float32)


def top_k_by_key(
    keys: torch.Tensor, valid: torch.Tensor, k: int, ranked: RankGroup
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest valid keys over the group, ties to the earlier (rank, flat index).

    Args:
        keys: (B, T) int64 in [0, 2^32).
        valid: (B, T) bool.
        k: 1 <= k <= number of valid keys over the group.

    Returns:
        mask (B, T) bool with k True over the group, and tau () int64, the k-th largest key.

    Radix select: fix the key of the k-th largest one 8-bit digit at a time, from the top.
    Each pass histograms the next digit among the keys that match the digits fixed so
    far; summing histograms over ranks makes the pass global for 256 counts of traffic
    instead of gathering every entropy.
    """
    shape = valid.shape
    keys, valid = keys.flatten(), valid.flatten()
    tau = torch.zeros((), dtype=torch.int64, device=keys.device)  # digits fixed so far
    remaining = torch.tensor(k, dtype=torch.int64, device=keys.device)  # still to place
    candidates = valid
    for shift in range(32 - _DIGIT_BITS, -1, -_DIGIT_BITS):
        digit = (keys >> shift) & (_NUM_BUCKETS - 1)
        # non-candidates go to an overflow bucket instead of being dropped by boolean
        # indexing, which would add a second sync (bincount's own, on CUDA, sizes its output)
        hist = torch.bincount(torch.where(candidates, digit, _NUM_BUCKETS), minlength=_NUM_BUCKETS + 1)
        hist = ranked.sum(hist[:_NUM_BUCKETS].contiguous())
        at_or_above = hist.flip(0).cumsum(0).flip(0)  # [d] = #candidates with digit >= d
        # at_or_above is non-increasing and at_or_above[0] >= remaining, so the k-th
        # largest digit is the last d with at_or_above[d] >= remaining
        d = (at_or_above >= remaining).sum() - 1
        remaining = remaining - (at_or_above[d] - hist[d])  # candidates with a larger digit are kept
        tau = (tau << _DIGIT_BITS) | d
        candidates = candidates & (digit == d)

    # every valid key > tau is kept; `remaining` of the keys == tau are kept, first come
    # first served in (rank, flat index) order
    above = valid & (keys > tau)
    ties = valid & (keys == tau)
    num_ties = ties.sum()
    ties_per_rank = ranked.gather(num_ties)  # (world,)
    ties_before = ties_per_rank[: ranked.rank].sum()
    take_here = (remaining - ties_before).clamp(min=0, max=num_ties)
    take = ties & (ties.cumsum(0) <= take_here)
    return (above | take).view(shape), tau


class RankGroup:
    """Reductions over the tokens ranked together: this tensor alone, or every rank of `group`.

    `group=None` must stay local even when torch.distributed is initialized (per-device
    scope), which is why this does not call the helpers with the default group.
    """

    def __init__(self, group: dist.ProcessGroup | None):
        self.group = group
        self.is_global = group is not None and is_distributed(group)
        self.rank = rank(group) if self.is_global else 0

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(t, self.group) if self.is_global else t

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        return all_gather_scalars(t, self.group) if self.is_global else t.reshape(1)


def _check_ratio(ratio: float) -> None:
    ok = isinstance(ratio, numbers.Real) and not isinstance(ratio, bool) and 0 < ratio <= 1
    if not ok:  # also rejects NaN, for which every comparison is False
        raise ValueError(f"selection ratio must be in (0, 1], got {ratio!r}")
