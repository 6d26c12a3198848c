"""Generation backends as registered parts: `rollout.backend` names one, the trainer builds it here.

A backend is any `GenerationBackend` (`generate(prompts, params) -> Rollout` and
`update_weights(model)`), made by a factory from a `BackendContext` and registered with what it
supports. The trainer calls `update_weights` after every step's optimizer updates; an in-process
backend (`hf`) shares the training model and has nothing to do, a server backend (vLLM, SGLang)
would push the new weights there.

To add one (for example on vLLM, which cannot be installed on the machines this project is
tested on, so none ships): write a factory in your own module and register it before training,

    from forkrl.rollout.registry import BackendCapabilities, register_backend

    @register_backend("my_engine", BackendCapabilities(sampler_entropy=False))
    def build(ctx):            # ctx: BackendContext
        return MyEngineBackend(ctx.model_name, ctx.tokenizer, ...)

then train with `rollout.backend=my_engine` from Python, or name the factory by import path,
`rollout.backend=my_package.engines:build` (its `capabilities` attribute, a `BackendCapabilities`,
says what it supports; without one the defaults apply), which `forkrl train` imports. Nothing in
`trainer.py` changes. What the backend lacks is refused
before the model loads, naming the key and the backend; a backend without `sampler_entropy`
(inference engines return no full-distribution entropy) leaves `Rollout.sampler_entropy` None and
the entropy percentiles come from the update pass's old-policy entropies instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
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
    """`rollout.decode_phase > 0`."""
    sampler_entropy: bool = True
    """`Rollout.sampler_entropy` is filled (the entropy of each token's sampling distribution)."""


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


@dataclass(frozen=True)
class RegisteredBackend:
    name: str
    capabilities: BackendCapabilities
    factory: Callable[[BackendContext], GenerationBackend] | str
    """The factory, or `module:function` imported when first built."""


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
    factory = get_backend(name).factory
    if isinstance(factory, str):
        factory = import_attribute(factory)
    return factory(ctx)


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
