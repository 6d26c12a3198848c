"""Training on `rollout.backend=vllm`: weights pushed at build and after every step, determinism,
exact resume, 2 processes equal 1, evaluation through the engine, and what the backend refuses.

The engine samples from its own copy of the weights; the trainer scores with its own forward. The
per-step `rollout_mismatch_abs_max` (max |log π_old − log π_sampler| over the step's tokens) is
therefore the test of the weight push: measured ~1e-5 when the engine holds the trained weights
(float32 kernels of two libraries), ~1e-2 and more when it still holds those of the step before.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from forkrl.config import ConfigError, load_config
from forkrl.rollout import vllm as vllm_backend
from forkrl.train.trainer import run_training
from tests.train.conftest import tiny_overrides

PUSHED = 1e-3
"""Bound on max |log π_old − log π_sampler| when the engine holds the trainer's weights."""


def overrides(model_dir, data, out, **extra):
    vllm = {
        "rollout.backend": "vllm",
        "rollout.backend_kwargs.kv_cache_memory_bytes": 64 * 2**20,
        "rollout.backend_kwargs.max_model_len": 256,
        "optim.lr": 1e-2,
    }
    return tiny_overrides(model_dir, data, out, **{**vllm, **extra})


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"step_{step:06d}" / "model.safetensors"))


@pytest.fixture(scope="module")
def straight(vllm_model_dir, prompts_file, tmp_path_factory):
    """3 steps on vllm, checkpointed every step."""
    out = tmp_path_factory.mktemp("straight") / "run"
    run_training(None, overrides(vllm_model_dir, prompts_file, str(out), **{"trainer.total_steps": 3}))
    return out


def test_every_step_samples_the_trained_weights(straight):
    records = _records(straight)
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert r["rollout_mismatch_abs_max"] < PUSHED, r
        assert r["rollout_mismatch_ratio_out_frac"] == 0
        assert r["rollout_tis_weight_mean"] == pytest.approx(1.0, abs=1e-3)  # auto -> tis for vllm
        assert "entropy_p50" in r  # from the trainer's own pass (the engine gives no entropy)
    assert "rollout_correction: tis" in (straight / "config.yaml").read_text()


def test_without_the_push_after_each_step_the_sampler_lags(vllm_model_dir, prompts_file, tmp_path, monkeypatch):
    pushes = []
    real = vllm_backend.VLLMGenerationBackend.update_weights

    def push_only_at_build(self, model):
        if not pushes:
            real(self, model)
        pushes.append(1)

    monkeypatch.setattr(vllm_backend.VLLMGenerationBackend, "update_weights", push_only_at_build)
    out = tmp_path / "run"
    run_training(None, overrides(vllm_model_dir, prompts_file, str(out), **{"trainer.total_steps": 2}))
    records = _records(out)
    assert records[0]["rollout_mismatch_abs_max"] < PUSHED
    assert records[1]["rollout_mismatch_abs_max"] > 10 * PUSHED  # what the real push prevents


def test_same_seed_same_weights(straight, vllm_model_dir, prompts_file, tmp_path):
    again = tmp_path / "again"
    run_training(None, overrides(vllm_model_dir, prompts_file, str(again), **{"trainer.total_steps": 3}))
    a, b = _weights(straight, 3), _weights(again, 3)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_samples_the_checkpoint(straight, vllm_model_dir, prompts_file, tmp_path):
    """2 steps, then a resumed 3rd: its engine is built with the checkpoint's weights (not the base
    model's), so the 3rd step samples what the straight run sampled and the weights agree."""
    resumed = tmp_path / "resumed"
    run_training(None, overrides(vllm_model_dir, prompts_file, str(resumed), **{"trainer.total_steps": 2}))
    run_training(None, ["trainer.total_steps=3"], resume=str(resumed))
    assert _records(resumed)[-1]["rollout_mismatch_abs_max"] < PUSHED
    a, b = _weights(straight, 3), _weights(resumed, 3)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def test_two_processes_equal_one_process(straight, vllm_model_dir, prompts_file, tmp_path):
    """torchrun with 2 gloo processes, one engine each (each joins the trainer's group), 1 prompt per
    process, equals 1 process: per-response seeds make the samples independent of the split."""
    two = tmp_path / "two"
    common = {"trainer.total_steps": 2, "selection.scope": "global", "optim.micro_batch_size": 2}
    one = tmp_path / "one"
    run_training(None, overrides(vllm_model_dir, prompts_file, str(one), **common))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29571"]
    cmd += ["-m", "forkrl.cli", "train", *overrides(vllm_model_dir, prompts_file, str(two), **common)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert all(r["rollout_mismatch_abs_max"] < PUSHED for r in _records(two))
    a, b = _weights(one, 2), _weights(two, 2)
    # Same samples, same losses to ~1e-7; the weights differ by rounding only: 2 processes sum the
    # gradient in another order, and Adam's g/(√v + ε) magnifies that where a gradient is tiny
    # (measured up to 1.0e-5 with lr 1e-2). Other samples would move weights by ~lr = 1e-2.
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-4, msg=key)


def test_evaluation_goes_through_the_engine(vllm_model_dir, prompts_file, tmp_path, monkeypatch):
    seen = []
    real = vllm_backend.VLLMGenerationBackend.generate

    def counting(self, prompts, params):
        seen.append(len(prompts))
        return real(self, prompts, params)

    monkeypatch.setattr(vllm_backend.VLLMGenerationBackend, "generate", counting)
    monkeypatch.setattr("forkrl.rollout.hf.HFGenerationBackend.generate", _no_hf_sampling)
    out = tmp_path / "run"
    extra = {"trainer.total_steps": 1, "trainer.eval_every": 1, "data.eval_files": f"[{prompts_file}]"}
    extra |= {"trainer.eval_samples": 2, "trainer.eval_reward": "tests.train.reward_fns:vowel_fraction"}
    last = run_training(None, overrides(vllm_model_dir, prompts_file, str(out), **extra))
    assert any(k.startswith("eval/") and k.endswith("acc_at_k") for k in last)
    assert sum(seen) >= 8 * 2 + 2 * 4  # the evaluation's 8 questions x 2 samples, and the step's rollouts


def _no_hf_sampling(self, prompts, params):
    raise AssertionError("sampled with the HF backend during a vllm run")


@pytest.mark.parametrize(
    "extra, names",
    [
        ({"rollout.backend_kwargs.max_num_seqs": 0}, ["rollout.backend_kwargs.max_num_seqs = 0", "> 0"]),
        ({"rollout.backend_kwargs.tensor_parallel": 2}, ["rollout.backend_kwargs.tensor_parallel", "vllm"]),
        ({"rollout.backend_kwargs.dtype": "fp8"}, ["rollout.backend_kwargs.dtype", "'fp8'"]),
        ({"rollout.backend": "hf"}, ["rollout.backend_kwargs.kv_cache_memory_bytes", "'hf' takes no options"]),
    ],
)
def test_a_config_the_backend_cannot_serve_is_refused(vllm_model_dir, prompts_file, tmp_path, extra, names):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides(vllm_model_dir, prompts_file, str(tmp_path / "run"), **extra))
    assert all(n in str(err.value) for n in names), str(err.value)
    assert not (tmp_path / "run").exists()


def test_lora_pushes_the_merged_weights(vllm_model_dir, prompts_file, tmp_path):
    """Under LoRA the engine gets base + adapter merged (`PolicyModels.full_state_dict`)."""
    out = tmp_path / "run"
    lora = {"model.lora_rank": 4, "model.lora_target_modules": "[q_proj, v_proj]", "optim.lr": 5e-2}
    run_training(None, overrides(vllm_model_dir, prompts_file, str(out), **lora))
    assert all(r["rollout_mismatch_abs_max"] < PUSHED for r in _records(out))


def test_fsdp2_pushes_the_gathered_weights(vllm_model_dir, prompts_file, tmp_path):
    """Under FSDP2 every process gathers the full weights for its own engine."""
    out = tmp_path / "run"
    common = {"trainer.strategy": "fsdp2", "selection.scope": "global", "optim.micro_batch_size": 2}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29573"]
    cmd += ["-m", "forkrl.cli", "train", *overrides(vllm_model_dir, prompts_file, str(out), **common)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = _records(out)
    assert len(records) == 2 and all(r["rollout_mismatch_abs_max"] < PUSHED for r in records)
