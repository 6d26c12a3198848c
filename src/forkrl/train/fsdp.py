"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for the trainer: `trainer.strategy = fsdp2`.

Each decoder layer is its own shard group (gathered just before it runs, freed after) and the
`ResponseScorer` that wraps the model is the root group (embeddings, final norm, LM head: the
scorer reads the LM-head weight directly for the fused log-prob op, so the root must be a module
whose forward encloses the whole computation). Gradients are reduce-scattered with the same mean
over processes as DDP's all-reduce, so the loss code is shared.

Generation calls `model.generate`, which goes around the root's forward; `gathered(...)` unshards
every group for its duration (one all-gather per rollout instead of one per decoded token) and
reshards after. Checkpoints are written in the same `save_pretrained` layout as DDP's: every
process takes part in gathering the full state dict, which lands in the main process's CPU memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from forkrl.models.loading import unwrap_peft


def shard_scorer(scorer: torch.nn.Module, model: torch.nn.Module) -> None:
    """`fully_shard` each decoder layer of `model`, then `scorer` (whose `.model` is `model`) as root."""
    from torch.distributed.fsdp import fully_shard

    decoder = unwrap_peft(model).get_decoder()
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        raise ValueError(
            f"trainer.strategy = fsdp2 needs a decoder with a `layers` ModuleList; {type(decoder).__name__} has none"
        )
    for layer in layers:
        fully_shard(layer, reshard_after_forward=True)
    # The root keeps its parameters after forward (FSDP's own default): backward needs them at once.
    fully_shard(scorer, reshard_after_forward=False)
    # FSDP2 initializes lazily at the first forward, taking whichever module runs first as the
    # root. `generate` enters through the layers, so run the scorer once (one token) to make it
    # the root of them all before anything else does.
    device = next(scorer.parameters()).device
    one = torch.ones((1, 1), dtype=torch.long, device=device)
    with torch.no_grad():
        scorer(one, one, one, one)
    scorer.reshard()


def _fsdp_modules(root: torch.nn.Module) -> list[torch.nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in root.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered(root: torch.nn.Module | None) -> Iterator[None]:
    """Hold every FSDP group under `root` unsharded (full parameters on each process) inside the
    block; a no-op for a module without FSDP. Collective: every process must enter it. Afterwards
    the groups reshard after forward again as `shard_scorer` set them: all but the root."""
    modules = [] if root is None else _fsdp_modules(root)
    if not modules:
        yield
        return
    for m in modules:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in modules:
            m.reshard()
            m.set_reshard_after_forward(m is not root, recurse=False)
