"""`selection.strategy=gradient` through the trainer, in every scope: the trainer hands `select_tokens`
the log-prob gradient norms of the tokens being ranked, and the kept tokens are their exact top-⌈ρN⌉."""

import json

import pytest
import torch

from forkrl.algo import selection as selection_part
from forkrl.ops import token_ranking as selection
from forkrl.train.trainer import run_training
from tests.ops.test_gradient_selection import brute_force_gradient_mask
from tests.train.conftest import tiny_overrides


@pytest.mark.parametrize("scope, entropy_source", [("microbatch", "current"), ("batch", "current"), ("global", "old")])
def test_gradient_selection_in_every_scope(tiny_model_dir, prompts_file, tmp_path, monkeypatch, scope, entropy_source):
    calls = []

    def recording_select(entropy, mask, strategy, ratio, **kwargs):
        chosen = selection.select_tokens(entropy, mask, strategy, ratio, **kwargs)
        calls.append((kwargs["grad_norm"], mask, chosen.mask))
        return chosen

    monkeypatch.setattr(selection_part, "select_tokens", recording_select)
    out = tmp_path / "run"
    run_training(
        None,
        tiny_overrides(
            tiny_model_dir,
            prompts_file,
            str(out),
            **{
                "selection.strategy": "gradient",
                "selection.scope": scope,
                "selection.entropy_source": entropy_source,
                "trainer.total_steps": 1,
                # two mini-batches per step: the second ranks by the updated policy (or the old one)
                "rollout.prompts_per_step": 2,
                "optim.mini_batch_size": 1,
                "optim.micro_batch_size": 2,
            },
        ),
    )
    # microbatch: 2 micro-batches in each of 2 mini-batches; batch/global: one ranking per mini-batch
    assert len(calls) == (4 if scope == "microbatch" else 2)
    for grad_norm, mask, kept in calls:
        valid = mask.bool()
        # ‖e_y − p‖₂ / T lies in (0, √2] at T = 1, and is 0 at padding
        assert bool((grad_norm[valid] > 0).all()) and bool((grad_norm[valid] <= 2**0.5 + 1e-6).all())
        assert bool((grad_norm[~valid] == 0).all())
        assert torch.equal(kept, brute_force_gradient_mask(grad_norm, mask, 0.2))
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0.2 <= record["kept_frac"] < 0.4
