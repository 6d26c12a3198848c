"""The trainer measures the sampler–trainer mismatch every step and corrects it as configured.

`hf` samples with the training model itself: on CPU float32 its recorded log-probs equal the
trainer's old-policy log-probs to float rounding (measured: max |δ| 4.8e-7 over these runs), so the
bound asserted is 1e-5. A backend that reports log-probs off by log 4 on every other token (ratio
π_old/π_sampler = 1/4 there) shows the metrics and both corrections at work.
"""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from forkrl.rollout.hf import build_hf_backend
from forkrl.rollout.registry import BackendCapabilities
from forkrl.train.trainer import run_training
from tests.train.conftest import tiny_overrides


class _ShiftedLogprobs:
    """The `hf` backend, reporting π_sampler 4× too high on even response positions."""

    def __init__(self, inner):
        self.inner = inner

    def generate(self, prompts, params):
        rollout = self.inner.generate(prompts, params)
        even = (torch.arange(rollout.response_ids.shape[1]) % 2 == 0).unsqueeze(0)
        shift = torch.where(even & rollout.response_mask.bool(), math.log(4.0), 0.0)
        rollout.sampler_logprobs = rollout.sampler_logprobs + shift
        return rollout

    def update_weights(self, model):
        self.inner.update_weights(model)


def shifted_backend(ctx):
    return _ShiftedLogprobs(build_hf_backend(ctx))


shifted_backend.capabilities = BackendCapabilities(rollout_correction="tis")


def _last(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])


@pytest.mark.parametrize("epochs", [1, 2])
def test_hf_backend_mismatch_is_float_rounding(tiny_model_dir, prompts_file, tmp_path, epochs):
    out = tmp_path / "run"
    run_training(None, tiny_overrides(tiny_model_dir, prompts_file, str(out), **{"optim.epochs": epochs}))
    last = _last(out)
    assert last["rollout_mismatch_abs_max"] < 1e-5
    assert last["rollout_mismatch_abs_mean"] < 1e-5
    assert last["rollout_mismatch_ratio_out_frac"] == 0
    assert "rollout_tis_weight_mean" not in last  # auto -> none for hf
    assert yaml.safe_load((out / "config.yaml").read_text())["loss"]["rollout_correction"] == "none"


BACKEND = "tests.train.test_rollout_mismatch:shifted_backend"


def test_mismatch_metrics_and_tis_default_of_the_backend(tiny_model_dir, prompts_file, tmp_path):
    out = tmp_path / "run"
    run_training(None, tiny_overrides(tiny_model_dir, prompts_file, str(out), **{"rollout.backend": BACKEND}))
    last = _last(out)
    # Half the tokens (even positions) have ratio 1/4: |δ| = log 4 there, 0 elsewhere (to rounding).
    frac = last["rollout_mismatch_ratio_out_frac"]
    assert 0.4 < frac < 0.7
    assert last["rollout_mismatch_abs_max"] == pytest.approx(math.log(4.0), abs=1e-5)
    assert last["rollout_mismatch_abs_mean"] == pytest.approx(frac * math.log(4.0), abs=1e-5)
    # k3 at ratio 1/4: 1/4 − 1 + log 4 = 0.636294 on the shifted tokens.
    assert last["rollout_mismatch_kl_k3"] == pytest.approx(frac * 0.636294, abs=1e-5)
    # auto -> the backend's tis: weights 1/4 there, 1 elsewhere.
    assert last["rollout_tis_weight_mean"] == pytest.approx(1 - 0.75 * frac, abs=1e-5)
    assert yaml.safe_load((out / "config.yaml").read_text())["loss"]["rollout_correction"] == "tis"


def test_mis_masks_the_mismatched_tokens(tiny_model_dir, prompts_file, tmp_path):
    out = tmp_path / "run"
    overrides = {"rollout.backend": BACKEND, "loss.rollout_correction": "mis", "selection.strategy": "all"}
    run_training(None, tiny_overrides(tiny_model_dir, prompts_file, str(out), **overrides))
    last = _last(out)
    # Exactly the tokens outside [1/2, 2] leave the loss: kept_frac counts the rest.
    assert last["rollout_mis_masked_frac"] == pytest.approx(last["rollout_mismatch_ratio_out_frac"], abs=1e-9)
    assert last["kept_frac"] == pytest.approx(1.0)  # of the tokens the loss sees
    assert "rollout_tis_weight_mean" not in last
