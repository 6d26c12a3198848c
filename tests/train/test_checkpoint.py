import os
import signal
import subprocess
import sys
import textwrap
import time

import torch
from transformers import AutoModelForCausalLM

from forkrl.models.tiny import build_tiny_model, build_tiny_tokenizer
from forkrl.train.checkpoint import (
    capture_rng_state,
    latest_checkpoint,
    list_checkpoints,
    load_trainer_state,
    save_checkpoint,
)


def _parts(seed: int = 0):
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0)
    return model, tokenizer, optimizer, scheduler


def _state(optimizer, scheduler, trainer: dict) -> dict:
    """What the trainer's parts write besides the step (`forkrl.train.state.Checkpointer`)."""
    return {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": capture_rng_state(),
        "trainer": trainer,
    }


def test_save_load_roundtrip_and_pruning(tmp_path):
    model, tokenizer, optimizer, scheduler = _parts()
    for step in (1, 2, 3):
        state = _state(optimizer, scheduler, {"sampler": {"epoch": step}})
        save_checkpoint(tmp_path, step, model, tokenizer, state, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000002", "step_000003"]
    latest = latest_checkpoint(tmp_path)
    state = load_trainer_state(latest)
    assert state["step"] == 3 and state["trainer"]["sampler"] == {"epoch": 3}
    loaded = AutoModelForCausalLM.from_pretrained(latest)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


KILLED_SAVE = textwrap.dedent(
    """
    import sys, time, torch
    from tests.train.test_checkpoint import _parts, _state
    from forkrl.train import checkpoint
    model, tokenizer, optimizer, scheduler = _parts(seed=1)
    real_save = torch.save
    def slow_save(obj, path, *a, **k):  # the model files are written; stall before the state
        print("writing", flush=True)
        time.sleep(60)
        real_save(obj, path, *a, **k)
    checkpoint.torch.save = slow_save
    checkpoint.save_checkpoint(sys.argv[1], 2, model, tokenizer, _state(optimizer, scheduler, {}), keep=2)
    """
)


def test_sigkill_mid_checkpoint_keeps_previous(tmp_path):
    model, tokenizer, optimizer, scheduler = _parts(seed=0)
    save_checkpoint(tmp_path, 1, model, tokenizer, _state(optimizer, scheduler, {"marker": "good"}))
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_SAVE, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
    )
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    # The half-written step 2 is invisible; step 1 is whole and loads.
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000001"]
    assert any(p.name.startswith(".tmp-step_000002") for p in (tmp_path / "checkpoints").iterdir())
    assert load_trainer_state(latest_checkpoint(tmp_path))["trainer"] == {"marker": "good"}
    loaded = AutoModelForCausalLM.from_pretrained(latest_checkpoint(tmp_path))
    torch.testing.assert_close(loaded.state_dict()["model.norm.weight"], model.state_dict()["model.norm.weight"])
    # The next save sweeps the leftover temporary directory.
    time.sleep(0.1)
    save_checkpoint(tmp_path, 3, model, tokenizer, _state(optimizer, scheduler, {}))
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "checkpoints").iterdir())
