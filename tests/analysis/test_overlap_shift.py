"""Top-ρ position overlap between checkpoints (Table 1) and entropy change per percentile
bucket (Fig. 4), with hand-worked values."""

import json

import numpy as np
import pytest

from forkrl.analysis.overlap import overlap_ratio, run_overlap, top_entropy_mask
from forkrl.analysis.shift import entropy_change_by_bucket, run_shift
from tests.analysis.crafted_store import write_store


def test_overlap_of_two_known_masks():
    a = np.array([1, 1, 1, 1, 0, 0, 0, 0], dtype=bool)
    b = np.array([0, 1, 0, 1, 1, 1, 0, 0], dtype=bool)
    # A ∩ B = positions {1, 3}: 2 of A's 4 -> 0.5
    assert overlap_ratio(a, b) == 0.5
    assert overlap_ratio(a, a) == 1.0
    assert np.isnan(overlap_ratio(np.zeros(3, bool), a[:3]))


def test_top_mask_keeps_exactly_ceil_ratio_n_with_earlier_ties():
    # N = 10, ratio 0.2 -> k = 2: the two largest are at positions 0 and 3.
    entropy = np.array([5.0, 0.0, 1.0, 4.0, 0.0, 2.0, 0.0, 0.0, 3.0, 0.0])
    assert np.flatnonzero(top_entropy_mask(entropy, 0.2)).tolist() == [0, 3]
    # N = 5, ratio 0.3 -> k = ceil(1.5) = 2; four tied at 1.0 -> the first two win.
    assert np.flatnonzero(top_entropy_mask(np.array([1.0, 1.0, 1.0, 1.0, 0.0]), 0.3)).tolist() == [0, 1]


def test_bucket_means_of_a_crafted_pair():
    # 8 tokens, 4 buckets of 2 by the before-rank. Before (in rank order 0.0..0.7) is shuffled
    # in position; the change per token is chosen per bucket:
    #   bucket 0 (0.0, 0.1): +0.0, +0.2 -> mean 0.1     bucket 1 (0.2, 0.3): -0.1, -0.3 -> -0.2
    #   bucket 2 (0.4, 0.5): +1.0, +0.0 -> 0.5          bucket 3 (0.6, 0.7): +2.0, +4.0 -> 3.0
    before = np.array([0.5, 0.0, 0.7, 0.2, 0.4, 0.1, 0.6, 0.3])
    delta = np.array([0.0, 0.0, 4.0, -0.1, 1.0, 0.2, 2.0, -0.3])
    got = entropy_change_by_bucket(before, before + delta, num_buckets=4)
    assert got["count"] == [2, 2, 2, 2]
    assert got["mean_change"] == pytest.approx([0.1, -0.2, 0.5, 3.0])
    assert got["mean_abs_change"] == pytest.approx([0.1, 0.2, 0.5, 3.0])
    assert got["entropy_low"] == pytest.approx([0.0, 0.2, 0.4, 0.6])
    assert got["entropy_high"] == pytest.approx([0.1, 0.3, 0.5, 0.7])
    assert got["mean_before"] == pytest.approx([0.05, 0.25, 0.45, 0.65])
    assert got["percentile_high"] == [25.0, 50.0, 75.0, 100.0]


def test_buckets_split_by_rank_when_n_does_not_divide():
    # N = 5, 2 buckets: bucket = floor(rank * 2 / 5) -> ranks 0, 1, 2 in bucket 0; 3, 4 in bucket 1.
    # Ties in `before` are ranked by position (stable sort).
    before = np.array([1.0, 1.0, 1.0, 1.0, 0.0])
    after = np.array([1.0, 2.0, 3.0, 4.0, 0.5])
    got = entropy_change_by_bucket(before, after, num_buckets=2)
    assert got["count"] == [3, 2]
    # bucket 0: ranks 0-2 = positions 4, 0, 1: changes 0.5, 0, 1 -> 0.5; bucket 1: positions 2, 3: 2, 3 -> 2.5
    assert got["mean_change"] == pytest.approx([0.5, 2.5])


@pytest.fixture()
def three_checkpoints(tmp_path):
    # 10 tokens in two responses. Top 20% (k = 2) positions:
    #   entropy (generator) -> {0, 1};  entropy_base -> {0, 5};  entropy_mid -> {1, 6}
    gen = [9.0, 8.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    base = [9.0, 1.0, 1.0, 1.0, 1.0, 8.0, 1.0, 1.0, 1.0, 1.0]
    mid = [1.0, 9.0, 1.0, 1.0, 1.0, 1.0, 8.0, 1.0, 1.0, 1.0]
    responses = [[(i, "t", h) for i, h in enumerate(gen[:6])], [(i, "t", h) for i, h in enumerate(gen[6:])]]
    return write_store(tmp_path / "store", responses, extra={"entropy_base": base, "entropy_mid": mid})


def test_run_overlap_table(three_checkpoints, tmp_path):
    out = tmp_path / "out"
    result = run_overlap(three_checkpoints, out, columns=["base", "mid", "entropy"], labels=["step0", "step5", "final"])
    assert result["num_top"] == 2
    # with base {0, 5}: base 1, mid {1, 6} 0, final {0, 1} 1/2; with final {0, 1}: 1/2, 1/2, 1
    assert result["with_first"] == [1.0, 0.0, 0.5]
    assert result["with_last"] == [0.5, 0.5, 1.0]
    assert json.loads((out / "overlap.json").read_text())["labels"] == ["step0", "step5", "final"]
    md = (out / "overlap.md").read_text()
    assert "| step0 (first) | 100.00% | 0.00% | 50.00% |" in md
    assert "| final (last) | 50.00% | 50.00% | 100.00% |" in md
    assert (out / "overlap.png").stat().st_size > 1000
    default = run_overlap(three_checkpoints, tmp_path / "o2")  # every entropy column, in order added
    assert default["columns"] == ["entropy", "entropy_base", "entropy_mid"]
    with pytest.raises(ValueError, match="at least two"):
        run_overlap(three_checkpoints, tmp_path / "o3", columns=["base"])


def test_run_shift_outputs(three_checkpoints, tmp_path):
    out = tmp_path / "out"
    result = run_shift(three_checkpoints, out, before="base", after="entropy", num_buckets=5)
    # base sorted by rank (ties by position): positions 1,2,3,4,6,7,8,9 at 1.0, then 5 (8.0), 0 (9.0).
    # 5 buckets of 2: changes (gen - base) at positions [1,2] = [7, 0] -> 3.5, [3,4] -> 0,
    # [6,7] -> 0, [8,9] -> 0, [5,0] = [1 - 8, 9 - 9] -> -3.5
    assert result["buckets"]["mean_change"] == pytest.approx([3.5, 0.0, 0.0, 0.0, -3.5])
    assert result["mean_change_all"] == pytest.approx(0.0)
    assert json.loads((out / "shift.json").read_text())["before"] == "entropy_base"
    assert (out / "shift.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="same column"):
        run_shift(three_checkpoints, out, before="entropy", after="entropy")
