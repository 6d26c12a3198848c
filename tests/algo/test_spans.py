"""`span` selection: the response tokens inside a span matched on the decoded text, with token
offsets from the tokenizer, and exact kept counts for the normalizer."""

import math

import pytest
import torch

from forkrl.algo.losses import loss_denominators
from forkrl.algo.selection import TokenSelector
from forkrl.algo.spans import span_token_mask, token_char_offsets
from forkrl.models.tiny import DEFAULT_VOCAB, build_tiny_tokenizer

PATTERN = r"p=(?P<span>[0-9.]+)"


@pytest.fixture(scope="module")
def tokenizer():
    # multi-character pieces, so that the forecast's number is split over several tokens
    return build_tiny_tokenizer([*DEFAULT_VOCAB, "p=", "0.", "73", "then"])


def _rows(tokenizer, texts, eos=True):
    ids = [
        tokenizer(t, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if eos else []) for t in texts
    ]
    width = max(len(r) for r in ids)
    response = torch.full((len(ids), width), tokenizer.pad_token_id)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, r in enumerate(ids):
        response[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return response, mask


def _pieces(tokenizer, response, mask):
    return [tokenizer.convert_ids_to_tokens(response[i][mask[i].bool()].tolist()) for i in range(len(response))]


def test_the_number_split_over_pieces_is_the_span(tokenizer):
    response, valid = _rows(tokenizer, ["think then p=0.73", "p=0.1 and then p=0.73!", "no forecast"])
    mask, counts = span_token_mask(tokenizer, response, valid, PATTERN)
    kept = [[tok for tok, k in zip(pieces, mask[i][valid[i].bool()]) if k] for i, pieces in
            enumerate(_pieces(tokenizer, response, valid))]  # fmt: skip
    assert kept[0] == ["0.", "73"]  # not "p=", not the EOS
    assert kept[1] == ["0.", "73"]  # the last match counts, not p=0.1
    assert kept[2] == []
    assert counts == {"span_found": 2.0, "span_offset_fallback_rows": 0.0}
    assert not (mask & ~valid.bool()).any()


def test_outside_span_is_the_rest_of_the_response(tokenizer):
    response, valid = _rows(tokenizer, ["think then p=0.73", "no forecast"])
    inside, _ = span_token_mask(tokenizer, response, valid, PATTERN, "span")
    outside, _ = span_token_mask(tokenizer, response, valid, PATTERN, "outside_span")
    assert torch.equal(outside, valid.bool() & ~inside)
    assert outside[1].sum() == valid[1].sum()  # no match: every token, the EOS included


def test_a_non_canonical_sampled_sequence_gets_its_own_offsets(tokenizer):
    # "0.73" sampled as single characters, although the tokenizer would write "0." "73"
    ids = [tokenizer.convert_tokens_to_ids(t) for t in ["x", "p=", "0", ".", "7", "3", " ", "y"]]
    ids.append(tokenizer.eos_token_id)
    response = torch.tensor([ids])
    valid = torch.ones_like(response)
    texts, offsets, fallbacks = token_char_offsets(tokenizer, [ids])
    assert texts == ["xp=0.73 y"] and fallbacks == 1
    assert offsets[0].tolist() == [[0, 1], [1, 3], [3, 4], [4, 5], [5, 6], [6, 7], [7, 8], [8, 9], [9, 9]]
    mask, counts = span_token_mask(tokenizer, response, valid, PATTERN)
    assert mask[0].tolist() == [False, False, True, True, True, True, False, False, False]
    assert counts["span_offset_fallback_rows"] == 1.0


def test_a_token_straddling_the_span_edge_is_inside(tokenizer):
    # "73!" -> pieces "73", "!" ; pattern span "3" overlaps the token "73"
    response, valid = _rows(tokenizer, ["p=0.73!"])
    mask, _ = span_token_mask(tokenizer, response, valid, r"7(?P<span>3)")
    assert [t for t, k in zip(_pieces(tokenizer, response, valid)[0], mask[0]) if k] == ["73"]


@pytest.mark.parametrize("strategy, ratio, scope", [("all", 1.0, "microbatch"), ("top", 0.5, "microbatch"),
                                                    ("top", 0.3, "batch")])  # fmt: skip
def test_the_normalizer_counts_the_region(strategy, ratio, scope):
    response = [torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]), torch.tensor([[1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])]
    region = [torch.tensor([[0, 1, 1, 0, 0], [0, 0, 1, 0, 0]]), torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]])]
    d = loss_denominators(response, TokenSelector(strategy, ratio, scope, "current").num_kept(region))
    assert d.num_tokens == 13 and d.num_sequences == 4  # the responses, for the other normalizers
    region_counts = [3, 3]
    if scope == "microbatch":
        expected = sum(n if strategy == "all" else math.ceil(ratio * n) for n in region_counts)
    else:
        expected = math.ceil(ratio * sum(region_counts))
    assert d.num_kept == expected
