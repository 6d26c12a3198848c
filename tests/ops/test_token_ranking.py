"""Tests for forkrl.ops.token_ranking: which tokens each strategy keeps, exact k, ties, global scope."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
import torch.distributed as dist
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from forkrl.ops.token_ranking import (
    TokenSelection,
    _float_to_key,
    _key_to_float,
    num_selected,
    select_tokens,
)
from tests.dist_utils import run_distributed


def _reference_select(entropy: torch.Tensor, mask: torch.Tensor, strategy: str, ratio: float):
    """Top/bottom-k by a stable sort: the obviously-correct (and gather-everything) way."""
    flat = entropy.float().flatten()
    idx = mask.bool().flatten().nonzero().squeeze(1)
    k = num_selected(idx.numel(), ratio, strategy)
    # stable=True keeps equal entropies in index order, i.e. the earlier token wins
    order = torch.sort(flat[idx], descending=(strategy == "top"), stable=True).indices
    out = torch.zeros_like(flat, dtype=torch.bool)
    out[idx[order[:k]]] = True
    threshold = flat[idx[order[k - 1]]] if k else torch.tensor(math.nan)
    return out.view(entropy.shape), threshold


# A [3, 5] batch, N = 4 + 3 + 3 = 10 valid tokens. Padding holds extreme values (7, 9, -1)
# that top or bottom would grab if padding were ever considered.
#   flat index:  0    1    2    3    4   |  5    6    7    8    9   | 10   11   12   13   14
ENTROPY = torch.tensor(
    [
        [0.9, 0.1, 0.5, 0.5, 7.0],
        [0.5, 0.0, 0.1, 9.0, 9.0],
        [0.2, 0.5, 0.5, -1.0, -1.0],
    ]
)
MASK = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
# Valid tokens by entropy, descending (ties in flat-index order):
#   0.9 (0) | 0.5 (2, 3, 5, 11, 12) | 0.2 (10) | 0.1 (1, 7) | 0.0 (6)


def _mask(*flat_indices: int) -> torch.Tensor:
    out = torch.zeros(15, dtype=torch.bool)
    out[list(flat_indices)] = True
    return out.view(3, 5)


class TestHandWorkedExample:
    def test_top_20_percent_breaks_tie_by_position(self):
        # k = ceil(0.2 * 10) = 2: the 0.9 at 0, then the first of the five 0.5s (index 2)
        sel = select_tokens(ENTROPY, MASK, "top", 0.2)
        assert torch.equal(sel.mask, _mask(0, 2))
        torch.testing.assert_close(sel.threshold, torch.tensor(0.5))
        # kept entropies 0.9 and 0.5 -> mean 0.7
        torch.testing.assert_close(sel.mean_entropy_kept, torch.tensor(0.7))

    def test_top_50_percent(self):
        # k = 5: the 0.9 and the first four 0.5s (2, 3, 5, 11); the last 0.5 (12) is cut
        sel = select_tokens(ENTROPY, MASK, "top", 0.5)
        assert torch.equal(sel.mask, _mask(0, 2, 3, 5, 11))
        torch.testing.assert_close(sel.threshold, torch.tensor(0.5))
        assert sel.num_kept.item() == 5 and sel.num_valid.item() == 10
        torch.testing.assert_close(sel.kept_fraction, torch.tensor(0.5))
        # kept: 0.9 + 4 * 0.5 = 2.9 over 5 -> 0.58; all: (0.9+0.1+0.5+0.5+0.5+0+0.1+0.2+0.5+0.5) / 10
        torch.testing.assert_close(sel.mean_entropy_kept, torch.tensor(0.58))
        torch.testing.assert_close(sel.mean_entropy_all, torch.tensor(0.38))

    def test_bottom_20_percent_breaks_tie_by_position(self):
        # k = 2: the 0.0 at 6, then the first of the two 0.1s (index 1 before 7); never the -1 padding
        sel = select_tokens(ENTROPY, MASK, "bottom", 0.2)
        assert torch.equal(sel.mask, _mask(1, 6))
        torch.testing.assert_close(sel.threshold, torch.tensor(0.1))  # the largest kept

    def test_bottom_50_percent(self):
        # k = 5: 0.0 (6), 0.1 (1, 7), 0.2 (10), then the first 0.5 (2)
        sel = select_tokens(ENTROPY, MASK, "bottom", 0.5)
        assert torch.equal(sel.mask, _mask(1, 2, 6, 7, 10))
        torch.testing.assert_close(sel.threshold, torch.tensor(0.5))
        # (0 + 0.1 + 0.1 + 0.2 + 0.5) / 5 = 0.18
        torch.testing.assert_close(sel.mean_entropy_kept, torch.tensor(0.18))

    def test_all_keeps_every_valid_token(self):
        sel = select_tokens(ENTROPY, MASK, "all")
        assert torch.equal(sel.mask, MASK)
        assert sel.threshold.isnan()
        assert sel.num_kept.item() == 10
        torch.testing.assert_close(sel.mean_entropy_kept, sel.mean_entropy_all)

    def test_random_keeps_exactly_k_valid_tokens_reproducibly(self):
        def draw(seed):
            return select_tokens(ENTROPY, MASK, "random", 0.3, generator=torch.Generator().manual_seed(seed))

        a, b = draw(0), draw(0)
        assert torch.equal(a.mask, b.mask)
        assert a.mask.sum().item() == 3  # ceil(0.3 * 10)
        assert not (a.mask & ~MASK).any()
        assert a.threshold.isnan()
        # over a few seeds the subsets differ (the draw is not a fixed pattern)
        assert len({tuple(draw(s).mask.flatten().tolist()) for s in range(5)}) > 1

    def test_int_mask_and_low_precision_input(self):
        # a 0/1 int mask reads like a bool mask; bf16 values (all exact here) give the same picks
        sel = select_tokens(ENTROPY.bfloat16(), MASK.long(), "top", 0.5)
        assert torch.equal(sel.mask, _mask(0, 2, 3, 5, 11))
        assert sel.threshold.dtype == torch.float32

    def test_returns_tensors_without_grad(self):
        sel = select_tokens(ENTROPY.clone().requires_grad_(), MASK, "top", 0.2)
        assert isinstance(sel, TokenSelection)
        for t in (sel.threshold, sel.kept_fraction, sel.mean_entropy_kept, sel.mean_entropy_all):
            assert t.dim() == 0 and t.dtype == torch.float32 and not t.requires_grad
        assert sel.num_kept.dtype == sel.num_valid.dtype == torch.int64


class TestNumSelected:
    def test_decimal_ceil(self):
        assert num_selected(30, 0.1, "top") == 3
        # in floats 0.55 * 100 = 55.00000000000001, whose ceil is 56; decimal gives the intended
        # 55, as does the authors' int(N * rho + 0.9999)
        assert math.ceil(0.55 * 100) == 56
        assert num_selected(100, 0.55, "top") == 55
        assert int(100 * 0.55 + 0.9999) == 55
        assert num_selected(7, 0.2, "top") == 2  # 1.4 -> 2
        assert num_selected(7, 1.0, "bottom") == 7
        assert num_selected(7, 1, "random") == 7

    def test_all_and_empty(self):
        assert num_selected(7, 0.2, "all") == 7
        assert num_selected(0, 0.2, "top") == 0

    def test_authors_formula_differs_only_below_1e_4(self):
        # N * rho = 1.00005: ceil keeps 2, int(1.00005 + 0.9999) = 1
        assert num_selected(100_000, 0.0000100005, "top") == 2
        assert int(100_000 * 0.0000100005 + 0.9999) == 1


class TestValidation:
    @pytest.mark.parametrize("ratio", [0, 0.0, -0.1, 1.5, float("nan"), True, "0.2"])
    def test_bad_ratio(self, ratio):
        with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\], got"):
            select_tokens(ENTROPY, MASK, "top", ratio)
        with pytest.raises(ValueError, match="ratio"):
            num_selected(10, ratio, "top")

    def test_bad_ratio_message_names_value(self):
        with pytest.raises(ValueError, match="1.5"):
            select_tokens(ENTROPY, MASK, "top", 1.5)

    def test_unknown_strategy_lists_valid_ones(self):
        with pytest.raises(ValueError, match=r"'middle'.*\['all', 'bottom', 'gradient', 'random', 'span', 'top'\]"):
            select_tokens(ENTROPY, MASK, "middle")

    def test_shape_mismatch(self):
        with pytest.raises(ValueError, match="same shape"):
            select_tokens(ENTROPY, MASK[:, :4])


class TestEmpty:
    @pytest.mark.parametrize("strategy", ["all", "top", "bottom", "random"])
    def test_no_valid_tokens(self, strategy):
        sel = select_tokens(ENTROPY, torch.zeros_like(MASK), strategy, 0.2)
        assert not sel.mask.any()
        assert sel.num_kept.item() == 0 and sel.num_valid.item() == 0
        # stats are 0, not NaN, so a trainer can sum them; only the threshold is undefined
        for t in (sel.kept_fraction, sel.mean_entropy_kept, sel.mean_entropy_all):
            assert t.item() == 0.0
        assert sel.threshold.isnan()

    def test_zero_size_batch(self):
        sel = select_tokens(torch.zeros(0, 4), torch.zeros(0, 4, dtype=torch.bool), "top", 0.2)
        assert sel.mask.shape == (0, 4) and sel.num_kept.item() == 0


class TestRadixSelect:
    def test_keys_preserve_float_order(self):
        tiny = torch.finfo(torch.float32).tiny
        x = torch.tensor([-math.inf, -3.4e38, -1.0, -tiny, -1e-45, 0.0, 1e-45, tiny, 0.5, 1.0, 3.4e38, math.inf])
        keys = _float_to_key(x)
        assert (keys[1:] > keys[:-1]).all()
        assert keys.min() >= 0 and keys.max() < 2**32
        assert torch.equal(_key_to_float(keys).view(torch.int32), x.view(torch.int32))

    @pytest.mark.parametrize("strategy", ["top", "bottom"])
    @pytest.mark.parametrize("ratio", [0.01, 0.2, 0.5, 1.0])
    def test_matches_stable_sort(self, strategy, ratio):
        # negatives, both zeros (which compare equal and must tie), infinities, subnormals,
        # many duplicates (values on a coarse grid) and a large N (~32k valid tokens)
        g = torch.Generator().manual_seed(0)
        entropy = torch.randint(-20, 20, (64, 1024), generator=g).float() / 4
        entropy[0, :8] = torch.tensor([-0.0, 0.0, -0.0, math.inf, -math.inf, 1e-45, -1e-45, 0.0])
        entropy[1:, :64] = torch.randn(63, 64, generator=g)  # some distinct values too
        mask = torch.rand(64, 1024, generator=g) < 0.5
        mask[0, :8] = True
        sel = select_tokens(entropy, mask, strategy, ratio)
        expected, threshold = _reference_select(entropy, mask, strategy, ratio)
        assert torch.equal(sel.mask, expected)
        torch.testing.assert_close(sel.threshold, threshold)

    @pytest.mark.parametrize("strategy", ["top", "bottom"])
    def test_zeros_of_both_signs_tie_in_position_order(self, strategy):
        # -0.0 == +0.0, so among them the earliest positions win, whatever the sign bit
        entropy = torch.tensor([[0.0, -0.0, 0.0, -0.0, 0.0, -0.0]])
        sel = select_tokens(entropy, torch.ones_like(entropy, dtype=torch.bool), strategy, 0.5)
        assert sel.mask.tolist() == [[True, True, True, False, False, False]]


# ------------------------------------------------------------------------- properties

TIED_VALUES = [-1.5, -0.0, 0.0, 0.25, 0.5, 3.0]


@st.composite
def batches(draw, distinct: bool = False):
    """(entropy [B, T], mask [B, T]) with ties (few values) or distinct values."""
    b, t = draw(st.integers(1, 5)), draw(st.integers(1, 8))
    if distinct:
        perm = draw(st.permutations(range(b * t)))
        entropy = torch.tensor(perm, dtype=torch.float32).view(b, t) * 0.37 - 3
    else:
        entropy = torch.tensor(draw(st.lists(st.sampled_from(TIED_VALUES), min_size=b * t, max_size=b * t)))
        entropy = entropy.view(b, t)
    mask = torch.tensor(draw(st.lists(st.booleans(), min_size=b * t, max_size=b * t))).view(b, t)
    return entropy, mask


RATIOS = st.sampled_from([0.05, 0.1, 0.2, 0.25, 1 / 3, 0.5, 0.8, 0.9, 1.0]) | st.floats(0.001, 1.0)
PROPS = settings(max_examples=30, deadline=None)


class TestProperties:
    @PROPS
    @given(batches(), RATIOS, st.sampled_from(["top", "bottom", "random"]))
    def test_keeps_exactly_k_valid_tokens(self, batch, ratio, strategy):
        entropy, mask = batch
        sel = select_tokens(entropy, mask, strategy, ratio, generator=torch.Generator().manual_seed(0))
        n = int(mask.sum())
        # Fraction of the written decimal: an independent exact ceil(rho * N)
        assert sel.mask.sum().item() == sel.num_kept.item() == math.ceil(Fraction(repr(ratio)) * n)
        assert not (sel.mask & ~mask).any()
        if strategy != "random":
            expected, _ = _reference_select(entropy, mask, strategy, ratio)
            assert torch.equal(sel.mask, expected)

    @PROPS
    @given(batches(distinct=True), RATIOS, st.sampled_from(["top", "bottom"]), st.randoms())
    def test_row_permutation_permutes_mask(self, batch, ratio, strategy, rnd):
        entropy, mask = batch
        perm = torch.tensor(rnd.sample(range(entropy.shape[0]), entropy.shape[0]))
        sel = select_tokens(entropy, mask, strategy, ratio)
        sel_perm = select_tokens(entropy[perm], mask[perm], strategy, ratio)
        assert torch.equal(sel_perm.mask, sel.mask[perm])

    @PROPS
    @given(batches(), RATIOS, st.sampled_from(["top", "bottom"]), st.randoms())
    def test_row_permutation_keeps_kept_values_with_ties(self, batch, ratio, strategy, rnd):
        # with ties, *which* tied token is kept depends on order, but the kept values do not
        entropy, mask = batch
        perm = torch.tensor(rnd.sample(range(entropy.shape[0]), entropy.shape[0]))
        sel = select_tokens(entropy, mask, strategy, ratio)
        sel_perm = select_tokens(entropy[perm], mask[perm], strategy, ratio)
        kept = torch.sort(entropy[sel.mask] + 0.0).values
        kept_perm = torch.sort(entropy[perm][sel_perm.mask] + 0.0).values
        assert torch.equal(kept, kept_perm)
        torch.testing.assert_close(sel_perm.threshold, sel.threshold, equal_nan=True)

    @PROPS
    @given(batches(distinct=True), st.sampled_from([0.1, 0.2, 0.25, 0.5, 0.75, 0.8, 0.9]))
    def test_top_and_bottom_of_complementary_ratios_partition(self, batch, ratio):
        entropy, mask = batch
        complement = round(1 - ratio, 10)  # 1 - 0.9 is 0.09999999999999998 in binary floats
        n = int(mask.sum())
        # distinct as generated, but selection compares in fp32, where close values may tie
        assume(torch.unique(entropy[mask.bool()].float()).numel() == n)
        assume(num_selected(n, ratio, "top") + num_selected(n, complement, "bottom") == n)
        top = select_tokens(entropy, mask, "top", ratio).mask
        bottom = select_tokens(entropy, mask, "bottom", complement).mask
        assert not (top & bottom).any()
        assert torch.equal(top | bottom, mask)


# ------------------------------------------------------------------------- two processes

DIST_CASES = ["mixed", "rank1_empty", "rank0_empty"]
DIST_SETTINGS = [(s, r) for s in ("top", "bottom") for r in (0.1, 0.2, 0.5, 1.0)]


def _dist_chunks(case: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-rank (entropy, mask): different batch sizes, right padding, ties within and across."""
    g = torch.Generator().manual_seed(DIST_CASES.index(case))
    chunks = []
    for b in (3, 2):
        entropy = torch.randint(0, 5, (b, 7), generator=g).float() / 4  # 5 values -> many ties
        lengths = torch.randint(1, 8, (b, 1), generator=g)
        mask = torch.arange(7) < lengths
        entropy[~mask] = 100.0  # padding junk that must never win
        chunks.append((entropy, mask))
    empty = {"rank1_empty": 1, "rank0_empty": 0}.get(case)
    if empty is not None:
        chunks[empty] = (chunks[empty][0], torch.zeros_like(chunks[empty][1]))
    return chunks


def _as_tuple(sel: TokenSelection) -> tuple[torch.Tensor, ...]:
    return (
        sel.mask,
        sel.threshold,
        sel.num_kept,
        sel.num_valid,
        sel.kept_fraction,
        sel.mean_entropy_kept,
        sel.mean_entropy_all,
    )


def _to_lists(tensors: tuple[torch.Tensor, ...]) -> tuple:
    # tensors sent back through the spawn queue live in shared memory that dies with the
    # worker, so workers return plain lists and the parent rebuilds tensors (exact for fp32)
    return tuple(t.tolist() for t in tensors)


def _from_lists(values: tuple, like: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.tensor(v, dtype=t.dtype) for v, t in zip(values, like, strict=True))


def _dist_worker(rank: int, world_size: int) -> dict:
    out = {}
    for case in DIST_CASES:
        entropy, mask = _dist_chunks(case)[rank]
        for strategy, ratio in DIST_SETTINGS:
            sel = select_tokens(entropy, mask, strategy, ratio, group=dist.group.WORLD)
            out[case, strategy, ratio] = _to_lists(_as_tuple(sel))
        g = torch.Generator().manual_seed(rank)  # one stream per rank
        sel = select_tokens(entropy, mask, "random", 0.3, group=dist.group.WORLD, generator=g)
        out[case, "random"] = _to_lists(_as_tuple(sel))
        # group=None stays per-device even though torch.distributed is initialized
        out[case, "local"] = select_tokens(entropy, mask, "top", 0.2).mask.tolist()
    return out


class TestDistributed:
    def test_global_selection_equals_single_process_on_concatenation(self):
        results = run_distributed(_dist_worker, 2)
        for case in DIST_CASES:
            chunks = _dist_chunks(case)
            entropy = torch.cat([e for e, _ in chunks])
            mask = torch.cat([m for _, m in chunks])
            sizes = [e.shape[0] for e, _ in chunks]
            for strategy, ratio in DIST_SETTINGS:
                expected = _as_tuple(select_tokens(entropy, mask, strategy, ratio))
                for rank, part in enumerate(expected[0].split(sizes)):
                    got = _from_lists(results[rank][case, strategy, ratio], expected)
                    assert torch.equal(got[0], part), (case, strategy, ratio, rank)
                    # stats are global: the same on every rank and equal to single-process
                    for a, b in zip(got[1:], expected[1:], strict=True):
                        torch.testing.assert_close(a, b, equal_nan=True)

            # random: exact global count, only valid tokens, but draws differ from single-process
            n = int(mask.sum())
            k = num_selected(n, 0.3, "random")
            rand = [_from_lists(results[r][case, "random"], expected) for r in range(2)]
            assert sum(int(s[0].sum()) for s in rand) == k
            assert all(s[2].item() == k for s in rand)
            assert not any((s[0] & ~m).any() for s, (_, m) in zip(rand, chunks, strict=True))

            for rank, (e, m) in enumerate(chunks):
                local = torch.tensor(results[rank][case, "local"], dtype=torch.bool)
                assert torch.equal(local, select_tokens(e, m, "top", 0.2).mask)

    def test_mixed_case_really_has_ties_across_ranks(self):
        # guard on the fixture: the threshold value of top-20% occurs on both ranks
        (e0, m0), (e1, m1) = _dist_chunks("mixed")
        tau = select_tokens(torch.cat([e0, e1]), torch.cat([m0, m1]), "top", 0.2).threshold
        assert (e0[m0] == tau).any() and (e1[m1] == tau).any()
