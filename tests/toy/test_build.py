"""Tests for forkrl.toy.build: a tiny build runs quickly, loads with the Auto classes, records its
settings and measurements, is reproducible from its seed and is written atomically."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from forkrl.tasks.countdown import CountdownProblem, problems_to_examples
from forkrl.toy import ToyBuildConfig, build_toy_model, build_toy_tokenizer, toy_build_command

# A few seconds on 2 CPU cores: the recipe end to end at a size where it learns nothing useful.
TINY = ToyBuildConfig(
    num_traces=200,
    steps=20,
    batch_size=16,
    hidden_size=32,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    intermediate_size=64,
    warmup_steps=5,
    log_every=10,
    eval_problems=4,
    eval_k=2,
    eval_max_new_tokens=24,
    entropy_traces=16,
    threads=1,  # the tiny model gains nothing from a second thread, and loses a lot when cores are busy
)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_toy_model(tmp_path_factory.mktemp("toy") / "model", TINY, seed=7)


def test_build_loads_with_auto_classes(built):
    model = AutoModelForCausalLM.from_pretrained(built)
    tokenizer = AutoTokenizer.from_pretrained(built)
    assert (built / "model.safetensors").is_file() and (built / "tokenizer.json").is_file()
    assert type(model).__name__ == "Qwen3ForCausalLM" and model.config.hidden_size == 32
    # The saved tokenizer is the toy tokenizer: one token per keyword and number.
    text = "numbers: 3 15 7 target: 22\n15+7=22 yes\nanswer: (5*3)+7"
    assert tokenizer(text)["input_ids"] == build_toy_tokenizer()(text)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(tokenizer("numbers: 15")["input_ids"]) == ["numbers:", " ", "15"]
    # The chat template and the countdown prompt template give the model the same prompt.
    prompt = problems_to_examples([CountdownProblem((3, 5, 7), 22)])[0].prompt
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "numbers: 3 5 7 target: 22"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == prompt == "numbers: 3 5 7 target: 22\n"
    out = model.generate(**tokenizer([prompt], return_tensors="pt"), max_new_tokens=5, do_sample=False)
    assert out.shape[1] > len(tokenizer(prompt)["input_ids"])


def test_build_records_settings_and_measurements(built):
    info = json.loads((built / "toy_build.json").read_text())
    assert info["config"]["seed"] == 7 and info["config"]["steps"] == 20
    assert info["num_parameters"] == sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(built).parameters())
    assert [p["step"] for p in info["loss_curve"]] == [10, 20]
    assert info["final_loss"] == info["loss_curve"][-1]["loss"] > 0
    assert info["traces"]["num_traces"] == 200 and 0 < info["traces"]["choice_fraction"] < 1
    assert info["eval"]["num_problems"] == 4 and info["eval"]["k"] == 2 and 0 <= info["eval"]["acc_at_k"] <= 100
    assert set(info["entropy"]) >= {"mean_entropy_choice", "mean_entropy_determined", "top20_choice_share"}


def test_same_seed_same_weights(built, tmp_path):
    again = build_toy_model(tmp_path / "again", TINY, seed=7, eval_problems=0, entropy_traces=0)
    first, second = load_file(built / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=0, atol=0)


def test_existing_output_is_kept_unless_overwrite(built, tmp_path, capsys):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        build_toy_model(out, TINY, steps=1, eval_problems=0, entropy_traces=0)
    assert (out / "keep.txt").exists()
    toy_build_command(1, out, overwrite=True, config=TINY, steps=2, eval_problems=0, entropy_traces=0)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert "toy model written to" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary directories left behind
