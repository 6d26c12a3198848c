"""The one module that reaches past transformers' documented surface: the KV-cache API of the fast paths.

Shared-prefix scoring (`models/scoring.py`), shared-prompt prefill and decode phases
(`rollout/hf.py`) and the in-place KV cache (`rollout/kv_cache.py`) hand the model cache objects of
their own. They ask this module how, never `inspect` or private attributes themselves, so that a
transformers release that moves one of these things breaks one file, and the tests of
`tests/models/test_compat.py` and `tests/test_fast_paths.py` say which.

What it relies on, and since which transformers release (the suite runs on the floor 5.15.0 and on
the locked version; see the README's "Tested versions"):

- `cache_utils.Cache(layer_class_to_replicate=cls)` and `Cache(layers=[...])`: caches made of our
  own layers (5.0).
- `cache_utils.DynamicLayer`: `keys`/`values` `[B, kv_heads, L, d]`, `is_initialized`,
  `lazy_initialization(keys, values)`, `update(keys, values, *args, **kwargs)`,
  `batch_select_indices`, `crop`; subclassed by the prompt recorder, the shared prefix and the
  growing layer (5.0).
- The cache argument of a model's and a decoder's `forward`, and the output field that returns it:
  `past_key_values` (5.0-5.23), `cache` (5.24+).
- `generate(<cache argument>=cache)` continues from a cache that holds a prefix of `input_ids`:
  each group's prompt prefilled once, and decode phases (5.0).
- What `generate` hands a decoder-only model's `forward` at each step, which the lean decode loop
  (`rollout/decode.py`) hands it too: `input_ids`, the 2-D `attention_mask`, `position_ids`, the
  cache, `use_cache`, `return_dict`, and `logits_to_keep=1` where the signature has it (5.0).
- `modeling_layers.GradientCheckpointingLayer._can_checkpoint_with_cache`: a checkpointed layer may
  keep its cache, which shared-prefix scoring under gradient checkpointing needs (5.15).
- `activation_checkpointing_enable(activation_checkpointing_kwargs=...)` (5.23; before it,
  `gradient_checkpointing_enable`, now its deprecated alias).

In 5.24 the cache argument was renamed from `past_key_values` to `cache` (`past_key_values` stays a
deprecated alias until 5.40 on the models' `forward`, but not on `generate`); the decoder's output
field was renamed the same way, and `DynamicLayer` stopped keeping a `dtype` attribute. Custom-code
models (`trust_remote_code`) may keep the old name on a new transformers, which is why the argument
is read from the model's own signature rather than from the version.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import transformers
from packaging.version import Version

TRANSFORMERS_VERSION = Version(transformers.__version__)
"""The installed transformers release."""

MIN_TRANSFORMERS = Version("5.15")
"""The oldest transformers release forkrl supports (the floor in `pyproject.toml`)."""

CACHE_ARGUMENTS = ("cache", "past_key_values")
"""Names of the cache argument, newest first (`cache` since 5.24)."""

try:  # per-layer cache objects
    from transformers.cache_utils import Cache, DynamicLayer
except ImportError:  # pragma: no cover - transformers older than the floor
    Cache = DynamicLayer = None

try:
    from transformers.modeling_layers import GradientCheckpointingLayer
except ImportError:  # pragma: no cover - transformers older than the floor
    GradientCheckpointingLayer = None

_CAN_CHECKPOINT_WITH_CACHE = "_can_checkpoint_with_cache"


def cache_layers_missing() -> str | None:
    """Why transformers' per-layer cache API is unusable here, or None when it is available."""
    if DynamicLayer is None:
        return f"transformers {transformers.__version__} has no transformers.cache_utils.DynamicLayer"
    return None


def cache_argument(module: torch.nn.Module) -> str | None:
    """The name under which `module.forward` takes a KV cache (`cache` or `past_key_values`), or None.

    Read from the signature (through `functools.wraps` wrappers such as transformers'
    `deprecate_kwarg`), so a custom-code model keeps its own name on any transformers."""
    try:
        parameters = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):  # a forward without a signature (e.g. a C extension)
        return None
    return next((name for name in CACHE_ARGUMENTS if name in parameters), None)


def takes_logits_to_keep(module: torch.nn.Module) -> bool:
    """Whether `module.forward` takes `logits_to_keep` (then `generate` passes 1: only the last
    position's logits are computed), read from the signature like `cache_argument`."""
    try:
        return "logits_to_keep" in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def cache_kwargs(module: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """`{argument: cache}` for `module(...)` or `module.generate(...)`; `{}` when `cache` is None.

    Raises:
        ValueError: `module` takes no cache argument (callers check `cache_argument` first)."""
    if cache is None:
        return {}
    name = cache_argument(module)
    if name is None:
        raise ValueError(f"{type(module).__name__}.forward takes no cache argument ({' or '.join(CACHE_ARGUMENTS)})")
    return {name: cache}


def output_cache(outputs: Any) -> Any:
    """The cache a model returned (`outputs.cache`, or `outputs.past_key_values` before 5.24)."""
    for name in CACHE_ARGUMENTS:
        value = getattr(outputs, name, None)
        if value is not None:
            return value
    return None


def new_cache(layer_class: type) -> Any:
    """An empty `Cache` that creates a `layer_class` layer for every decoder layer on first use."""
    return Cache(layer_class_to_replicate=layer_class)


def cache_of_layers(layers: Sequence[Any]) -> Any:
    """A `Cache` over the given, already filled, layers (one per decoder layer)."""
    return Cache(layers=list(layers))


def cache_layers(cache: Any) -> list[Any]:
    """The per-layer objects of a `Cache`."""
    return list(cache.layers)


def fill_layer(layer: Any, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Make `layer` (a `DynamicLayer`) hold `keys`/values` `[B, kv_heads, L, d]` as if it had cached them.

    `lazy_initialization` sets whatever bookkeeping the installed release keeps (device; dtype before
    5.24; `is_initialized`); the tensors are then assigned as they are (no copy)."""
    layer.lazy_initialization(keys, values)
    layer.keys, layer.values = keys, values


def checkpointing_can_keep_cache() -> bool:
    """Whether a gradient-checkpointed layer may be allowed to keep its cache argument (5.15+)."""
    return GradientCheckpointingLayer is not None and hasattr(GradientCheckpointingLayer, _CAN_CHECKPOINT_WITH_CACHE)


@contextlib.contextmanager
def cache_kept_under_checkpointing(decoder: torch.nn.Module) -> Iterator[None]:
    """Let the checkpointed layers of `decoder` keep the cache argument while the block runs.

    transformers drops the cache in checkpointed layers, because a recomputation in backward would
    append to it a second time. A cache whose layers are idempotent (overwrite, or never change) is
    the case transformers documents for `_can_checkpoint_with_cache`: the recomputation replays the
    same call with the same cache object."""
    if GradientCheckpointingLayer is None:
        yield
        return
    missing = object()
    saved = [
        (m, m.__dict__.get(_CAN_CHECKPOINT_WITH_CACHE, missing))
        for m in decoder.modules()
        if isinstance(m, GradientCheckpointingLayer)
    ]
    for layer, _ in saved:
        setattr(layer, _CAN_CHECKPOINT_WITH_CACHE, True)  # an instance attribute shadows the class default
    try:
        yield
    finally:
        for layer, value in saved:
            if value is missing:
                delattr(layer, _CAN_CHECKPOINT_WITH_CACHE)
            else:
                setattr(layer, _CAN_CHECKPOINT_WITH_CACHE, value)


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer's activations in backward (non-reentrant checkpointing).

    `activation_checkpointing_enable` since 5.23; `gradient_checkpointing_enable`, its deprecated
    alias since then, before."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
