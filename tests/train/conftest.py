import json

import pytest

from forkrl.models.tiny import save_tiny_model_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Qwen3 model + tokenizer saved like any HF checkpoint."""
    return str(save_tiny_model_dir(tmp_path_factory.mktemp("tiny_model"), seed=0))


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [{"question": f"what is {i} plus {i + 1}?", "answer": str(2 * i + 1)} for i in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def tiny_overrides(model_dir: str, data: str, out: str, **extra) -> list[str]:
    """A CPU-sized config: 2 prompts x 4 responses of <= 12 tokens per step."""
    base = {
        "model.name": model_dir,
        "data.train_files": f"[{data}]",
        "output_dir": out,
        "reward.function": "tests.train.reward_fns:vowel_fraction",
        "reward.overlong_shaping": "false",
        "rollout.prompts_per_step": 2,
        "rollout.group_size": 4,
        "rollout.max_new_tokens": 12,
        "rollout.max_sampling_rounds": 2,
        "optim.lr": 1e-3,
        "optim.mini_batch_size": 2,
        "optim.micro_batch_size": 4,
        "trainer.total_steps": 2,
        "trainer.save_every": 0,
        "trainer.tensorboard": "false",
        "trainer.device": "cpu",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
