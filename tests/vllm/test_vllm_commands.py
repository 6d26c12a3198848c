"""`forkrl eval --backend vllm` and `forkrl analyze store --backend vllm`: the engine samples, and the
figures are those of the same samples scored by the model (entropies from a teacher-forced pass)."""

import json

import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from forkrl.cli import app


@pytest.fixture(scope="module")
def questions(tmp_path_factory):
    path = tmp_path_factory.mktemp("q") / "q.jsonl"
    path.write_text("".join(json.dumps({"question": f"{i} + {i}", "answer": str(2 * i)}) + "\n" for i in range(4)))
    return str(path)


def test_eval_with_the_vllm_backend(vllm_model_dir, questions, tmp_path):
    out = tmp_path / "eval"
    args = ["eval", "--model", vllm_model_dir, "--data", questions, "-k", "2", "--max-new-tokens", "8"]
    args += ["--reward", "tests.train.reward_fns:vowel_fraction", "--backend", "vllm", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "eval.json").read_text())
    assert report["config"]["backend"] == "vllm"
    lengths = [s for q in report["results"][0]["questions"] for s in q["lengths"]]
    assert len(lengths) == 8 and all(1 <= n <= 8 for n in lengths)


def test_eval_refuses_an_unknown_backend(vllm_model_dir, questions):
    result = CliRunner().invoke(app, ["eval", "--model", vllm_model_dir, "--data", questions, "--backend", "sglang"])
    assert result.exit_code == 2
    assert "--backend 'sglang'" in result.output


def test_store_with_the_vllm_backend_scores_entropy_with_the_model(vllm_model_dir, questions, tmp_path):
    out = tmp_path / "store"
    args = ["analyze", "store", "--model", vllm_model_dir, "--data", questions, "--out", str(out), "-k", "2"]
    args += ["--max-new-tokens", "8", "--backend", "vllm"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    tokens = pq.read_table(out / "tokens.parquet").to_pandas()
    assert len(tokens) > 0
    assert (tokens["entropy"] > 0).all()  # from the model's pass: a random tiny model is never certain
    assert (tokens["logprob"] <= 0).all()
    # The entropy is that of softmax(z / T) at T = 1: at most log V.
    assert tokens["entropy"].max() <= torch.log(torch.tensor(1000.0)).item()
