"""Selection strategies, generation backends and toy tasks are registered parts: a test module adds
one of each and trains with it without touching `src/`; `random` selection runs no scoring pass."""

import json
import math
import random
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from forkrl.algo.selection import SCOPES
from forkrl.cli import app
from forkrl.config import ConfigError, load_config
from forkrl.models.loading import load_policy
from forkrl.models.scoring import ResponseScorer
from forkrl.models.tiny import build_tiny_tokenizer
from forkrl.ops.token_ranking import STRATEGIES, register_strategy
from forkrl.rollout.hf import HFGenerationBackend
from forkrl.rollout.registry import BACKENDS, BackendCapabilities, register_backend
from forkrl.tasks.rewards import REWARD_FUNCTIONS, register_reward
from forkrl.toy.supervised import ToyBuildSettings, TraceSequence, collate_sequences
from forkrl.toy.task import TOY_CHAT_TEMPLATE, TOY_TASKS, DemoReport, ToyTask, register_toy_task
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


# ---------------------------------------------------------------------------- a third toy task


@dataclass
class CopyConfig(ToyBuildSettings):
    """The `copy` toy at test size: a few seconds to build on one core."""

    num_traces: int = 64
    digits: int = 3
    """Digits per prompt; the response repeats them."""
    hidden_size: int = 32
    num_layers: int = 1
    num_heads: int = 2
    num_kv_heads: int = 1
    intermediate_size: int = 64
    max_position_embeddings: int = 64
    steps: int = 6
    batch_size: int = 8
    warmup_steps: int = 2
    threads: int = 1
    log_every: int = 3
    eval_rows: int = 8
    """Held-out prompts scored teacher-forced (mean log-prob of their copies)."""


def copy_rows(n: int, seed: int, digits: int = 3) -> list[dict]:
    rng = random.Random(f"copy:{seed}")
    rows = []
    for _ in range(n):
        answer = " ".join(str(rng.randrange(10)) for _ in range(digits))
        rows.append({"question": f"copy {answer}", "answer": answer})
    return rows


def encode_copies(tokenizer, rows: list[dict]) -> list[TraceSequence]:
    """prompt + the exact copy + EOS per row; the digits are the choice tokens."""
    seqs = []
    for row in rows:
        prompt = tokenizer(row["question"] + "\n", add_special_tokens=False)["input_ids"]
        response = tokenizer(row["answer"], add_special_tokens=False)["input_ids"]
        choice = [tokenizer.convert_ids_to_tokens(t).isdigit() for t in response] + [False]
        seqs.append(TraceSequence(prompt + response + [tokenizer.eos_token_id], len(prompt), choice))
    return seqs


@torch.no_grad()
def copy_logprob(model, tokenizer, rows: list[dict]) -> float:
    """Mean log-probability per token of the exact copies (+ EOS), teacher-forced."""
    input_ids, attention_mask, labels = collate_sequences(encode_copies(tokenizer, rows), tokenizer.pad_token_id)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)
    return -torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()).item()


def copied_fraction(completion: str, example) -> float:
    """Reward: the share of the answer's digits that the completion holds (in any place: partial credit
    that a random model already earns now and then, so a group's rewards differ)."""
    want, got = example.answer.split(), completion.split()
    return sum(min(want.count(d), got.count(d)) for d in set(want)) / len(want)


@pytest.fixture
def copy_toy():
    """`copy`: repeat the prompt's digits. Every hook of `ToyTask`, declared here and nowhere else."""

    register_reward("copied_fraction", copied_fraction)

    @register_toy_task("copy")
    class CopyTask(ToyTask):
        config_class = CopyConfig
        shipped_model = None  # none shipped: `forkrl demo --task copy` needs --base-model
        demo_steps = 1
        demo_eval = 8

        def tokenizer(self, config):
            vocab = ["copy", " ", "\n", *"0123456789"]
            return build_tiny_tokenizer(vocab, chat_template=TOY_CHAT_TEMPLATE, model_max_length=64)

        def training_traces(self, config, tokenizer):
            rows = copy_rows(config.num_traces, config.seed, config.digits)
            return encode_copies(tokenizer, rows), {"traces": {"num_traces": len(rows)}}

        def evaluate(self, model, tokenizer, config):
            rows = copy_rows(config.eval_rows, 1234, config.digits)
            return {"eval": {"num_rows": len(rows), "logprob": copy_logprob(model, tokenizer, rows)}}

        def headline(self, info):
            return f", held-out log-prob {info['eval']['logprob']:.3f}"

        def demo_data(self, seed, base, num_eval):
            return {"train": copy_rows(16, seed), "test": copy_rows(num_eval, 1234)}

        def demo_recipe(self, seed, output_dir, train_file, base):
            return {
                "seed": seed,
                "output_dir": str(output_dir),
                "model": {"name": str(base), "dtype": "float32"},
                "data": {"train_files": [str(train_file)], "template": "{question}\n"},
                "reward": {"function": "copied_fraction", "overlong_shaping": False},
                "rollout": {"prompts_per_step": 2, "group_size": 4, "max_new_tokens": 8, "dynamic_sampling": False},
                "selection": {"strategy": "top", "ratio": 0.5},
                "optim": {"lr": 1e-3, "mini_batch_size": 2, "micro_batch_size": 4},
                "trainer": {"save_every": 0, "tensorboard": False, "device": "cpu"},
            }

        def write_demo_data(self, data_dir, data, cfg):
            for split in ("train", "test"):
                (data_dir / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data[split]))

        def measure(self, model, tokenizer, data, cfg, seed, out, when):
            return copy_logprob(model, tokenizer, data["test"])

        def measurement_line(self, measured):
            return f"log-prob {measured:.4f}"

        def report(self, run, before, after):
            kept = run.last_metrics["kept_frac"]
            table = f"| log-prob of the copy | {before:.4f} | {after:.4f} |\n| kept fraction | | {kept:.3f} |"
            summary = {"seed": run.seed, "steps": run.steps, "seconds": run.seconds(), "before": before,
                       "after": after, "kept_frac": kept, **run.environment()}  # fmt: skip
            return DemoReport(summary, f"# copy\n\n{table}\n", table)

    yield CopyTask
    del TOY_TASKS["copy"], REWARD_FUNCTIONS["copied_fraction"]


def test_a_toy_task_registered_in_a_test_builds_and_runs_its_demo(tmp_path, copy_toy):
    runner = CliRunner()
    model_dir, out = tmp_path / "copy_model", tmp_path / "demo"
    result = runner.invoke(app, ["toy", "build", "--task", "copy", "--seed", "3", "--out", str(model_dir)])
    assert result.exit_code == 0, result.output

    # The build: an ordinary HF directory of the config's sizes, its record, the toy's own tokenizer.
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert type(model).__name__ == "Qwen3ForCausalLM" and model.config.hidden_size == 32
    assert tokenizer.convert_ids_to_tokens(tokenizer("copy 4 2\n")["input_ids"]) == ["copy", " ", "4", " ", "2", "\n"]
    info = json.loads((model_dir / "toy_build.json").read_text())
    assert list(info)[:3] == ["task", "config", "num_parameters"] and info["task"] == "copy"
    assert info["config"]["seed"] == 3 and info["config"]["digits"] == 3
    assert list(info["config"])[:2] == ["seed", "num_traces"]
    assert info["num_parameters"] == sum(p.numel() for p in model.parameters())
    assert info["traces"] == {"num_traces": 64} and [p["step"] for p in info["loss_curve"]] == [3, 6]
    test_rows = copy_rows(8, 1234)
    assert info["eval"]["num_rows"] == 8 and info["eval"]["logprob"] == pytest.approx(
        copy_logprob(model, tokenizer, test_rows), rel=1e-5
    )
    assert f"held-out log-prob {info['eval']['logprob']:.3f}" in result.output

    # The demo: measure, train one step, measure, report.
    result = runner.invoke(
        app, ["demo", "--task", "copy", "--base-model", str(model_dir), "--out", str(out), "--eval-problems", "8"]
    )
    assert result.exit_code == 0, result.output
    assert [json.loads(line) for line in (out / "data" / "train.jsonl").read_text().splitlines()] == copy_rows(16, 0)
    metrics = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1] and metrics[0]["grad_norm"] > 0  # rewards differed: it learned
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 1 and report["kept_frac"] == metrics[-1]["kept_frac"]
    # The numbers are the toy's own measurement of the base model and of the trained one (its last
    # checkpoint), measured again here; the one step changed the model.
    assert report["before"] == pytest.approx(copy_logprob(model, tokenizer, test_rows), rel=1e-5)
    trained, _ = load_policy(out / "run" / "checkpoints" / "step_000001", dtype="float32", device="cpu")
    assert report["after"] == pytest.approx(copy_logprob(trained, tokenizer, test_rows), rel=1e-5)
    assert report["after"] != pytest.approx(report["before"], rel=1e-5)
    md = (out / "report.md").read_text()
    assert f"| log-prob of the copy | {report['before']:.4f} | {report['after']:.4f} |" in md
    assert f"base model: log-prob {report['before']:.4f}" in result.output
