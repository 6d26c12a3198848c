"""Config overrides for CPU-sized trainer runs (fixtures live in tests/conftest.py)."""


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
