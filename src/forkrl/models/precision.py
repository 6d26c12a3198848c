"""What `model.dtype` means, in one place: the weights' dtype and the autocast around forward passes.

`auto` (the default) means **float32 weights, with bfloat16 autocast on CUDA** (no autocast on the
CPU). That is what the fused log-prob/entropy op is written for (its LM-head matmul runs in the
autocast dtype, its softmax statistics in float32), what AdamW needs for stable small updates
(float32 master weights and moments), and what the README's precision row promises. It applies to
every forward: training, old/reference log-probs, generation and evaluation, so a run's eval sees
the numerics it was trained with. An explicit `float32`, `bfloat16` or `float16` loads the
weights in that dtype and uses no autocast (bf16 weights halve memory for evaluating or analysing a
large model; training in them is the user's choice).
"""

from __future__ import annotations

import contextlib

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The explicit choices; `auto` is resolved by `weights_dtype` / `autocast`."""
CHOICES = ("auto", *DTYPES)


def check_dtype(dtype: str) -> str:
    if dtype not in CHOICES:
        raise ValueError(f"dtype must be one of {', '.join(CHOICES)}, got {dtype!r}")
    return dtype


def weights_dtype(dtype: str) -> torch.dtype:
    """The dtype the weights are loaded in: float32 for `auto`, else the one named."""
    return DTYPES[check_dtype(dtype)] if dtype != "auto" else torch.float32


def autocast(dtype: str, device: torch.device | str):
    """A reusable context for forward passes: bf16 autocast for `auto` on CUDA, otherwise none."""
    device = torch.device(device)
    if check_dtype(dtype) == "auto" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
