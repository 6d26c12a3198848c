"""Selection strategies and generation backends are registered parts: a test module adds one of
each and trains with it without touching `src/`; `random` selection runs no scoring pass."""

import math

import pytest
import torch
from safetensors.torch import load_file

from forkrl.algo.selection import SCOPES
from forkrl.config import ConfigError, load_config
from forkrl.models.scoring import ResponseScorer
from forkrl.ops.token_ranking import STRATEGIES, register_strategy
from forkrl.rollout.hf import HFGenerationBackend
from forkrl.rollout.registry import BACKENDS, BackendCapabilities, register_backend
from forkrl.train.trainer import Trainer, run_training
from tests.train.conftest import tiny_overrides


@pytest.fixture
def earliest_strategy():
    """`earliest`: keep the ⌈ρN⌉ earliest response tokens in row-major order (needs no scores)."""
    calls = []

    @register_strategy("earliest", ranks_by=None)
    def earliest(values, valid, k, scope, generator):
        calls.append(int(valid.sum()))
        flat = valid.flatten()
        return (flat & (flat.cumsum(0) <= k)).view(valid.shape), None

    yield calls
    del STRATEGIES["earliest"]


def test_a_strategy_registered_in_a_test_trains(tiny_model_dir, prompts_file, tmp_path, monkeypatch, earliest_strategy):
    import forkrl.algo.selection as part

    kept = []
    real = part.select_tokens

    def spy(entropy, mask, strategy, ratio, **kwargs):
        chosen = real(entropy, mask, strategy, ratio, **kwargs)
        kept.append((chosen.mask.clone(), mask.bool().clone()))
        return chosen

    monkeypatch.setattr(part, "select_tokens", spy)
    overrides = tiny_overrides(
        tiny_model_dir, prompts_file, str(tmp_path / "run"),
        **{"selection.strategy": "earliest", "selection.ratio": 0.3, "rollout.dynamic_sampling": "false"},
    )  # fmt: skip
    run_training(None, overrides)
    assert len(earliest_strategy) == len(kept) == 4  # 2 steps x 2 micro-batches of 4 rows
    for mask, valid in kept:
        k = math.ceil(0.3 * int(valid.sum()))
        order = valid.flatten().nonzero().squeeze(1)
        # exactly the first k valid tokens in row-major order
        assert int(mask.sum()) == k
        assert mask.flatten()[order[:k]].all() and not mask.flatten()[order[k:]].any()


class RecordingBackend(HFGenerationBackend):
    """The HF backend, plus a copy of the weights it is handed at each `update_weights`."""

    received: list[dict[str, torch.Tensor]] = []

    def update_weights(self, model):
        super().update_weights(model)
        RecordingBackend.received.append({k: v.detach().clone() for k, v in model.state_dict().items()})


@pytest.fixture
def recording_backend():
    RecordingBackend.received = []

    @register_backend("recording", BackendCapabilities(sampler_entropy=True))
    def build(ctx):
        return RecordingBackend(
            ctx.model, ctx.tokenizer, batch_size=ctx.rollout.generation_batch_size, around=ctx.forward_context
        )

    yield RecordingBackend.received
    del BACKENDS["recording"]


def test_a_backend_registered_in_a_test_gets_the_weights_after_every_step(
    tiny_model_dir, prompts_file, tmp_path, recording_backend
):
    out = tmp_path / "run"
    run_training(
        None,
        tiny_overrides(
            tiny_model_dir, prompts_file, str(out),
            **{"rollout.backend": "recording", "trainer.save_every": 1, "trainer.keep_checkpoints": 3},
        ),
    )  # fmt: skip
    assert len(recording_backend) == 2  # once after each of the 2 steps
    base = load_file(f"{tiny_model_dir}/model.safetensors")
    for step, weights in enumerate(recording_backend, start=1):
        saved = load_file(out / "checkpoints" / f"step_{step:06d}" / "model.safetensors")
        for name, tensor in saved.items():
            assert torch.equal(weights[name], tensor), (step, name)  # the weights after that step's update
        assert any(not torch.equal(saved[n], base[n]) for n in saved)  # and they did change


def test_a_backend_lacking_a_capability_is_refused_naming_both(tiny_model_dir, prompts_file, tmp_path):
    @register_backend("plain", BackendCapabilities())
    def build(ctx):
        raise AssertionError("never built")

    try:
        overrides = tiny_overrides(tiny_model_dir, prompts_file, str(tmp_path / "run"), **{"rollout.backend": "plain"})
        with pytest.raises(ConfigError, match=r"rollout.entropy_temperature = .*'plain' does not support entropy_temp"):
            load_config(None, [*overrides, "rollout.entropy_temperature=[0.5,1.5,0.672]"])
        with pytest.raises(ConfigError, match=r"rollout.decode_phase = 4: rollout.backend 'plain' does not support"):
            load_config(None, [*overrides, "rollout.decode_phase=4"])
        with pytest.raises(ConfigError, match="unknown rollout.backend 'nope'"):
            load_config(None, [*overrides, "rollout.backend=nope"])
    finally:
        del BACKENDS["plain"]


def test_without_sampler_entropy_the_percentiles_come_from_the_old_policy(tiny_model_dir, prompts_file, tmp_path):
    class NoEntropy(HFGenerationBackend):
        def generate(self, prompts, params):
            ro = super().generate(prompts, params)
            self.last = ro.sampler_entropy.clone()
            ro.sampler_entropy = None
            return ro

    backends = []

    @register_backend("no_entropy", BackendCapabilities(sampler_entropy=False))
    def build(ctx):
        backends.append(NoEntropy(ctx.model, ctx.tokenizer, around=ctx.forward_context))
        return backends[-1]

    try:
        overrides = tiny_overrides(
            tiny_model_dir, prompts_file, str(tmp_path / "a"), **{"trainer.total_steps": 1,
                                                                    "rollout.dynamic_sampling": "false"}
        )  # fmt: skip
        with_backend = run_training(None, [*overrides, "rollout.backend=no_entropy"])
        reference = run_training(None, [*overrides, f"output_dir={tmp_path / 'b'}"])
    finally:
        del BACKENDS["no_entropy"]
    # The update's entropies (π_old = π_θ, one update per batch) equal the sampler's up to float rounding.
    for p in (10, 50, 90):
        assert with_backend[f"entropy_p{p}"] == pytest.approx(reference[f"entropy_p{p}"], abs=1e-4)


def _count_forwards(monkeypatch) -> list[int]:
    calls = []
    real = ResponseScorer.forward

    def counting(self, *args, **kwargs):
        calls.append(args[0].shape[0])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ResponseScorer, "forward", counting)
    return calls


@pytest.mark.parametrize("strategy, extra_passes", [("random", 0), ("top", 1)])
def test_random_in_batch_scope_runs_no_scoring_pass(
    tiny_model_dir, prompts_file, tmp_path, monkeypatch, strategy, extra_passes
):
    cfg = load_config(
        None,
        tiny_overrides(
            tiny_model_dir, prompts_file, str(tmp_path / strategy),
            **{"selection.strategy": strategy, "selection.scope": "batch", "trainer.total_steps": 1,
               "rollout.dynamic_sampling": "false"},
        ),
    )  # fmt: skip
    trainer = Trainer(cfg)
    calls = _count_forwards(monkeypatch)
    trainer.train()
    # one update (one mini-batch, one epoch: on-policy, no old-policy pass); 8 rows in micro-batches of 4
    assert calls == [4, 4] * extra_passes + [4, 4]


def test_scopes_are_registered():
    assert list(SCOPES) == ["microbatch", "batch", "global"]
    assert [SCOPES[s].ranks_mini_batch for s in SCOPES] == [False, True, True]


@pytest.mark.parametrize("strategy, region", [("span", "all"), ("top", "outside_span")])
def test_span_selection_keeps_the_span_and_counts_it(
    tiny_model_dir, prompts_file, tmp_path, monkeypatch, strategy, region
):
    """The tiny random model's text has vowels; the span is the last run of vowels of each response."""
    import forkrl.train.update as update
    from forkrl.algo.spans import span_token_mask

    seen = []
    real = update.compute_policy_loss

    def spy(inp, cfg, denoms, generator=None):
        seen.append((inp.kept_mask.clone(), inp.response_mask.clone(), denoms.num_kept))
        return real(inp, cfg, denoms, generator)

    monkeypatch.setattr(update, "compute_policy_loss", spy)
    pattern = "(?P<span>[aeiou]+)"
    cfg = load_config(
        None,
        tiny_overrides(
            tiny_model_dir, prompts_file, str(tmp_path / "run"),
            **{"selection.strategy": strategy, "selection.region": region, "selection.span_pattern": pattern,
               "selection.ratio": 0.5, "trainer.total_steps": 1, "rollout.dynamic_sampling": "false"},
        ),
    )  # fmt: skip
    trainer = Trainer(cfg)
    batches = []
    real_collect = trainer.collector.collect
    trainer.collector.collect = lambda *a, **k: batches.append(real_collect(*a, **k)) or batches[-1]
    metrics = trainer.train()
    batch = batches[0].batch
    expected, _ = span_token_mask(
        trainer.tokenizer, batch.rollout.response_ids, batch.rollout.response_mask, pattern,
        "span" if strategy == "span" else region,
    )  # fmt: skip
    assert torch.equal(batch.candidates, expected)
    kept = torch.cat([k for k, _, _ in seen])
    assert not (kept & ~expected).any()  # only region tokens carry the gradient
    per_micro = [int(c.sum()) for c in expected.split(4)]
    if strategy == "span":
        assert torch.equal(kept, expected)  # every span token
        assert seen[0][2] == sum(per_micro)
    else:
        assert [int(k.sum()) for k, _, _ in seen] == [math.ceil(0.5 * n) for n in per_micro]
        assert seen[0][2] == sum(math.ceil(0.5 * n) for n in per_micro)
    assert 0 < metrics["span_found_frac"] <= 1
