import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from forkrl.cli import app
from forkrl.train import update as update_module
from forkrl.train.trainer import TrainingStopped, run_training
from tests.train.conftest import tiny_overrides

REQUIRED_METRICS = [
    "reward",
    "accuracy",
    "response_length",
    "entropy",
    "entropy_kept",
    "entropy_threshold",
    "kept_frac",
    "clip_frac_low",
    "clip_frac_high",
    "approx_kl_old",
    "cov_mean",
    "cov_pos_frac",
    "tokens_per_s",
    "generate_s",
    "reward_s",
    "old_logprobs_s",
    "update_s",
    "grad_norm",
    "loss",
    "groups_trained",
    "reward_invalid_format",
    *[f"entropy_p{p}" for p in range(0, 101, 10)],
]


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint / "model.safetensors"))


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


class TestTrainTinyModel:
    def test_two_steps_change_weights_and_log_everything(self, tiny_model_dir, prompts_file, tmp_path):
        out = tmp_path / "run"
        run_training(None, tiny_overrides(tiny_model_dir, prompts_file, str(out)))
        records = _records(out)
        assert [r["step"] for r in records] == [1, 2]
        missing = [m for m in REQUIRED_METRICS if m not in records[-1]]
        assert not missing, f"metrics.jsonl lacks {missing}"
        # top-20% selection keeps ⌈0.2·N⌉ of N tokens per micro-batch: a fraction in [0.2, 0.2 + 1/N]
        assert 0.2 <= records[-1]["kept_frac"] < 0.35
        final = out / "checkpoints" / "step_000002"
        before = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
        after = _weights(final)
        changed = [k for k in before if not torch.equal(before[k], after[k])]
        assert changed, "no weight changed after two RL steps"
        model = AutoModelForCausalLM.from_pretrained(final)
        assert model.config.vocab_size == AutoModelForCausalLM.from_pretrained(tiny_model_dir).config.vocab_size
        assert (out / "config.yaml").is_file() and (out / "samples.jsonl").stat().st_size > 0

    def test_eval_every_n_steps(self, tiny_model_dir, prompts_file, tmp_path):
        out = tmp_path / "run"
        overrides = tiny_overrides(
            tiny_model_dir,
            prompts_file,
            str(out),
            **{
                "data.eval_files": f"[{prompts_file}]",
                "trainer.eval_every": 2,
                "trainer.eval_samples": 2,
                "trainer.eval_max_new_tokens": 6,
            },
        )
        run_training(None, overrides)
        records = _records(out)
        assert "eval/train/acc_at_k" not in records[0] and "eval/train/acc_at_k" in records[1]
        assert 0.0 <= records[1]["eval/train/acc_at_k"] <= 100.0 and records[1]["eval/train/len_at_k"] <= 6
        assert (out / "eval" / "step_000002" / "eval.json").is_file()

    def test_resume_matches_straight_run(self, tiny_model_dir, prompts_file, tmp_path):
        straight, resumed = tmp_path / "straight", tmp_path / "resumed"
        run_training(None, tiny_overrides(tiny_model_dir, prompts_file, str(straight), **{"trainer.total_steps": 4}))
        run_training(None, tiny_overrides(tiny_model_dir, prompts_file, str(resumed), **{"trainer.total_steps": 2}))
        run_training(None, ["trainer.total_steps=4"], resume=str(resumed))
        a, b = _weights(straight / "checkpoints" / "step_000004"), _weights(resumed / "checkpoints" / "step_000004")
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
        assert [r["step"] for r in _records(resumed)] == [1, 2, 3, 4]

    def test_oversampled_round_trains_on_the_same_first_groups(self, tiny_model_dir, prompts_file, tmp_path):
        """prompts_per_round = 2 x prompts_per_step fills the batch in one round; the trained groups are
        the first prompts of the stream with their own seeds, so step 1 equals the plain run's step 1."""
        runs = {}
        for per_round in (0, 4):
            out = tmp_path / f"round{per_round}"
            extra = {"trainer.total_steps": 1, "rollout.prompts_per_round": per_round}
            runs[per_round] = (run_training(None, tiny_overrides(tiny_model_dir, prompts_file, str(out), **extra)), out)
        (plain, plain_dir), (over, over_dir) = runs[0], runs[4]
        assert (plain["groups_sampled"], over["groups_sampled"]) == (2, 4)  # vowel_fraction: every group informative
        assert plain["sampling_rounds"] == over["sampling_rounds"] == 1 and over["groups_trained"] == 2
        a, b = _weights(plain_dir / "checkpoints" / "step_000001"), _weights(over_dir / "checkpoints" / "step_000001")
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)

    def test_invalid_format_fraction_is_logged(self, tiny_model_dir, prompts_file, tmp_path):
        # EveryNthInvalid with every=4 (a class named by import path, built with reward.kwargs): of each
        # round's 2 prompts x 4 responses, batch positions 0 and 4 have no parseable answer, so
        # 2 / 8 = 0.25 of the responses in every round, however many rounds the step takes.
        out = tmp_path / "run"
        extra = {
            "reward.function": "tests.train.reward_fns:EveryNthInvalid",
            "reward.kwargs.every": 4,
            "trainer.total_steps": 1,
        }
        metrics = run_training(None, tiny_overrides(tiny_model_dir, prompts_file, str(out), **extra))
        (record,) = _records(out)
        assert record["reward_invalid_format"] == metrics["reward_invalid_format"] == 0.25
        assert record["reward_errors"] == 0  # scored by the reward's rule: not failures

    @pytest.mark.parametrize(
        ("fn", "shown"),
        [
            ("always_raises", "raised RuntimeError: broken reward"),
            ("returns_nan", "returned nan, not a finite number"),
            ("returns_text", "returned '1.0', not a finite number"),
            ("hangs", "timed out after 0.2 s"),
        ],
    )
    def test_broken_reward_stops_the_run_showing_one_failure(self, tiny_model_dir, prompts_file, tmp_path, fn, shown):
        # Issue 13, defect 4: these used to score 0 silently, train on nothing and exit 0.
        overrides = tiny_overrides(
            tiny_model_dir,
            prompts_file,
            str(tmp_path / fn),
            **{"reward.function": f"tests.train.reward_fns:{fn}", "reward.timeout_s": 0.2, "trainer.total_steps": 3},
        )
        with pytest.raises(TrainingStopped) as err:
            run_training(None, overrides)
        message = str(err.value)
        # all 8 calls of step 1 failed, more than the default fraction 0.5; one of them is shown
        assert "8 of 8 calls failed in step 1 (more than reward.max_failed_fraction = 0.5)" in message
        assert shown in message and "\n" not in message
        assert not (tmp_path / fn / "checkpoints").exists()

    def test_nan_loss_stops_after_consecutive_bad_steps(self, tiny_model_dir, prompts_file, tmp_path, monkeypatch):
        real = update_module.compute_policy_loss

        def nan_loss(*args, **kwargs):
            out = real(*args, **kwargs)
            out.loss = out.loss * float("nan")
            return out

        monkeypatch.setattr(update_module, "compute_policy_loss", nan_loss)
        out = tmp_path / "nan"
        overrides = tiny_overrides(
            tiny_model_dir, prompts_file, str(out), **{"trainer.max_bad_steps": 2, "trainer.total_steps": 5}
        )
        with pytest.raises(TrainingStopped, match="2 consecutive optimizer steps had a NaN/inf"):
            run_training(None, overrides)
        saved = out / "checkpoints" / "step_000002"
        before = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
        for key, value in _weights(saved).items():  # skipped steps never touched the weights
            assert torch.equal(value, before[key]), key


class TestBadInput:
    runner = CliRunner()

    def _train(self, *args):
        return self.runner.invoke(app, ["train", *args])

    def test_unknown_key_suggests_nearest(self, tiny_model_dir, prompts_file, tmp_path):
        result = self._train(*tiny_overrides(tiny_model_dir, prompts_file, str(tmp_path)), "selection.ratoi=0.1")
        assert result.exit_code == 2
        assert "unknown config key selection.ratoi; did you mean selection.ratio?" in result.output

    def test_bad_value_names_key_and_range(self, tiny_model_dir, prompts_file, tmp_path):
        result = self._train(*tiny_overrides(tiny_model_dir, prompts_file, str(tmp_path)), "selection.ratio=1.5")
        assert result.exit_code == 2 and "selection.ratio = 1.5: expected a fraction in (0, 1]" in result.output
        result = self._train(*tiny_overrides(tiny_model_dir, prompts_file, str(tmp_path)), "optim.lr=-1e-6")
        assert result.exit_code == 2 and "optim.lr = -1e-06: expected a positive learning rate" in result.output
        result = self._train(
            *tiny_overrides(tiny_model_dir, prompts_file, str(tmp_path)),
            "rollout.dynamic_sampling=false",
            "rollout.prompts_per_round=4",
        )
        assert result.exit_code == 2 and "rollout.prompts_per_round = 4: expected 0 unless" in result.output
        result = self._train(*tiny_overrides(tiny_model_dir, prompts_file, str(tmp_path)), "trainer.strategy=fsdp")
        assert result.exit_code == 2 and "trainer.strategy = 'fsdp': expected ddp or fsdp2" in result.output
        result = self._train(
            *tiny_overrides(tiny_model_dir, prompts_file, str(tmp_path)), "trainer.strategy=fsdp2", "model.lora_rank=4"
        )
        assert result.exit_code == 2 and "trainer.strategy = 'fsdp2': expected ddp with LoRA" in result.output

    def test_missing_file(self, tiny_model_dir, tmp_path):
        result = self._train(*tiny_overrides(tiny_model_dir, str(tmp_path / "nope.jsonl"), str(tmp_path)))
        assert result.exit_code == 2
        assert "data.train_files[0]" in result.output and "nope.jsonl': file not found" in result.output

    def test_missing_dataset_field_names_file_and_row(self, tiny_model_dir, tmp_path):
        data = tmp_path / "bad.jsonl"
        data.write_text('{"question": "1+1", "answer": "2"}\n{"prompt": "2+2", "answer": "4"}\n')
        with pytest.raises(Exception, match=r"bad\.jsonl.*(line|row) 2.*question"):
            run_training(None, tiny_overrides(tiny_model_dir, str(data), str(tmp_path / "run")))


def _torchrun_train(port: int, overrides: list[str], resume: Path | None = None) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}"]
    cmd += ["-m", "forkrl.cli", "train", *overrides, *([f"--resume={resume}"] if resume else [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize(
    ("strategy", "ref_kl", "steps", "port"),
    [("ddp", 0.0, 1, 29533), ("fsdp2", 0.0, 1, 29537), ("fsdp2", 0.5, 2, 29539)],
)
def test_two_processes_equal_one_process(tiny_model_dir, prompts_file, tmp_path, strategy, ref_kl, steps, port):
    """torchrun with 2 gloo processes, 1 prompt each, equals 1 process with both prompts (global
    scope), with replicated (DDP) or sharded (FSDP2) weights, and with a sharded reference model
    (2 steps: at step 1 the policy is the reference and the KL has no gradient)."""
    common = {
        "trainer.total_steps": steps,
        "selection.scope": "global",
        "optim.micro_batch_size": 2,
        "loss.ref_kl_coef": ref_kl,
    }
    one = tmp_path / "one"
    run_training(None, tiny_overrides(tiny_model_dir, prompts_file, str(one), **common))
    two = tmp_path / "two"
    _torchrun_train(
        port, tiny_overrides(tiny_model_dir, prompts_file, str(two), **common, **{"trainer.strategy": strategy})
    )
    last = f"step_{steps:06d}"
    a, b = _weights(one / "checkpoints" / last), _weights(two / "checkpoints" / last)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def test_fsdp2_checkpoint_resumes_on_one_process(tiny_model_dir, prompts_file, tmp_path):
    """2 FSDP2 steps on 2 processes, then a 3rd on 1 process from the gathered checkpoint (weights
    and the full Adam state), equal 3 steps on 1 process: the sharded save loses nothing."""
    common = {"selection.scope": "global", "optim.micro_batch_size": 2, "trainer.strategy": "fsdp2"}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_training(
        None, tiny_overrides(tiny_model_dir, prompts_file, str(straight), **common, **{"trainer.total_steps": 3})
    )
    _torchrun_train(
        29541, tiny_overrides(tiny_model_dir, prompts_file, str(resumed), **common, **{"trainer.total_steps": 2})
    )
    run_training(None, ["trainer.total_steps=3"], resume=str(resumed))
    a, b = _weights(straight / "checkpoints" / "step_000003"), _weights(resumed / "checkpoints" / "step_000003")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def test_lora_trains_adapter_saves_merged_model_and_resumes(tiny_model_dir, prompts_file, tmp_path):
    lora = {"model.lora_rank": 4, "model.lora_target_modules": "[q_proj, v_proj]"}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_training(
        None, tiny_overrides(tiny_model_dir, prompts_file, str(straight), **lora, **{"trainer.total_steps": 3})
    )
    run_training(None, tiny_overrides(tiny_model_dir, prompts_file, str(resumed), **lora, **{"trainer.total_steps": 2}))
    run_training(None, ["trainer.total_steps=3"], resume=str(resumed))
    final = straight / "checkpoints" / "step_000003"
    assert (final / "adapter" / "adapter_config.json").is_file()
    before = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    merged = _weights(final)
    assert set(merged) == set(before)  # a plain HF checkpoint, LoRA merged in
    changed = {k for k in before if not torch.equal(before[k], merged[k])}
    assert changed and all("q_proj" in k or "v_proj" in k for k in changed)
    AutoModelForCausalLM.from_pretrained(final)
    other = _weights(resumed / "checkpoints" / "step_000003")
    for key in merged:
        torch.testing.assert_close(merged[key], other[key], rtol=0, atol=1e-6, msg=key)
