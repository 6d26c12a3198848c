"""Cells, grids and seeds of a sweep, as parsed from options and sweep files."""

import pytest

from forkrl.config import ConfigError
from forkrl.sweep.grid import (
    Cell,
    cells_from_file,
    expand_cells,
    find_baseline,
    parse_cell,
    parse_grid,
    parse_seeds,
    split_top_level,
)


def test_split_respects_brackets_and_quotes():
    assert split_top_level("a=[1,2],b='x,y',c=3") == ["a=[1,2]", "b='x,y'", "c=3"]


def test_cells_times_grid():
    cells = [parse_cell("selection.strategy=all"), parse_cell("selection.strategy=top,selection.ratio=0.2")]
    grid = parse_grid(["loss.normalizer=kept-tokens,all-tokens"])
    names = [c.name for c in expand_cells(cells, grid)]
    assert names == [
        "selection.strategy=all,loss.normalizer=kept-tokens",
        "selection.strategy=all,loss.normalizer=all-tokens",
        "selection.strategy=top,selection.ratio=0.2,loss.normalizer=kept-tokens",
        "selection.strategy=top,selection.ratio=0.2,loss.normalizer=all-tokens",
    ]
    # a grid alone: its cross product
    assert len(expand_cells([], parse_grid(["a=1,2", "b=x,y,z"]))) == 6
    with pytest.raises(ConfigError, match="both set selection.strategy"):
        expand_cells(cells, parse_grid(["selection.strategy=random"]))


def test_slug_is_a_safe_unique_directory_name():
    assert parse_cell("selection.strategy=top,selection.ratio=0.2").slug == "selection.strategy=top,selection.ratio=0.2"
    odd = parse_cell("data.train_files=[a/b.jsonl]")
    assert "/" not in odd.slug and odd.slug != parse_cell("data.train_files=[a_b.jsonl]").slug


def test_seeds_and_baseline():
    assert parse_seeds("0,1,2") == [0, 1, 2] and parse_seeds("3-5,0") == [0, 3, 4, 5] and parse_seeds([2, 1]) == [1, 2]
    with pytest.raises(ConfigError, match="--seeds"):
        parse_seeds("zero")
    cells = cells_from_file(
        ["selection.strategy=all", {"selection.strategy": "top", "selection.ratio": 0.2}], "sweep.yaml"
    )
    assert cells[1] == Cell((("selection.strategy", "top"), ("selection.ratio", "0.2")))
    assert find_baseline("selection.strategy=all", cells) == cells[0]
    assert find_baseline("selection.ratio=0.20", cells) == cells[1]  # values compare as YAML
    with pytest.raises(ConfigError, match="matches no cell"):
        find_baseline("selection.strategy=random", cells)


def test_a_resumed_run_matches_the_backends_choice_for_auto(tmp_path):
    """The trainer records `loss.rollout_correction: auto` as the value it used (hf: none), so a
    killed sweep run resumes; a run that used another value is still refused, naming the key."""
    from forkrl.config import config_from_dict, dump_config
    from forkrl.sweep.runner import check_same_config

    base = ["model.name=Qwen/Qwen3-0.6B", "data.train_files=[train.jsonl]"]
    intended = config_from_dict({}, [*base, "loss.rollout_correction=auto"], check_files=False)
    for used, refused in (("none", False), ("tis", True)):
        run = tmp_path / used
        run.mkdir()
        (run / "config.yaml").write_text(
            dump_config(config_from_dict({}, [*base, f"loss.rollout_correction={used}"], check_files=False))
        )
        if refused:
            with pytest.raises(ConfigError, match=r"loss\.rollout_correction: 'tis' there, 'none' now"):
                check_same_config(run, intended)
        else:
            check_same_config(run, intended)
