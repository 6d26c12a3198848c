"""Entropy-aware decoding sweeps (paper 1 Eq. 5, Fig. 3) on the tiny model."""

import json

import pytest
import torch

from forkrl.analysis.temperature import (
    EntropyTemperatureBackend,
    measure_threshold,
    run_temperature,
    threshold_from_entropy_json,
)
from forkrl.models import load_policy, save_tiny_model_dir
from forkrl.rollout import HFGenerationBackend, SamplingParams


def alnum_reward(completion, example) -> float:
    """0 or 1 by the parity of the number of letters/digits: varies between samples."""
    return float(sum(c.isalnum() for c in completion) % 2)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "bench.jsonl"
    path.write_text("".join(json.dumps({"question": q, "answer": "2"}) + "\n" for q in ["1+1", "4-2", "8/4"]))
    return str(path)


class Recorder:
    def __init__(self, inner):
        self.inner, self.params = inner, []

    def generate(self, prompts, params):
        self.params.append(params)
        return self.inner.generate(prompts, params)

    def update_weights(self, model):
        pass


def test_wrapper_samples_every_call_with_eq5(model_dir):
    model, tok = load_policy(model_dir, dtype="float32", device="cpu")
    recorder = Recorder(HFGenerationBackend(model, tok, batch_size=4))
    wrapped = EntropyTemperatureBackend(recorder, t_low=0.5, t_high=2.0, threshold=0.7)
    rollout = wrapped.generate(["1+1="], SamplingParams(max_new_tokens=3, temperature=1.0, seed=0))
    assert recorder.params[0].entropy_temperature == (0.5, 2.0, 0.7)
    assert recorder.params[0].max_new_tokens == 3
    # h above any possible entropy (ln V): every token is "other" and sampled at T_low = 0.5,
    # which is plain T = 0.5 sampling -- same tokens and the same recorded entropies.
    never = EntropyTemperatureBackend(recorder, t_low=0.5, t_high=2.0, threshold=1e9)
    got = never.generate(["1+1="], SamplingParams(max_new_tokens=4, seed=1))
    plain = recorder.inner.generate(["1+1="], SamplingParams(max_new_tokens=4, temperature=0.5, seed=1))
    assert torch.equal(got.response_ids, plain.response_ids)
    torch.testing.assert_close(got.sampler_entropy, plain.sampler_entropy)
    assert rollout.response_ids.shape[0] == 1

    h, n = measure_threshold(recorder.inner, ["1+1=", "2+2="], k=2, max_new_tokens=5, percentile=80)
    assert n > 0 and 0 < h <= torch.log(torch.tensor(float(len(tok)))).item() + 1e-4


def test_threshold_from_entropy_json(tmp_path):
    path = tmp_path / "entropy.json"
    path.write_text(json.dumps({"p80": 0.672, "temperature": 1.0, "num_tokens": 10}))
    h, data = threshold_from_entropy_json(path)
    assert h == 0.672 and data["num_tokens"] == 10
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="p80"):
        threshold_from_entropy_json(tmp_path / "bad.json")


def test_run_temperature_writes_sweeps_and_plot(model_dir, data, tmp_path):
    entropy_json = tmp_path / "entropy.json"
    entropy_json.write_text(json.dumps({"p80": 4.58, "temperature": 1.0, "num_tokens": 100}))
    out = tmp_path / "out"
    result = run_temperature(
        str(model_dir),
        data,
        out,
        t_high_values=[0.5, 1.0],
        t_low_values=[1.0, 1.5],
        entropy_json=str(entropy_json),
        k=2,
        max_new_tokens=4,
        batch_size=6,
        reward=alnum_reward,
        dtype="float32",
        device="cpu",
    )
    saved = json.loads((out / "temperature.json").read_text())
    assert saved["threshold"] == 4.58 and saved["threshold_source"] == "entropy.json"
    assert [(r["t_low"], r["t_high"]) for r in saved["t_high_sweep"]] == [(1.0, 0.5), (1.0, 1.0)]
    assert [(r["t_low"], r["t_high"]) for r in saved["t_low_sweep"]] == [(1.0, 1.0), (1.5, 1.0)]
    # (1, 1) is shared by both sweeps: evaluated once, identical numbers
    assert saved["t_high_sweep"][1] == saved["t_low_sweep"][0]
    assert all(0.0 <= r["acc"] <= 100.0 for r in saved["t_high_sweep"] + saved["t_low_sweep"])
    assert saved["t_high_sweep"][0]["per_file"]["bench"]["len"] <= 4
    assert result["k"] == 2
    assert (out / "temperature.png").stat().st_size > 1000

    measured = run_temperature(
        str(model_dir),
        [data],
        tmp_path / "m",
        t_high_values=[1.0],
        t_low_values=[1.0],
        k=1,
        max_new_tokens=3,
        calibration_questions=2,
        calibration_k=2,
        reward=alnum_reward,
        dtype="float32",
        device="cpu",
    )
    assert measured["threshold_source"] == "measured" and measured["calibration"]["num_tokens"] > 0
