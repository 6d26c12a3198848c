"""Before the first step: the process group, the policy (and reference) model, weights to resume
from, and the DDP/FSDP2 wrapping, as one `PolicyModels`.

Precision follows `forkrl.models.precision` (`model.dtype=auto`: float32 weights, bf16 autocast on
CUDA). The reference model of `loss.ref_kl_coef > 0` is loaded like the policy (the same
`trust_remote_code` and `attn_implementation`); under LoRA it is not loaded at all: the policy with
its adapter disabled *is* the base model, so the reference costs no second copy of the weights.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from forkrl.config import Config, ConfigError
from forkrl.models import precision
from forkrl.models.loading import load_policy
from forkrl.models.scoring import ResponseScorer
from forkrl.train.checkpoint import CheckpointError, ResumePoint, check_shapes
from forkrl.train.context import TrainContext
from forkrl.train.fsdp import gathered, shard_scorer
from forkrl.train.inputs import TrainingInputs


class SetupError(RuntimeError):
    """The run cannot start as configured (no CUDA for `trainer.device=cuda`, a checkpoint that
    does not fit the model); the trainer reports it as `TrainingStopped`."""


def init_distributed(device_pref: str) -> tuple[int, int, torch.device]:
    """Join the torchrun process group if launched by torchrun; return (rank, world, device)."""
    use_cuda = torch.cuda.is_available() and device_pref != "cpu"
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise SetupError("trainer.device = 'cuda' but torch sees no CUDA device")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return rank, world, torch.device("cuda", local_rank)
    return rank, world, torch.device("cpu")


class AdapterDisabledScorer(torch.nn.Module):
    """The LoRA policy's scorer with the adapter switched off: the base model's log-probs."""

    def __init__(self, scorer: torch.nn.Module, peft_model: torch.nn.Module):
        super().__init__()
        self.scorer, self.peft_model = scorer, peft_model

    def forward(self, *args, **kwargs):
        with self.peft_model.disable_adapter():
            return self.scorer(*args, **kwargs)


@dataclass
class PolicyModels:
    """The models of a run and the modules each phase calls."""

    model: torch.nn.Module
    """The policy (a `peft` model under LoRA); generation and checkpoints use it."""
    tokenizer: object
    policy_scorer: ResponseScorer
    """The policy as one module, for no-grad scoring (old log-probs, entropies for selection)."""
    scorer: torch.nn.Module
    """What the update's forward calls: `policy_scorer`, DDP-wrapped with several processes."""
    ref_scorer: torch.nn.Module | None
    """log π_ref for the KL term (None when `loss.ref_kl_coef = 0`)."""
    sharded: bool
    """FSDP2: parameters are sharded and must be gathered to generate or evaluate."""
    lora: bool
    """`model` is a `peft` LoRA model (only its adapter trains)."""
    autocast: Callable[[], contextlib.AbstractContextManager]
    """A fresh autocast context for any forward pass (`forkrl.models.precision`)."""

    def full_weights(self) -> contextlib.AbstractContextManager:
        """Every process holds the full parameters inside (a collective under FSDP2, else nothing)."""
        return gathered(self.policy_scorer if self.sharded else None)

    def full_state_dict(self, cpu_offload: bool = False) -> dict[str, torch.Tensor]:
        """The policy's whole weights with Hugging Face names (tied `lm_head.weight` included), what
        `from_pretrained` and an inference engine load: under FSDP2 gathered from the shards (a
        collective: every process calls; with `cpu_offload` only the main process receives them, on
        the CPU), under LoRA the adapter merged into a copy. Checkpoints and the `vllm` backend's
        weight pushes both take their weights from here."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        if self.sharded:
            options = StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload)
            state = get_model_state_dict(self.policy_scorer, options=options)
            return {k.removeprefix("model."): v for k, v in state.items()}
        if self.lora:
            import copy

            return copy.deepcopy(self.model).merge_and_unload().state_dict()
        return self.model.state_dict()

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]


def load_models(
    cfg: Config, ctx: TrainContext, inputs: TrainingInputs, resume: ResumePoint | None = None
) -> PolicyModels:
    """Load the policy (and reference) from `inputs.model_path` with the run's tokenizer, put the
    checkpoint's weights in, then wrap for `ctx.world` processes."""
    m, device, world = cfg.model, ctx.device, ctx.world
    dtype = precision.weights_dtype(m.dtype)
    common = dict(
        dtype=str(dtype).removeprefix("torch."),
        device=device,
        trust_remote_code=m.trust_remote_code,
        attn_implementation=m.attn_implementation,
        tokenizer=inputs.tokenizer,
    )
    model, tokenizer = _load(
        inputs.model_path,
        m.name,
        **common,
        gradient_checkpointing=m.gradient_checkpointing,
        lora_rank=m.lora_rank,
        lora_alpha=m.lora_alpha,
        lora_target_modules=m.lora_target_modules,
    )
    ref_model = None
    if cfg.loss.ref_kl_coef > 0 and not m.lora_rank:
        ref_model, _ = _load(inputs.model_path, m.name, **common)
        ref_model.eval().requires_grad_(False)
    # The checkpoint's weights go in before any wrapping (FSDP2 then shards them).
    if resume is not None:
        expected = {k: v.shape for k, v in model.state_dict().items()}
        try:
            check_shapes(resume.path, resume.shapes, expected)
        except CheckpointError as err:
            raise SetupError(str(err)) from err
        load_weights(model, resume.path, bool(m.lora_rank), device)
    policy_scorer = ResponseScorer(model)
    ref_scorer = ResponseScorer(ref_model) if ref_model is not None else None
    sharded = world > 1 and cfg.trainer.strategy == "fsdp2"
    scorer: torch.nn.Module = policy_scorer
    if sharded:
        shard_scorer(policy_scorer, model)
        if ref_scorer is not None:
            shard_scorer(ref_scorer, ref_model)
    elif world > 1:
        scorer = torch.nn.parallel.DistributedDataParallel(
            policy_scorer, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.loss.ref_kl_coef > 0 and m.lora_rank:
        ref_scorer = AdapterDisabledScorer(policy_scorer, model)
    return PolicyModels(
        model=model,
        tokenizer=tokenizer,
        policy_scorer=policy_scorer,
        scorer=scorer,
        ref_scorer=ref_scorer,
        sharded=sharded,
        lora=bool(m.lora_rank),
        autocast=lambda: precision.autocast(m.dtype, device),
    )


def _load(source: str, name: str, **kwargs):
    try:
        return load_policy(source, **kwargs)
    except (OSError, ValueError, ImportError) as err:  # a missing repo or file, a bad dtype, no peft
        raise ConfigError(f"model.name = {name!r}: {err}") from err


def tied_parameter_names(model: torch.nn.Module) -> set[str]:
    """Names under which an already-named parameter appears again (lm_head.weight when it is tied
    to the input embeddings): `save_pretrained` writes such a tensor once, under its first name."""
    first: dict[int, str] = {}
    tied = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            tied.add(name)
        else:
            first[id(param)] = name
    return tied


def load_weights(model: torch.nn.Module, path: Path, lora: bool, device: torch.device) -> None:
    """A checkpoint's weights into `model` (its adapter under LoRA). Only a tied duplicate may be
    missing from the file; any other missing or unexpected key is an error naming them."""
    from safetensors.torch import load_file

    if lora:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(path / "adapter" / "adapter_model.safetensors"))
        return
    state = {}
    for shard in sorted(path.glob("*.safetensors")):
        state.update(load_file(shard, device=str(device)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = tied_parameter_names(model)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise SetupError(f"checkpoint {path} does not match the model: missing {missing}, unexpected {unexpected}")
