"""The one typed training config: every field documented where it is declared, loaded from YAML.

`load_config("configs/x.yaml", ["selection.ratio=0.1", "optim.lr=2e-6"])` reads the file,
applies `key.sub=value` overrides (values parsed as YAML), checks every key and value, and
fails before any work starts with the key, the bad value and what was expected. The
resolved config is written to the run directory (`dump_config`).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import os
import textwrap
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from forkrl.algo.advantages import ADVANTAGE_ESTIMATORS
from forkrl.algo.losses import NORMALIZERS, POLICY_LOSSES, LossConfig
from forkrl.algo.selection import ENTROPY_SOURCES, SCOPES
from forkrl.errors import ConfigError
from forkrl.ops.token_ranking import STRATEGIES


def _check_span(s) -> None:
    """`selection.region` / `span_pattern` / `strategy=span` fit together; the pattern compiles."""
    from forkrl.algo.spans import REGIONS, compile_span_pattern

    if s.region not in REGIONS:
        raise ConfigError(f"selection.region = {s.region!r}: expected one of {', '.join(REGIONS)}")
    implied = STRATEGIES[s.strategy].region  # the strategy was checked before
    if implied is not None and s.region not in ("all", implied):
        raise ConfigError(
            f"selection.region = {s.region!r}: strategy {s.strategy!r} keeps the {implied} itself; use all or {implied}"
        )
    narrowed = implied is not None or s.region != "all"
    if narrowed and not s.span_pattern:
        raise ConfigError(
            f"selection.span_pattern is not set: selection.strategy = {s.strategy!r} with region {s.region!r} "
            "needs a regular expression, e.g. 'p=(?P<span>[0-9.]+)'"
        )
    if s.span_pattern:
        try:
            compile_span_pattern(s.span_pattern)
        except ValueError as err:
            raise ConfigError(f"selection.span_pattern = {s.span_pattern!r}: {err}") from None


@dataclass
class ModelConfig:
    """The policy: any Hugging Face causal LM."""

    name: str = ""
    """Hub id (e.g. `Qwen/Qwen3-8B-Base`) or local directory of a causal LM and its tokenizer."""
    dtype: str = "auto"
    """`auto`: float32 weights, with bfloat16 autocast on CUDA for every forward pass (training,
    scoring, generation, eval; see `forkrl.models.precision`); or `float32`, `bfloat16`, `float16`
    weights without autocast."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    trust_remote_code: bool = False
    """Allow model code from the hub repository (off unless you trust it)."""
    attn_implementation: str | None = None
    """Attention kernel passed to `from_pretrained` (`sdpa`, `flash_attention_2`, `eager`); None = HF default."""
    lora_rank: int = 0
    """LoRA rank; 0 trains all weights. LoRA needs `pip install forkrl[lora]`."""
    lora_alpha: float = 32.0
    """LoRA scaling alpha."""
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Module names LoRA adapts."""


@dataclass
class DataConfig:
    """Where prompts and answers come from."""

    train_files: list[str] = field(default_factory=list)
    """Training prompts: jsonl, parquet or json files, or `datasets` names / saved directories."""
    question_key: str = "question"
    """Field holding the question (dots reach nested fields, e.g. `extra_info.question`)."""
    answer_key: str = "answer"
    """Field holding the ground-truth answer."""
    template: str = "paper"
    """Prompt template: `paper` (the paper's User/Assistant template), `chat` (tokenizer's chat
    template) or a format string containing `{question}`."""
    eval_files: list[str] = field(default_factory=list)
    """Benchmark files evaluated every `trainer.eval_every` steps (Acc@k, Len@k per file)."""
    max_prompts: int = 0
    """Use only the first N training prompts (0 = all)."""
    max_prompt_tokens: int | None = None
    """Prompts longer than this many tokens are left out, with the count in the log (verl's
    `data.max_prompt_length` filter). None = the model's maximum positions minus
    `rollout.max_new_tokens` (no limit when the model declares none)."""


@dataclass
class RewardConfig:
    """How a response is scored."""

    function: str = "math"
    """Reward function: `math` (math-verify on the `\\boxed{}` / `Answer:` answer), another registered
    name (`forecast_brier`, `forecast_log`, `forecast_winrate`, ...), or an import path `module:function`
    (a function, a reward object or a class)."""
    timeout_s: float = 5.0
    """Time limit of one reward call; a call that runs over scores 0 and is counted. `module:function`
    rewards run in worker processes, and a call over the limit is killed with its process."""
    max_failed_fraction: float = 0.5
    """The run stops when more than this fraction of a step's reward calls fail (raise, time out,
    or return a non-finite or non-numeric value), showing one failing call; 1 = never stop."""
    overlong_shaping: bool = True
    """DAPO's soft overlong penalty over the last `overlong_cache` tokens before the max length."""
    overlong_cache: int = 4096
    """Length of the soft-penalty zone in tokens (paper: 4096 of 20480)."""
    overlong_penalty: float = 1.0
    """Penalty at the max length (grows linearly from 0 across the zone)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Options of the reward, e.g. `{bins: 20, brier_weight: 0.0}` (set one with `reward.kwargs.bins=20`).
    A registered reward object with options (the forecast rewards: `rule`, `bins`, `brier_weight`,
    `log_eps`, `invalid_score`, `outcome_key`) is replaced by a copy with these options changed; a
    class (`module:Class`) is instantiated with them; a function is called as
    `fn(completion, example, **kwargs)`, in its worker processes too. An unknown key stops the run
    before the model loads, naming the valid ones."""


@dataclass
class RolloutConfig:
    """Sampling responses."""

    prompts_per_step: int = 512
    """Prompts per training batch (paper: 512)."""
    group_size: int = 16
    """Responses sampled per prompt, G (paper: 16)."""
    max_new_tokens: int = 20480
    """Maximum response length in tokens (paper: 20480)."""
    temperature: float = 1.0
    """Sampling temperature; also the temperature of the training log-probs and entropies (Eq. 1)."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1 = off)."""
    top_k: int = 0
    """Top-k sampling (0 = off)."""
    generation_batch_size: int = 64
    """Sequences generated at once."""
    entropy_temperature: list[float] | None = None
    """Entropy-aware decoding (Eq. 5) as `[T_low, T_high, h]`: T_high where H > h, T_low elsewhere."""
    dynamic_sampling: bool = True
    """DAPO dynamic sampling: drop groups whose rewards are all equal and sample more prompts."""
    max_sampling_rounds: int = 3
    """Rounds of generation per step before training on a batch that is still short (logged)."""
    prompts_per_round: int = 0
    """Prompts drawn per dynamic-sampling round (0 = `prompts_per_step`). More than
    `prompts_per_step` oversamples, like verl's `data.gen_batch_size`: the batch fills in fewer
    rounds and informative groups beyond `prompts_per_step` are dropped."""
    decode_phase: int = 0
    """Tokens per decoding phase (0 = one phase per batch). After each phase only the
    rows that have not ended go on, so a few long responses stop holding the whole batch; the
    sampled tokens are unchanged (per-row seeds). Full-attention decoders only (the in-place KV
    cache is sliced between phases); others decode in one call."""
    backend: str = "hf"
    """Generation backend (`forkrl.rollout.registry`): `hf` (the training model in process), `vllm`
    (an in-process vLLM engine per process, `forkrl[vllm]`), a name registered with
    `register_backend`, or a factory's import path `module:function`."""
    backend_kwargs: dict[str, Any] = field(default_factory=dict)
    """Options of the backend's engine, checked before the model loads; `vllm`:
    `kv_cache_memory_bytes`, `gpu_memory_utilization`, `enforce_eager`, `max_num_seqs`,
    `max_num_batched_tokens`, `max_model_len`, `dtype`, `enable_prefix_caching`, `block_size`
    (`forkrl.rollout.vllm.ENGINE_OPTIONS`), e.g. `rollout.backend_kwargs.gpu_memory_utilization=0.3`."""


@dataclass
class SelectionConfig:
    """Which tokens carry the policy gradient (paper Eq. 6)."""

    strategy: str = "top"
    """`top` (forking tokens: highest entropy), `all`, `bottom` (lowest entropy), `random` (control),
    `gradient` (largest ‖∂ log π(o_t)/∂z_t‖₂ = √(1 − 2π(o_t) + Σ_j π_j²) / T, as GMTS)."""
    ratio: float = 0.2
    """ρ: fraction of response tokens kept, exactly ⌈ρ·N⌉ (paper: 0.2)."""
    scope: str = "microbatch"
    """Tokens ranked together: `microbatch` (authors' code), `batch` (the optimizer step on this
    process), `global` (the optimizer step on all processes, TRL's choice)."""
    entropy_source: str = "current"
    """Entropy used for ranking: `current` policy in the update pass (authors' code) or `old` policy
    (for `gradient`: whose log-prob gradient norm)."""
    region: str = "all"
    """Where the strategy picks: `all` response tokens, only the `span` matched by `span_pattern`
    on the decoded response, or `outside_span` (e.g. top-ρ entropy within the reasoning).
    `strategy=span` keeps every token of the span (`region` then defaults to `span`)."""
    span_pattern: str | None = None
    """Regular expression searched in each decoded response; the span is its named group `span`
    (else the whole match), the last match counting (`forkrl.algo.spans`)."""


@dataclass
class AdvantageConfig:
    estimator: str = "grpo"
    """`grpo` (mean/std), `dr_grpo` (no std) or `rloo` (leave-one-out)."""
    std_eps: float = 1e-6
    """Added to the group std (GRPO)."""


@dataclass
class OptimConfig:
    lr: float = 1e-6
    """Learning rate (paper: 1e-6, constant)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    schedule: str = "constant"
    """LR schedule after warmup: `constant`, `linear` or `cosine` (decay to 0 at `trainer.total_steps`)."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup."""
    grad_clip: float = 1.0
    """Max global gradient norm (0 = no clipping)."""
    mini_batch_size: int = 32
    """Prompts per optimizer step; a batch of `prompts_per_step` gives prompts_per_step / mini_batch_size
    steps (paper: 32 → 16 steps)."""
    micro_batch_size: int = 8
    """Sequences per forward/backward pass (gradient accumulation inside a mini-batch)."""
    epochs: int = 1
    """Passes over each batch."""


@dataclass
class TrainerConfig:
    total_steps: int = 100
    """Training batches (rollout + update rounds) to run."""
    save_every: int = 50
    """Checkpoint every N steps (and at the end); 0 = only at the end."""
    keep_checkpoints: int = 2
    """Most recent checkpoints kept on disk."""
    eval_every: int = 0
    """Evaluate on `data.eval_files` every N steps (0 = off)."""
    eval_samples: int = 16
    """k of Acc@k / Len@k: samples per question at evaluation (paper: 16 at T = 1)."""
    eval_max_new_tokens: int = 0
    """Max response length at evaluation (0 = `rollout.max_new_tokens`)."""
    eval_reward: str = ""
    """The reward evaluation scores with (a registered name or `module:function`, without options);
    empty: `reward.function` with `reward.kwargs`. E.g. `forecast_truth` on the forecasting toy."""
    log_samples: int = 4
    """Completions per step written to `samples.jsonl`."""
    max_bad_steps: int = 3
    """Consecutive bad steps before the run stops with a message: optimizer steps with a NaN/inf
    loss or gradient (skipped), and training steps with no trainable group (every group's rewards
    equal)."""
    device: str = "auto"
    """`auto` (CUDA if available), `cpu` or `cuda`."""
    strategy: str = "ddp"
    """How torchrun processes share the model: `ddp` (each holds all weights, gradients are
    all-reduced) or `fsdp2` (`torch.distributed.fsdp.fully_shard` per decoder layer: weights,
    gradients and optimizer state sharded across processes, gathered layer by layer; for models
    that do not fit one device). Same update either way; ignored on one process."""
    tensorboard: bool = True
    """Write TensorBoard events when tensorboard is installed."""
    wandb_project: str | None = None
    """Log to this Weights & Biases project (needs `pip install forkrl[wandb]`)."""


@dataclass
class Config:
    """A whole training run."""

    seed: int = 0
    """Seed of every random choice: data order, sampling, random selection, init of new heads."""
    output_dir: str = "runs/forkrl"
    """Run directory: resolved config, metrics.jsonl, samples.jsonl, checkpoints, TensorBoard events."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


# ---------------------------------------------------------------------------------------------
# Building a config from nested dicts, with exact error messages.


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` (int, float, bool, str, list[...], dict[str, ...],
    X | None); a `dict[str, Any]` keeps its values (YAML scalars, lists, mappings) as they are."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is dict:
        if value is None:  # `kwargs:` with nothing after it in a YAML file
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping such as {{name: value}}, got {value!r}")
        _, value_tp = typing.get_args(tp)
        out = {}
        for name, item in value.items():
            if not isinstance(name, str):
                raise ConfigError(f"{key}: expected string keys, got {name!r}")
            out[name] = item if value_tp is Any else _coerce(item, value_tp, f"{key}.{name}")
        return out
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and item_tp is str and isinstance(value, str):
            value = [value]  # a single path is a list of one
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, str):
            try:  # YAML 1.1 reads "1e-6" as a string
                number = float(value)
            except ValueError:
                pass
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        # No key means anything by NaN or infinity; an inf learning rate only yields NaN weights.
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def _build(cls: type, data: dict, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key {prefix}{key}{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except ValueError as err:  # e.g. LossConfig's own checks
        raise ConfigError(f"{prefix.rstrip('.')}: {err}") from err


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        if node.get(part) is None:  # absent, or an empty YAML entry (`kwargs:`)
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
    node[parts[-1]] = value


def _validate(cfg: Config, check_files: bool) -> None:
    """Range checks that name the key and the expected range."""

    def need(ok: bool, key: str, expected: str) -> None:
        if not ok:
            value = cfg
            for part in key.split("."):
                value = getattr(value, part)
            raise ConfigError(f"{key} = {value!r}: expected {expected}")

    s, r, o, t = cfg.selection, cfg.rollout, cfg.optim, cfg.trainer
    need(s.strategy in STRATEGIES, "selection.strategy", f"one of {sorted(STRATEGIES)}")
    need(0.0 < s.ratio <= 1.0, "selection.ratio", "a fraction in (0, 1]")
    need(s.scope in SCOPES, "selection.scope", f"one of {list(SCOPES)}")
    need(s.entropy_source in ENTROPY_SOURCES, "selection.entropy_source", " or ".join(ENTROPY_SOURCES))
    _check_span(s)
    need(
        cfg.advantage.estimator in ADVANTAGE_ESTIMATORS, "advantage.estimator", f"one of {sorted(ADVANTAGE_ESTIMATORS)}"
    )
    need(cfg.loss.policy_loss in POLICY_LOSSES, "loss.policy_loss", f"one of {sorted(POLICY_LOSSES)}")
    need(cfg.loss.normalizer in NORMALIZERS, "loss.normalizer", f"one of {sorted(NORMALIZERS)}")
    need(o.lr > 0, "optim.lr", "a positive learning rate")
    need(o.weight_decay >= 0, "optim.weight_decay", ">= 0")
    need(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", "two numbers in [0, 1)")
    need(o.schedule in ("constant", "linear", "cosine"), "optim.schedule", "constant, linear or cosine")
    need(o.warmup_steps >= 0, "optim.warmup_steps", ">= 0")
    need(o.grad_clip >= 0, "optim.grad_clip", ">= 0 (0 disables clipping)")
    need(o.mini_batch_size >= 1, "optim.mini_batch_size", ">= 1 prompt")
    need(o.micro_batch_size >= 1, "optim.micro_batch_size", ">= 1 sequence")
    need(o.epochs >= 1, "optim.epochs", ">= 1")
    need(r.prompts_per_step >= 1, "rollout.prompts_per_step", ">= 1")
    need(
        r.prompts_per_step % o.mini_batch_size == 0,
        "optim.mini_batch_size",
        f"a divisor of rollout.prompts_per_step ({r.prompts_per_step})",
    )
    need(r.group_size >= 2, "rollout.group_size", ">= 2 responses per prompt (advantages are group-relative)")
    need(r.max_new_tokens >= 1, "rollout.max_new_tokens", ">= 1")
    need(r.temperature > 0, "rollout.temperature", "> 0")
    need(0 < r.top_p <= 1, "rollout.top_p", "in (0, 1]")
    need(r.top_k >= 0, "rollout.top_k", ">= 0")
    need(r.generation_batch_size >= 1, "rollout.generation_batch_size", ">= 1")
    need(r.max_sampling_rounds >= 1, "rollout.max_sampling_rounds", ">= 1")
    need(r.decode_phase >= 0, "rollout.decode_phase", ">= 0 (0 = one decoding phase)")
    from forkrl.rollout.registry import backend_problem

    problem = backend_problem(r)
    if problem:
        raise ConfigError(problem)
    need(r.prompts_per_round >= 0, "rollout.prompts_per_round", ">= 0 (0 = rollout.prompts_per_step)")
    need(
        r.prompts_per_round == 0 or r.dynamic_sampling,
        "rollout.prompts_per_round",
        "0 unless rollout.dynamic_sampling is on (without it every step trains on the first round)",
    )
    need(
        r.entropy_temperature is None or (len(r.entropy_temperature) == 3 and min(r.entropy_temperature[:2]) > 0),
        "rollout.entropy_temperature",
        "[T_low, T_high, h] with positive temperatures",
    )
    need(cfg.reward.timeout_s > 0, "reward.timeout_s", "> 0 seconds")
    need(0 <= cfg.reward.max_failed_fraction <= 1, "reward.max_failed_fraction", "a fraction in [0, 1]")
    need(
        cfg.data.max_prompt_tokens is None or cfg.data.max_prompt_tokens >= 1,
        "data.max_prompt_tokens",
        ">= 1 token, or null for the model's positions minus rollout.max_new_tokens",
    )
    need(cfg.data.max_prompts >= 0, "data.max_prompts", ">= 0 (0 = all)")
    need(
        not cfg.reward.overlong_shaping or 0 < cfg.reward.overlong_cache <= r.max_new_tokens,
        "reward.overlong_cache",
        f"in (0, rollout.max_new_tokens = {r.max_new_tokens}]",
    )
    need(
        cfg.model.dtype in ("auto", "float32", "bfloat16", "float16"),
        "model.dtype",
        "auto, float32, bfloat16 or float16",
    )
    need(cfg.model.lora_rank >= 0, "model.lora_rank", ">= 0")
    need(t.total_steps >= 1, "trainer.total_steps", ">= 1")
    need(t.save_every >= 0, "trainer.save_every", ">= 0")
    need(t.keep_checkpoints >= 1, "trainer.keep_checkpoints", ">= 1")
    need(t.eval_every >= 0, "trainer.eval_every", ">= 0")
    need(t.eval_samples >= 1, "trainer.eval_samples", ">= 1")
    need(t.max_bad_steps >= 1, "trainer.max_bad_steps", ">= 1")
    need(t.device in ("auto", "cpu", "cuda"), "trainer.device", "auto, cpu or cuda")
    need(t.strategy in ("ddp", "fsdp2"), "trainer.strategy", "ddp or fsdp2")
    need(
        t.strategy != "fsdp2" or not cfg.model.lora_rank,
        "trainer.strategy",
        "ddp with LoRA (model.lora_rank > 0): the adapter is small enough to replicate; fsdp2 is for full fine-tuning",
    )
    if check_files:
        need(bool(cfg.model.name), "model.name", "a hub id or a local model directory")
        need(bool(cfg.data.train_files), "data.train_files", "at least one prompt file or dataset")
        for key in ("train_files", "eval_files"):
            for i, path in enumerate(getattr(cfg.data, key)):
                looks_local = path.endswith((".jsonl", ".json", ".parquet")) or os.sep in path or path.startswith(".")
                if looks_local and not os.path.exists(path):
                    raise ConfigError(f"data.{key}[{i}] = {path!r}: file not found")


def config_from_dict(data: dict, overrides: list[str] | None = None, check_files: bool = True) -> Config:
    """Build and validate a `Config` from a nested dict plus `key.sub=value` overrides."""
    data = dict(data or {})
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. selection.ratio=0.1")
        key, raw = item.split("=", 1)
        _set_dotted(data, key.strip(), _override_value(key.strip(), raw))
    cfg = _build(Config, data, "")
    _validate(cfg, check_files)
    return cfg


def _override_value(key: str, raw: str) -> Any:
    """The YAML value of one `key=value` override (plain YAML: tags such as `!!python/...` are refused)."""
    if not raw.strip():
        return ""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"override {key}={raw}: the value is not valid YAML ({_yaml_problem(err)})") from None


def _yaml_problem(err: yaml.YAMLError) -> str:
    """What is wrong, and where, in one line (PyYAML's own text spans several lines)."""

    def at(mark) -> str:
        return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""

    problem = getattr(err, "problem", None)
    if problem is None:
        return " ".join(str(err).split())
    context = getattr(err, "context", None)
    text = f"{context}{at(getattr(err, 'context_mark', None))}: " if context else ""
    return " ".join(f"{text}{problem}{at(getattr(err, 'problem_mark', None))}".split())


def read_yaml_file(path: str | os.PathLike, what: str = "config file") -> Any:
    """A YAML file's contents (safe loader: no tags that build Python objects); `ConfigError` naming
    the file when it is missing, not UTF-8 or not valid YAML."""
    if not os.path.isfile(path):
        raise ConfigError(f"{what} not found: {os.fspath(path)}")
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{os.fspath(path)}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}); "
            "save it as UTF-8"
        ) from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{os.fspath(path)}: not valid YAML: {_yaml_problem(err)}") from None


def load_config(path: str | None, overrides: list[str] | None = None, check_files: bool = True) -> Config:
    """Read a YAML recipe (or start from defaults when `path` is None) and apply overrides."""
    data: dict = {}
    if path is not None:
        data = read_yaml_file(path) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of config sections at the top level")
    return config_from_dict(data, overrides, check_files)


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config) -> str:
    """YAML text of the fully resolved config (every field, defaults included)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# The config reference in the README is generated from the field docstrings above.


def _field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string literal right after a field) of a dataclass."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def config_reference_markdown() -> str:
    """A markdown table per config section: key, default, meaning."""
    out = []

    def section(cls: type, prefix: str, default: Any) -> None:
        docs = _field_docs(cls)
        rows = []
        nested = []
        for f in dataclasses.fields(cls):
            value = getattr(default, f.name)
            if dataclasses.is_dataclass(value):
                nested.append((type(value), f"{prefix}{f.name}.", value))
                continue
            shown = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
            rows.append(f"| `{prefix}{f.name}` | `{shown}` | {docs.get(f.name, '')} |")
        if rows:
            title = prefix.rstrip(".") or "top level"
            out.append(f"**{title}**\n\n| key | default | meaning |\n|---|---|---|\n" + "\n".join(rows) + "\n")
        for sub in nested:
            section(*sub)

    section(Config, "", Config())
    return "\n".join(out)
