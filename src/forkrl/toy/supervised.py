"""Supervised training of a toy base model from scratch: its settings, the traces, the batches, the loop.

Every toy's base model is trained the same way (`forkrl.toy.task.build_base_model` calls
`train_on_traces`): next-token cross-entropy on prompt + trace + EOS with the loss on the trace
tokens only; AdamW, linear warm-up then cosine decay; length-bucketed batches in seeded epochs.
What differs between toys is only the traces (`TraceSequence`s) and the settings' defaults.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

__all__ = ["ToyBuildSettings", "ToyTraceData", "TraceSequence", "collate_sequences", "train_on_traces"]

logger = logging.getLogger(__name__)


@dataclass
class ToyTraceData:
    """The data settings every toy build has; a toy adds its own in a subclass."""

    seed: int = 0
    """Seeds the data, the traces, the initial weights, the batch order and the evaluation sampling."""
    num_traces: int = 60_000
    """Training traces, one per example drawn i.i.d. from the task's train split (examples may repeat)."""


@dataclass
class ToyBuildSettings(ToyTraceData):
    """Settings of every toy build: the data above, the model's shape and the optimisation.

    A toy's config is a subclass; declared as ``class Config(ToyBuildSettings, MyTraceData)`` (with
    ``MyTraceData(ToyTraceData)`` holding the toy's data fields) its data fields come before the
    model's, which is the order `toy_build.json` records them in.
    """

    # --- model (Qwen3-shaped)
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 512
    """With the sizes above: about 1.0 M parameters (0.03 M of them the tied embedding)."""
    max_position_embeddings: int = 512
    # --- optimisation
    steps: int = 1600
    """Optimizer steps (batches of `batch_size` traces; the data is cycled in seeded epochs)."""
    batch_size: int = 128
    lr: float = 4e-3
    """Peak learning rate, reached after `warmup_steps`, then cosine decay to `min_lr_ratio` of it."""
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    bf16: bool = True
    """Run the training forward pass under bfloat16 autocast (weights and optimizer stay float32):
    about 2x faster on CPUs with bf16 instructions (AVX512-BF16/AMX); slower on CPUs without them."""
    threads: int = 2
    """torch CPU threads during the build (restored afterwards)."""
    log_every: int = 100
    """Log the mean training loss every this many steps (0: never)."""


@dataclass
class TraceSequence:
    """One training example, tokenized."""

    ids: list[int]
    """prompt + response + EOS token ids."""
    prompt_len: int
    choice: list[bool]
    """Per response token (EOS included, which is never a choice): where the trace's writer chose."""


def collate_sequences(seqs: list[TraceSequence], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` and `labels` (-100 on prompt and padding), each (B, T)."""
    T = max(len(s.ids) for s in seqs)
    input_ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), T), dtype=torch.long)
    labels = torch.full((len(seqs), T), -100, dtype=torch.long)
    for row, s in enumerate(seqs):
        n = len(s.ids)
        input_ids[row, :n] = torch.tensor(s.ids)
        attention_mask[row, :n] = 1
        labels[row, s.prompt_len : n] = input_ids[row, s.prompt_len : n]
    return input_ids, attention_mask, labels


def _batches(seqs: list[TraceSequence], batch_size: int, generator: torch.Generator):
    """Endless length-bucketed batches: each epoch a seeded permutation, cut into groups of 32
    batches, each group sorted by length (less padding), batch order shuffled again."""
    n = len(seqs)
    while True:
        order = torch.randperm(n, generator=generator).tolist()
        batches = []
        group = 32 * batch_size
        for start in range(0, n, group):
            chunk = sorted(order[start : start + group], key=lambda i: len(seqs[i].ids))
            batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        for b in torch.randperm(len(batches), generator=generator).tolist():
            yield [seqs[i] for i in batches[b]]


def _lr_factor(step: int, config: ToyBuildSettings) -> float:
    """Linear warm-up to 1, then cosine decay to `min_lr_ratio` at the last step."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def train_on_traces(
    model: PreTrainedModel, seqs: list[TraceSequence], pad_id: int, config: ToyBuildSettings
) -> list[dict]:
    """Supervised next-token training; returns the logged loss curve (`step`, mean `loss`, `seconds`)."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]  # norms: no weight decay
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=(0.9, 0.98),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, config))
    batches = _batches(seqs, config.batch_size, torch.Generator().manual_seed(config.seed))
    model.train()
    curve, window, start = [], [], time.perf_counter()
    for step in range(config.steps):
        input_ids, attention_mask, labels = collate_sequences(next(batches), pad_id)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)
        # Position t predicts token t + 1; mean over the response tokens of the batch.
        loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        window.append(loss.item())
        last = step + 1 == config.steps
        if (config.log_every and (step + 1) % config.log_every == 0) or last:
            point = {"step": step + 1, "loss": sum(window) / len(window), "seconds": time.perf_counter() - start}
            curve.append(point)
            window = []
            logger.info(
                "toy build: step %d/%d loss %.4f (%.0f s)", step + 1, config.steps, point["loss"], point["seconds"]
            )
    model.eval()
    return curve
