"""Tests for forkrl.tasks.data: loading prompt files and datasets, errors, templates, sampling."""

from __future__ import annotations

import json

import pytest
import torch

from forkrl.tasks.data import (
    PAPER_TEMPLATE,
    PromptDataError,
    PromptSampler,
    load_prompts,
    render_prompt,
)

ROWS = [
    {"problem": "What is 1+1?", "extra": {"solution": "2"}, "level": 1},
    {"problem": "What is 2*3?", "extra": {"solution": 6}, "level": 2},  # numeric answer
    {"problem": "Half of one?", "extra": {"solution": "\\frac{1}{2}"}, "level": 3},
]


def _write_jsonl(path, lines: list[str | bytes]) -> str:
    with open(path, "wb") as f:
        for line in lines:
            f.write((line if isinstance(line, bytes) else line.encode()) + b"\n")
    return str(path)


def _check_rows(examples, template=PAPER_TEMPLATE):
    assert [e.question for e in examples] == [r["problem"] for r in ROWS]
    assert [e.answer for e in examples] == ["2", "6", "\\frac{1}{2}"]
    assert [e.index for e in examples] == [0, 1, 2]
    assert examples[1].metadata["level"] == 2  # the whole row travels along
    assert examples[0].prompt == template.replace("{question}", "What is 1+1?")


# ---------------------------------------------------------------------------- formats


def test_jsonl_custom_nested_keys_skips_blank_lines(tmp_path):
    lines = [json.dumps(ROWS[0]), "", "   ", json.dumps(ROWS[1]), json.dumps(ROWS[2]), ""]
    path = _write_jsonl(tmp_path / "p.jsonl", lines)
    _check_rows(load_prompts(path, question_key="problem", answer_key="extra.solution"))


def test_jsonl_limit_stops_early(tmp_path):
    # line 3 is broken, but limit=2 never reaches it
    path = _write_jsonl(tmp_path / "p.jsonl", [json.dumps(ROWS[0]), json.dumps(ROWS[1]), "{oops"])
    examples = load_prompts(path, "problem", "extra.solution", limit=2)
    assert [e.answer for e in examples] == ["2", "6"]


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = str(tmp_path / "p.parquet")
    rows = [{**r, "extra": {"solution": str(r["extra"]["solution"])}} for r in ROWS]  # one arrow type
    pq.write_table(pa.Table.from_pylist(rows), path)
    _check_rows(load_prompts(path, "problem", "extra.solution"))


def test_json_list(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(ROWS), encoding="utf-8")
    _check_rows(load_prompts(str(path), "problem", "extra.solution", template="Q: {question}\nA:"), "Q: {question}\nA:")


def test_list_index_in_key(tmp_path):
    # DAPO-Math-17K keeps the question inside a chat message list
    row = {"prompt": [{"role": "user", "content": "What is 1+1?"}], "reward_model": {"ground_truth": "2"}}
    path = _write_jsonl(tmp_path / "p.jsonl", [json.dumps(row)])
    (ex,) = load_prompts(path, "prompt.0.content", "reward_model.ground_truth")
    assert (ex.question, ex.answer) == ("What is 1+1?", "2")


def test_datasets_saved_to_disk(tmp_path):
    import datasets

    rows = [{**r, "extra": {"solution": str(r["extra"]["solution"])}} for r in ROWS]
    ds = datasets.Dataset.from_list(rows)
    datasets.DatasetDict({"train": ds, "test": ds.select([2])}).save_to_disk(str(tmp_path / "dd"))
    _check_rows(load_prompts(str(tmp_path / "dd"), "problem", "extra.solution"))
    (only,) = load_prompts(str(tmp_path / "dd"), "problem", "extra.solution", split="test")
    assert only.answer == "\\frac{1}{2}"
    with pytest.raises(PromptDataError, match=r"no split 'dev'.*\['test', 'train'\]"):
        load_prompts(str(tmp_path / "dd"), "problem", "extra.solution", split="dev")


def test_datasets_data_directory(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")  # keep ~/.cache clean
    (tmp_path / "data").mkdir()
    rows = [{**r, "extra": {"solution": str(r["extra"]["solution"])}} for r in ROWS]
    _write_jsonl(tmp_path / "data" / "train.jsonl", [json.dumps(r) for r in rows])
    _check_rows(load_prompts(str(tmp_path / "data"), "problem", "extra.solution"))


def test_missing_path_is_a_clear_error(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(PromptDataError, match="nope: not a readable prompt file"):
        load_prompts(missing)


# ---------------------------------------------------------------------------- errors


def test_empty_file(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_bytes(b"")
    with pytest.raises(PromptDataError, match=r"e\.jsonl: file is empty"):
        load_prompts(str(path))


def test_only_blank_lines(tmp_path):
    path = _write_jsonl(tmp_path / "b.jsonl", ["", "  "])
    with pytest.raises(PromptDataError, match=r"b\.jsonl: no rows"):
        load_prompts(path)


def test_non_utf8_line_names_line(tmp_path):
    good = json.dumps({"question": "q", "answer": "a"})
    path = _write_jsonl(tmp_path / "u.jsonl", [good, b'{"question": "caf\xe9", "answer": "1"}'])
    with pytest.raises(PromptDataError, match=r"u\.jsonl: line 2: not valid UTF-8"):
        load_prompts(path)


def test_invalid_json_line_names_line(tmp_path):
    good = json.dumps({"question": "q", "answer": "a"})
    # blank line 2 still counts, so the broken row is line 4
    path = _write_jsonl(tmp_path / "j.jsonl", [good, "", good, '{"question": "q",'])
    with pytest.raises(PromptDataError, match=r"j\.jsonl: line 4: invalid JSON"):
        load_prompts(path)


def test_non_object_line(tmp_path):
    path = _write_jsonl(tmp_path / "l.jsonl", ["[1, 2]"])
    with pytest.raises(PromptDataError, match=r"l\.jsonl: line 1: expected a JSON object, got list"):
        load_prompts(path)


def test_missing_answer_lists_row_keys(tmp_path):
    path = _write_jsonl(
        tmp_path / "m.jsonl",
        [json.dumps({"question": "q", "answer": "a"}), json.dumps({"question": "q", "solution": "a"})],
    )
    with pytest.raises(PromptDataError) as err:
        load_prompts(path)
    msg = str(err.value)
    assert "m.jsonl: line 2" in msg and "'answer'" in msg and "['question', 'solution']" in msg


def test_missing_nested_key_json_row(tmp_path):
    path = tmp_path / "n.json"
    path.write_text(json.dumps([{"q": "x", "extra": {}}]))
    with pytest.raises(PromptDataError, match=r"n\.json: row 1: row has no answer field 'extra\.sol'"):
        load_prompts(str(path), "q", "extra.sol")


@pytest.mark.parametrize(
    ("question", "problem"), [(3, "must be a string, got int"), ("  ", "is empty"), (None, "has a null")]
)
def test_bad_question(tmp_path, question, problem):
    path = tmp_path / "q.json"
    path.write_text(json.dumps([{"question": "fine", "answer": "1"}, {"question": question, "answer": "1"}]))
    with pytest.raises(PromptDataError, match=rf"q\.json: row 2: .*{problem}"):
        load_prompts(str(path))


def test_bad_answer_type(tmp_path):
    path = _write_jsonl(tmp_path / "a.jsonl", [json.dumps({"question": "q", "answer": [1]})])
    with pytest.raises(PromptDataError, match=r"line 1: answer field 'answer' must be a string or a number"):
        load_prompts(path)


def test_no_answer_key(tmp_path):
    path = _write_jsonl(tmp_path / "t.jsonl", [json.dumps({"question": "q", "tests": [1]})])
    (ex,) = load_prompts(path, answer_key=None)
    assert ex.answer == "" and ex.metadata["tests"] == [1]


def test_invalid_json_file(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('[{"question": "q"},\n oops]')
    with pytest.raises(PromptDataError, match=r"x\.json: invalid JSON .*line 2"):
        load_prompts(str(path))


def test_unsupported_extension(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("question,answer\n")
    with pytest.raises(PromptDataError, match=r"x\.csv: unsupported file type '\.csv'"):
        load_prompts(str(path))


# ---------------------------------------------------------------------------- templates


def test_paper_template_exact():
    expected = (
        "User:\nWhat is 1+1?\nPlease reason step by step, and put your final answer within \\boxed{}.\n\nAssistant:\n"
    )
    assert render_prompt("What is 1+1?") == expected
    assert expected.count("\\") == 1  # one literal backslash, before "boxed"


def test_custom_template_keeps_other_braces():
    # braces other than {question} are literal, and a question containing "{question}" is not re-expanded
    assert render_prompt("x {question}", "Solve {question} in \\boxed{}") == "Solve x {question} in \\boxed{}"


def test_template_without_placeholder_names_it():
    with pytest.raises(ValueError, match=r"'Solve this' is neither a named template"):
        render_prompt("q", "Solve this")


def test_chat_template_uses_tokenizer():
    class FakeTokenizer:
        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            self.call = (messages, tokenize, add_generation_prompt)
            return "<user>" + messages[0]["content"] + "<assistant>"

    tok = FakeTokenizer()
    assert render_prompt("2+2?", "chat", tok) == "<user>2+2?<assistant>"
    assert tok.call == ([{"role": "user", "content": "2+2?"}], False, True)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        render_prompt("2+2?", "chat")


# ---------------------------------------------------------------------------- sampling


def _draw(sampler: PromptSampler, k: int) -> list[int]:
    return [next(sampler) for _ in range(k)]


def test_sampler_epochs_follow_seeded_randperm():
    sampler = PromptSampler(5, seed=7)
    first_two_epochs = _draw(sampler, 10)
    expected = [torch.randperm(5, generator=torch.Generator().manual_seed(7 + e)).tolist() for e in (0, 1)]
    assert first_two_epochs == expected[0] + expected[1]
    assert _draw(PromptSampler(5, seed=7), 10) == first_two_epochs  # same seed, same order
    assert _draw(PromptSampler(5, seed=8), 10) != first_two_epochs


def test_sampler_shards_are_disjoint_and_interleave_to_the_single_process_order():
    single = _draw(PromptSampler(12, seed=3), 12)
    shards = [_draw(PromptSampler(12, seed=3, rank=r, world_size=3), 4) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(12))  # disjoint and complete within an epoch
    assert [shards[r][k] for k in range(4) for r in range(3)] == single


def test_sampler_uneven_world_size_across_epochs():
    # 10 prompts over 3 ranks: epoch boundaries fall mid-stride, nothing dropped or padded
    single = _draw(PromptSampler(10, seed=0), 30)
    shards = [_draw(PromptSampler(10, seed=0, rank=r, world_size=3), 10) for r in range(3)]
    assert [shards[r][k] for k in range(10) for r in range(3)] == single


def test_sampler_resume_continues_identically():
    reference = PromptSampler(7, seed=1, rank=1, world_size=2)
    expected = _draw(reference, 12)
    sampler = PromptSampler(7, seed=1, rank=1, world_size=2)
    _draw(sampler, 5)
    state = sampler.state_dict()
    assert state == {"epoch": 1, "position": 3, "seed": 1, "num_prompts": 7}  # 5 draws x 2 ranks = 10
    resumed = PromptSampler(7, seed=1, rank=1, world_size=2)
    resumed.load_state_dict(state)
    assert _draw(resumed, 7) == expected[5:]
    with pytest.raises(ValueError, match="seed=1, but this sampler has seed=2"):
        PromptSampler(7, seed=2).load_state_dict(state)
