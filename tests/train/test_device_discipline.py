"""GPU correctness that a CPU test can pin: one device for metric sums, collectives only through
`forkrl.distributed`, one meaning of `model.dtype=auto`, the reference model loaded like the
policy (or, under LoRA, the policy with its adapter disabled), and tied-weight-only leniency."""

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from forkrl.config import load_config
from forkrl.metrics import MetricSums
from forkrl.models import precision
from forkrl.models.loading import load_policy
from forkrl.models.tiny import save_tiny_model_dir
from forkrl.train import setup
from forkrl.train.trainer import Trainer, run_training
from tests.train.conftest import tiny_overrides

SRC = Path(__file__).resolve().parents[2] / "src" / "forkrl"


def test_metric_sums_live_on_their_device():
    sums = MetricSums(torch.device("meta"))
    sums.add("reward", torch.tensor(3.0), 2)  # made on the CPU, like the trainer's counts
    sums.add("reward", torch.tensor(1.0, device="meta"), torch.tensor(2))
    sums.add("groups", torch.tensor(4.0), None)
    assert {t.device.type for t in [*sums._sums.values(), *sums._counts.values()]} == {"meta"}
    cpu = MetricSums()
    cpu.add("reward", torch.tensor(3.0), 2)
    cpu.add("reward", torch.tensor(1.0), torch.tensor(2))
    cpu.add("groups", torch.tensor(4.0), None)
    assert cpu.compute() == {"reward": 1.0, "groups": 4.0}


def test_the_trainer_keeps_every_metric_on_its_device(tiny_model_dir, prompts_file, tmp_path, monkeypatch):
    seen = []

    class Spy(MetricSums):
        def add(self, name, value_sum, count):
            super().add(name, value_sum, count)
            seen.append((name, self.device, self._sums[name].device, self._counts[name].device))

    monkeypatch.setattr("forkrl.train.trainer.MetricSums", Spy)
    cfg = load_config(None, tiny_overrides(tiny_model_dir, prompts_file, str(tmp_path / "run")))
    trainer = Trainer(cfg)
    trainer.train()
    names = {name for name, *_ in seen}
    assert {"reward", "groups_sampled", "grad_norm", "tokens_trained", "entropy_p50"} <= names
    assert all(own == trainer.ctx.device == s == c for _, own, s, c in seen)


def test_no_collective_outside_forkrl_distributed():
    pattern = re.compile(r"\bdist\.(all_reduce|all_gather|broadcast|reduce_scatter|barrier|reduce)\(")
    offenders = [
        f"{path.relative_to(SRC)}:{i}"
        for path in SRC.rglob("*.py")
        if path.name != "distributed.py"
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []


def test_dtype_auto_means_float32_weights_with_bf16_autocast_on_cuda(tmp_path):
    assert precision.weights_dtype("auto") == torch.float32
    assert precision.weights_dtype("bfloat16") == torch.bfloat16
    assert not isinstance(precision.autocast("auto", "cpu"), torch.autocast)
    assert not isinstance(precision.autocast("bfloat16", "cuda"), torch.autocast)
    with pytest.warns(UserWarning) if not torch.cuda.is_available() else _no_warning():
        cuda = precision.autocast("auto", "cuda")
    assert isinstance(cuda, torch.autocast) and cuda.device == "cuda" and cuda.fast_dtype == torch.bfloat16
    # a checkpoint saved in bf16 loads as float32 weights under `auto` (not "the checkpoint's dtype")
    path = save_tiny_model_dir(tmp_path / "bf16", seed=0)
    model, _ = load_policy(path, dtype="bfloat16")
    model.save_pretrained(path)
    assert {p.dtype for p in load_policy(path, dtype="auto")[0].parameters()} == {torch.float32}
    with pytest.raises(ValueError, match="dtype must be one of auto, float32"):
        precision.weights_dtype("fp8")


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_reference_model_is_loaded_like_the_policy(tiny_model_dir, prompts_file, tmp_path, monkeypatch):
    calls = []
    real = setup.load_policy

    def spy(name, **kwargs):
        calls.append(kwargs)
        return real(name, **kwargs)

    monkeypatch.setattr(setup, "load_policy", spy)
    overrides = tiny_overrides(
        tiny_model_dir, prompts_file, str(tmp_path / "run"),
        **{"loss.ref_kl_coef": 0.1, "model.attn_implementation": "eager", "model.trust_remote_code": "true",
           "trainer.total_steps": 1},
    )  # fmt: skip
    run_training(None, overrides)
    assert len(calls) == 2
    for key in ("trust_remote_code", "attn_implementation", "dtype", "device"):
        assert calls[0][key] == calls[1][key], key
    assert calls[1]["trust_remote_code"] is True and calls[1]["attn_implementation"] == "eager"


def test_lora_reference_is_the_policy_with_its_adapter_disabled(tiny_model_dir, prompts_file, tmp_path, monkeypatch):
    pytest.importorskip("peft")
    calls = []
    real = setup.load_policy
    monkeypatch.setattr(setup, "load_policy", lambda name, **kw: calls.append(kw) or real(name, **kw))
    cfg = load_config(
        None,
        tiny_overrides(
            tiny_model_dir, prompts_file, str(tmp_path / "run"),
            **{"loss.ref_kl_coef": 0.1, "model.lora_rank": 4, "trainer.total_steps": 1, "optim.lr": 0.05},
        ),
    )  # fmt: skip
    trainer = Trainer(cfg)
    trainer.train()
    assert len(calls) == 1  # no second copy of the weights
    assert isinstance(trainer.models.ref_scorer, setup.AdapterDisabledScorer)
    base, _ = load_policy(tiny_model_dir, dtype="float32", device="cpu")
    ids = torch.tensor([[5, 6, 7, 8]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref = trainer.models.ref_scorer(ids, mask, ids, mask, 1.0)[0]
        expected = setup.ResponseScorer(base)(ids, mask, ids, mask, 1.0)[0]
        policy = trainer.models.policy_scorer(ids, mask, ids, mask, 1.0)[0]
    torch.testing.assert_close(ref, expected)
    assert not torch.allclose(policy, expected)  # the adapter did train


@pytest.mark.parametrize("tied", [True, False])
def test_only_a_tied_lm_head_may_be_missing_from_a_checkpoint(tmp_path, tied):
    path = save_tiny_model_dir(tmp_path / "model", seed=0, tie_word_embeddings=tied)
    state = load_file(path / "model.safetensors")
    state.pop("lm_head.weight", None)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_file(state, ckpt / "model.safetensors")
    model, _ = load_policy(path, dtype="float32", device="cpu")
    if tied:
        setup.load_weights(model, ckpt, lora=False, device=torch.device("cpu"))
    else:
        with pytest.raises(setup.SetupError, match=r"missing \['lm_head.weight'\]"):
            setup.load_weights(model, ckpt, lora=False, device=torch.device("cpu"))
