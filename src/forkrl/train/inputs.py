"""The training inputs a run checks before its model loads: tokenizer, prompts and reward.

Loading an 8B model takes minutes; a typo in a data file, a template or a reward spec should
not wait for it. Each function here turns what goes wrong into a `ConfigError` naming the key
(or a `PromptDataError` naming the file and row), which `forkrl train` prints as one line.
"""

from __future__ import annotations

from dataclasses import dataclass

from forkrl.config import Config, ConfigError
from forkrl.models.loading import check_model_source, load_tokenizer
from forkrl.tasks.data import PromptDataError, PromptExample, load_prompts
from forkrl.tasks.rewards import RewardComputer, RewardFn, RewardOptionsError, configure_reward, load_reward_fn

__all__ = [
    "TrainingInputs",
    "checked_tokenizer",
    "configured_reward",
    "load_inputs",
    "load_training_examples",
    "make_rewarder",
    "checked_model_path",
    "prompt_token_limit",
]


@dataclass
class TrainingInputs:
    """Everything a run reads before its model: each made once per start."""

    model_path: str
    """`model.name` checked by `check_model_source` (local paths expanded): what the model loads from."""
    tokenizer: object
    examples: list[PromptExample]
    rewarder: RewardComputer


def load_inputs(cfg: Config) -> TrainingInputs:
    """The run's checked inputs: model path, tokenizer, reward (configured once: the data check uses
    the rewarder's own reward) and training prompts. Raises `ConfigError`/`PromptDataError`."""
    model_path = checked_model_path(cfg)
    tokenizer = checked_tokenizer(cfg, model_path)
    rewarder = make_rewarder(cfg)
    try:
        examples = load_training_examples(cfg, tokenizer, rewarder.reward_fn, model_path)
    except BaseException:
        rewarder.close()
        raise
    return TrainingInputs(model_path, tokenizer, examples, rewarder)


def checked_model_path(cfg: Config) -> str:
    """`model.name` checked before anything loads (`check_model_source`): a local directory that
    exists, or a Hub id (in the cache when offline)."""
    try:
        return check_model_source(cfg.model.name)
    except OSError as err:
        raise ConfigError(f"model.name = {cfg.model.name!r}: {err}") from err


def checked_tokenizer(cfg: Config, model_path: str | None = None):
    """The policy's tokenizer; a missing local path or a directory without a tokenizer is an error.
    `model_path`: `checked_model_path(cfg)` when the caller has it."""
    name = cfg.model.name
    try:
        path = model_path or check_model_source(name)
        return load_tokenizer(path, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as err:  # OSError: what transformers raises for a missing Hub repo
        raise ConfigError(f"model.name = {name!r}: {err}") from err


def prompt_token_limit(cfg: Config, model_path: str | None = None) -> int | None:
    """`data.max_prompt_tokens`, or by default the model's maximum positions minus
    `rollout.max_new_tokens` (None when the model declares no maximum). `model_path`:
    `checked_model_path(cfg)` when the caller has it."""
    if cfg.data.max_prompt_tokens is not None:
        return cfg.data.max_prompt_tokens
    from transformers import AutoConfig

    try:
        model_cfg = AutoConfig.from_pretrained(
            model_path or check_model_source(cfg.model.name), trust_remote_code=cfg.model.trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.name = {cfg.model.name!r}: cannot read its config ({err})") from err
    model_cfg = getattr(model_cfg, "text_config", None) or model_cfg  # multimodal configs nest it
    positions = getattr(model_cfg, "max_position_embeddings", None) or getattr(model_cfg, "n_positions", None)
    if not positions:
        return None
    limit = positions - cfg.rollout.max_new_tokens
    if limit < 1:
        raise ConfigError(
            f"rollout.max_new_tokens = {cfg.rollout.max_new_tokens}: expected fewer than the model's "
            f"{positions} positions (room is needed for the prompt)"
        )
    return limit


def load_training_examples(
    cfg: Config, tokenizer, reward: RewardFn | None = None, model_path: str | None = None
) -> list[PromptExample]:
    """Every training prompt, rendered, cut to `data.max_prompts`, without the over-long ones
    (counted in the log); raises when none is left. `reward`: the configured reward (configured
    here when not given); `model_path`: as in `prompt_token_limit`.

    A reward that checks its data (`check_source(source, answer_key)`, e.g. the forecast rewards:
    every row has a 0/1 outcome) checks each training file after it is read, before the length
    filter and the model: a bad row is a `PromptDataError` naming the file, the row and the key.
    """
    d = cfg.data
    check_source = getattr(reward if reward is not None else configured_reward(cfg), "check_source", None)
    examples: list[PromptExample] = []
    for i, source in enumerate(d.train_files):
        try:
            examples += load_prompts(source, d.question_key, d.answer_key, template=d.template, tokenizer=tokenizer)
        except PromptDataError:
            raise
        except (ValueError, TypeError) as err:  # the template (render_prompt) or the chat template
            raise ConfigError(f"data.template = {d.template!r} (rendering {source}): {err}") from err
        except OSError as err:
            raise ConfigError(f"data.train_files[{i}] = {source!r}: {err}") from err
        if check_source is not None:
            check_source(source, d.answer_key)
    if d.max_prompts:
        examples = examples[: d.max_prompts]
    if not examples:
        raise ConfigError(f"data.train_files = {d.train_files}: no training prompts")
    limit = prompt_token_limit(cfg, model_path)
    if limit is not None:
        # One batched tokenizer call (fast tokenizers run it in Rust over all prompts).
        lengths = [len(ids) for ids in tokenizer([ex.prompt for ex in examples], add_special_tokens=False)["input_ids"]]
        kept = [ex for ex, n in zip(examples, lengths) if n <= limit]
        if len(kept) < len(examples):
            print(
                f"data: left out {len(examples) - len(kept)} of {len(examples)} prompts longer than {limit} tokens "
                "(data.max_prompt_tokens)",
                flush=True,
            )
        if not kept:
            raise ConfigError(
                f"data.max_prompt_tokens: every prompt is longer than {limit} tokens "
                f"(shortest {min(lengths)}); raise it or lower rollout.max_new_tokens"
            )
        examples = kept
    for i, ex in enumerate(examples):
        ex.index = i
    return examples


def _reward_config_error(cfg: Config, err: Exception) -> ConfigError:
    """The one-line error of a reward that cannot be set up: `reward.kwargs: ...` for options it
    does not take, `reward.function = 'SPEC': ...` for a spec that does not resolve."""
    spec = cfg.reward.function
    if isinstance(err, RewardOptionsError):
        return ConfigError(f"reward.kwargs: {err}")
    if isinstance(err, ValueError):
        detail = str(err).removeprefix(f"reward {spec!r}: ")
    else:  # a missing module, or the user's module raising while it imports
        detail = f"importing it raised {type(err).__name__}: {err}"
    return ConfigError(f"reward.function = {spec!r}: {detail}")


def configured_reward(cfg: Config) -> RewardFn:
    """The reward object `reward.function` names with `reward.kwargs` applied (`configure_reward`),
    in this process and without workers; ConfigError as `make_rewarder`."""
    try:
        return configure_reward(cfg.reward.function, cfg.reward.kwargs)[0]
    except Exception as err:
        raise _reward_config_error(cfg, err) from err


def make_rewarder(cfg: Config) -> RewardComputer:
    """The run's reward with its options (`reward.function`, `reward.kwargs`), imported and checked
    now so a bad spec or an unknown option key fails before the model loads (`trainer.eval_reward`
    too)."""
    if cfg.trainer.eval_reward:
        try:
            load_reward_fn(cfg.trainer.eval_reward)
        except Exception as err:
            detail = str(err).removeprefix(f"reward {cfg.trainer.eval_reward!r}: ")
            raise ConfigError(f"trainer.eval_reward = {cfg.trainer.eval_reward!r}: {detail}") from err
    try:
        return RewardComputer(cfg.reward.function, timeout_s=cfg.reward.timeout_s, reward_kwargs=cfg.reward.kwargs)
    except Exception as err:
        raise _reward_config_error(cfg, err) from err
