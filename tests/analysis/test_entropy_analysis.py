"""Entropy distribution, per-token averages and the rendered outputs of `analyze entropy`,
checked against values worked out by hand on crafted stores."""

import csv
import json
import math

import numpy as np
import pytest

from forkrl.analysis.entropy import (
    EntropyHistogram,
    TokenEntropyStats,
    entropy_percentiles,
    run_entropy,
    share_below,
)
from forkrl.analysis.render import ColouredResponse, render_responses_html
from tests.analysis.crafted_store import write_store


def test_percentiles_of_0_to_100_are_exact():
    # 101 values 0..100: the inverted-CDF p-th percentile is the ceil(p/100 * 101)-th smallest,
    # i.e. the value p itself, for every p = 0, 10, ..., 100.
    values = np.random.default_rng(0).permutation(np.arange(101, dtype=np.float32))
    got = entropy_percentiles(values)
    assert got == {f"p{p}": float(p) for p in range(0, 101, 10)}


def test_percentile_is_a_stored_value_with_at_least_p_percent_at_or_below():
    # 4 values: p50 -> ceil(2.0) = 2nd smallest = 0.2; p75 -> 3rd = 0.3; p80 -> ceil(3.2) = 4th = 0.4.
    got = entropy_percentiles(np.array([0.3, 0.1, 0.4, 0.2], dtype=np.float32), [50, 75, 80])
    assert got == pytest.approx({"p50": 0.2, "p75": 0.3, "p80": 0.4}, abs=1e-7)


def test_share_below_is_strict():
    # 0, 0.005 and 0.00999 are below 1e-2; 0.01 itself is not; 3 of 5.
    assert share_below(np.array([0.0, 0.005, 0.00999, 0.01, 0.5])) == pytest.approx(0.6)
    assert share_below(np.array([0.02, 3.0]), threshold=0.03) == 0.5


def test_histogram_counts_and_clipping():
    hist = EntropyHistogram(np.array([0.0, 1.0, 2.0, 3.0]))
    hist.add(np.array([0.0, 0.5, 1.0]))
    # -1e-7 (float noise) is clipped into the first bin, 5.0 into the last (closed) bin.
    hist.add(np.array([2.5, 3.0, -1e-7, 5.0]))
    assert hist.counts.tolist() == [3, 1, 3]
    assert hist.num_clipped == 2


def test_token_stats_average_and_min_count():
    stats = TokenEntropyStats()
    # id 5: entropies 1, 2, 3 -> mean 2.0 (count 3); id 7: 0, 0.5 -> 0.25 (count 2);
    # id 9: 4.0 once -> excluded by min_count = 2. Split across two batches on purpose.
    stats.add(np.array([5, 7, 9]), np.array([1.0, 0.0, 4.0]), ["a", "b", "c"])
    stats.add(np.array([5, 5, 7]), np.array([2.0, 3.0, 0.5]), ["a", "a", "b"])
    high, low = stats.extremes(min_count=2, top_n=10)
    assert [(r["token_id"], r["piece"], r["count"], r["mean_entropy"]) for r in high] == [
        (5, "a", 3, 2.0),
        (7, "b", 2, 0.25),
    ]
    assert [r["token_id"] for r in low] == [7, 5]
    high1, low1 = stats.extremes(min_count=1, top_n=1)
    assert high1[0]["token_id"] == 9 and low1[0]["token_id"] == 7


def test_html_escapes_text_and_shows_entropy_on_hover():
    page = render_responses_html(
        [ColouredResponse(0, 0, "x < y & z", ["<b>", "&", ' "q"'], np.array([0.5, 0.0, 2.0]))], vmax=1.0
    )
    assert "&lt;b&gt;" in page and "<b>" not in page.split("<body>")[1]
    assert "&amp;" in page and "&quot;q&quot;" in page
    assert 'title="H=0.5000"' in page and 'title="H=2.0000"' in page
    assert "x &lt; y &amp; z" in page
    assert "linear-gradient" in page  # the colour bar legend


@pytest.fixture()
def crafted(tmp_path):
    # Two responses. Token means: "wait" (id 10): (2.0 + 3.0 + 1.0) / 3 = 2.0;
    # "ing" (id 11): (0.0 + 0.02) / 2 = 0.01; "<x>" (id 12): 0.001 twice -> 0.001;
    # "so" (id 13): 1.5 once (below min_count 2).
    responses = [
        [(10, " wait", 2.0), (11, "ing", 0.0), (12, "<x>", 0.001), (10, " wait", 3.0)],
        [(12, "<x>", 0.001), (11, "ing", 0.02), (13, " so", 1.5), (10, " wait", 1.0)],
    ]
    return write_store(tmp_path / "store", responses, prompts=["a<b", "c"], rewards=[1.0, 0.0], vocab_size=20)


def test_run_entropy_on_crafted_store(crafted, tmp_path):
    out = tmp_path / "out"
    summary = run_entropy(crafted, out, min_count=2, top_n=5, num_bins=10, num_responses=2)
    data = json.loads((out / "entropy.json").read_text())
    values = np.sort(np.array([2.0, 0.0, 0.001, 3.0, 0.001, 0.02, 1.5, 1.0], dtype=np.float32))
    assert data["num_tokens"] == 8 and data["num_samples"] == 2
    # 0.0, 0.001, 0.001 are below 1e-2 -> 3/8; p80 = ceil(6.4) = 7th smallest = 2.0
    assert data["share_below_0.01"] == pytest.approx(3 / 8)
    assert data["p80"] == pytest.approx(2.0)
    assert data["percentiles"]["p0"] == 0.0 and data["percentiles"]["p100"] == pytest.approx(3.0)
    assert data["percentiles"]["p50"] == pytest.approx(float(values[3]))  # ceil(4.0) = 4th
    assert data["mean"] == pytest.approx(float(values.astype(np.float64).mean()), rel=1e-6)
    # Fixed bins on [0, ln 20]: 10 bins, all 8 tokens counted once.
    assert data["histogram"]["edges"][-1] == pytest.approx(math.log(20))
    assert sum(data["histogram"]["counts"]) == 8
    assert summary["p80"] == data["p80"]

    table = json.loads((out / "token_table.json").read_text())
    assert [(r["piece"], r["count"]) for r in table["high"]] == [(" wait", 3), ("ing", 2), ("<x>", 2)]
    assert [r["mean_entropy"] for r in table["high"]] == pytest.approx([2.0, 0.01, 0.001])
    assert [r["piece"] for r in table["low"]] == ["<x>", "ing", " wait"]
    with open(out / "token_table.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and rows[0]["group"] == "high" and rows[0]["piece"] == " wait"

    for name in ("entropy_hist.png", "wordcloud_high.png", "wordcloud_low.png"):
        assert (out / name).stat().st_size > 1000
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "responses.html").read_text()
    assert page.count('class="response"') == 2
    assert "&lt;x&gt;" in page and "<x>" not in page
    assert "a&lt;b" in page  # the prompt, escaped
    assert 'title="H=3.0000"' in page


def test_run_entropy_on_another_column_and_no_frequent_tokens(crafted, tmp_path):
    from forkrl.analysis.store import add_token_columns

    add_token_columns(crafted, {"entropy_half": crafted.read_token_column("entropy") / 2})
    summary = run_entropy(crafted, tmp_path / "out", column="half", min_count=100, num_responses=0)
    assert summary["column"] == "entropy_half" and summary["p80"] == pytest.approx(1.0)
    table = json.loads((tmp_path / "out" / "token_table.json").read_text())
    assert table["high"] == [] and table["low"] == []
    assert (tmp_path / "out" / "wordcloud_low.png").stat().st_size > 0
