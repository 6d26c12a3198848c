"""docs/step.md, the one-screen RL step: its code runs, and its loss is the trainer's on the same batch."""

import copy
import re
from pathlib import Path

import pytest
import torch

from forkrl.config import load_config
from forkrl.models.loading import load_policy
from forkrl.tasks.data import PromptExample
from forkrl.train.trainer import Trainer
from tests.train.conftest import tiny_overrides

STEP_DOC = Path(__file__).resolve().parents[1] / "docs" / "step.md"


@pytest.fixture(scope="module")
def step():
    """The namespace the doc's python block defines (`rl_step`, `policy_update`)."""
    (code,) = re.findall(r"```python\n(.*?)```", STEP_DOC.read_text(encoding="utf-8"), flags=re.S)
    namespace: dict = {}
    exec(compile(code, str(STEP_DOC), "exec"), namespace)
    return namespace


def test_the_step_is_one_screen(step):
    (code,) = re.findall(r"```python\n(.*?)```", STEP_DOC.read_text(encoding="utf-8"), flags=re.S)
    assert len(code.splitlines()) <= 90


def test_the_step_runs_end_to_end(step, tiny_model_dir):
    model, tokenizer = load_policy(tiny_model_dir, dtype="float32", device="cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    examples = [PromptExample(f"what is {i} plus 1?", f"what is {i} plus 1?", str(i + 1), i) for i in range(2)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def vowels(text, example):
        return sum(c in "aeiou" for c in text) / max(len(text), 1)

    loss = step["rl_step"](model, tokenizer, examples, vowels, optimizer, group_size=4, max_new_tokens=12)
    assert loss.shape == () and torch.isfinite(loss)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("strategy, ratio", [("top", 0.2), ("all", 1.0)])
def test_the_steps_loss_is_the_trainers(step, tiny_model_dir, prompts_file, tmp_path, strategy, ratio):
    """One step, one mini-batch of one micro-batch (8 rows), one update per batch: the trainer's setting
    that docs/step.md writes out."""
    cfg = load_config(
        None,
        tiny_overrides(
            tiny_model_dir, prompts_file, str(tmp_path / "run"),
            **{"trainer.total_steps": 1, "optim.micro_batch_size": 8, "rollout.dynamic_sampling": "false",
               "selection.strategy": strategy, "selection.ratio": ratio},
        ),
    )  # fmt: skip
    trainer = Trainer(cfg)
    policy_before = copy.deepcopy(trainer.model)
    batches = []
    collect = trainer.collector.collect
    trainer.collector.collect = lambda *a, **k: batches.append(collect(*a, **k)) or batches[-1]
    metrics = trainer.train()

    (batch,) = [collected.batch for collected in batches]
    optimizer = torch.optim.AdamW(policy_before.parameters(), lr=cfg.optim.lr)
    policy_before.train()
    loss = step["policy_update"](
        policy_before, batch.rollout, batch.advantages, optimizer, cfg.rollout.temperature, strategy, ratio,
        cfg.loss, cfg.optim.grad_clip,
    )  # fmt: skip
    torch.testing.assert_close(loss.double(), torch.tensor(metrics["loss"], dtype=torch.float64), rtol=1e-6, atol=1e-7)
