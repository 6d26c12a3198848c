"""The HF backend's lean decode loop: forkrl's sampling over the model's `forward` and a KV cache, without `generate`.

`HFGenerationBackend` used to hand `model.generate` a chain of logits processors. At every step
`generate` also prepares its inputs, inspects each processor's signature, concatenates the attention
mask and the token ids, and softmaxes and `multinomial`-draws from the one-hot distribution our
row-seeded sampler returns, while the sampler rebuilt its hash keys from the seeds (~60 small ops).
On `benchmarks/train_step.py` (tiny Qwen3, 32-64 rows, 1 CPU thread) dropping that cuts decode CPU
time by 10-20% (decode tokens per CPU-second 1.15x at <= 64 tokens, 1.12x at 256, 1.23x at 1,024);
on the demo's 384-row batches, where the model's own work dominates, it is even (1.01x). What is
left is the model's forward: at 1,024 tokens on an idle core, 61% of decode's op time is attention
reading the KV cache and 18% the projections (`benchmarks/decode_attention.py`).

This loop calls the model exactly as `generate` does (same `input_ids`, 2-D `attention_mask`,
`position_ids`, cache and `logits_to_keep=1`), so the logits are the same numbers, and applies the
same operations to them in the same order: EOS mask (`min_new_tokens`), temperature or
entropy-aware temperature, [entropy], top-k, top-p, [log-normaliser], draw. What it leaves out is
bookkeeping whose results `generate` threw away:

- with row seeds, the Gumbel-max choice is the token (no one-hot, softmax or multinomial), and the
  noise is made for many steps at once (`SeededNoise`): its hash is integer arithmetic and the rest
  element-wise, so the values are those of one step at a time;
- without row seeds, `softmax` + `torch.multinomial` on the global generator, as in `generate`, so
  the same `seed` draws the same tokens;
- the sampled token's log-prob is gathered in its own step instead of at the next one.

Tokens, log-probs and entropies are bit-identical to the `generate` path (tests/rollout); that path
stays available as `HFGenerationBackend(lean_decode=False)`.

Host syncs: on CPU the "all rows ended" flag is read every step (there it is free). On accelerators
it is read every `STOP_CHECK_EVERY` steps when rows are seeded (steps run after the last EOS are
trimmed and change no result), and every step otherwise, because each extra `multinomial` would move
the generator that the next chunk of prompts draws from.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from forkrl.rollout.entropy_temperature import entropy_of_logits
from forkrl.rollout.seeded_sampling import gumbel_from_bits, hash_bits

NOISE_CHUNK_ELEMENTS = 2**21
"""Most Gumbel-noise values made at once (steps x B x V): 8 MiB of float32 kept, ~50 MiB of int64
and float32 temporaries while they are made. With a 150k vocabulary and 14 or more rows a chunk is
one step, as before."""

STOP_CHECK_EVERY = 16
"""Steps between reads of the "all rows ended" flag on accelerators when rows are seeded."""

ScoresTransform = Callable[[Any, torch.Tensor], torch.Tensor]
"""A logits processor called as `(input_ids, scores [B, V]) -> [B, V]`; the ones used here
(temperature, entropy-aware temperature, greedy, top-k, top-p) ignore `input_ids`."""


class SeededNoise:
    """The Gumbel noise `[B, V]` of `SeededGumbelSampler` at each step, made `chunk` steps at a time.

    Args:
        row_seeds: `[B]` int64 seed per row.
        vocab_size: V.
        end_step: one past the last response step that will be asked for.
    """

    def __init__(self, row_seeds: torch.Tensor, vocab_size: int, end_step: int):
        self.row_seeds, self.end_step = row_seeds, end_step
        self.chunk = max(1, NOISE_CHUNK_ELEMENTS // (row_seeds.shape[0] * vocab_size))
        self.token_ids = torch.arange(vocab_size, device=row_seeds.device)
        self._noise: torch.Tensor | None = None  # [steps, B, V] for response steps [_first, _first + steps)
        self._first = 0

    def at(self, step: int) -> torch.Tensor:
        """Noise `[B, V]` float32 of response step `step` (0-based):
        `gumbel_from_bits(hash_bits(row_seeds, step, arange(V)))`."""
        if self._noise is None or not self._first <= step < self._first + self._noise.shape[0]:
            n, B = min(self.chunk, self.end_step - step), self.row_seeds.shape[0]
            steps = torch.arange(step, step + n, device=self.row_seeds.device).repeat_interleave(B)  # [n * B]
            bits = hash_bits(self.row_seeds.repeat(n), steps, self.token_ids)  # [n * B, V], step-major
            self._noise, self._first = gumbel_from_bits(bits).view(n, B, -1), step
        return self._noise[step - self._first]


def stop_check_every(device: torch.device, seeded: bool) -> int:
    """Steps between reads of the "all rows ended" flag: 1 on CPU (free) or without row seeds (each
    extra multinomial draw would move the global generator), else `STOP_CHECK_EVERY`."""
    return 1 if device.type == "cpu" or not seeded else STOP_CHECK_EVERY


@torch.no_grad()
def decode_tokens(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    cache: Any,
    *,
    first_step: int,
    max_new_tokens: int,
    tempering: Sequence[ScoresTransform],
    truncation: Sequence[ScoresTransform],
    row_seeds: torch.Tensor | None,
    eos_ids: torch.Tensor,
    pad_token_id: int,
    min_new_tokens: int,
    forward_kwargs: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample up to `max_new_tokens` tokens after `input_ids`, as `generate` with forkrl's processors would.

    Args:
        model: the causal LM (possibly `peft`-wrapped), in eval mode.
        input_ids: `[B, T]` left-padded prompts (and the response so far, in later decode phases).
        attention_mask: `[B, T]` 1 on real tokens.
        cache: the KV cache, holding the keys/values of a prefix of `input_ids` (possibly none).
        first_step: response tokens already in `input_ids` (0 in the first phase): the step the
            seeded noise and the `min_new_tokens` mask count from.
        tempering: temperature (or entropy-aware temperature, or greedy) processors; the entropy is
            recorded after them.
        truncation: top-k / top-p processors; the log-probs are those of the scores after them.
        row_seeds: `[B]` int64 (Gumbel-max draws), or None (multinomial on the global generator).
        eos_ids: `[E]` ids that end a response; pad_token_id: what ended rows get afterwards.
        forward_kwargs: what else the model's forward gets, as from `generate`: the cache under its
            argument name (`compat.cache_kwargs`) and `logits_to_keep=1` where the model takes it.

    Returns:
        `(tokens, logprobs, entropy)`, each `[B, R]` with R <= `max_new_tokens` the number of steps
        until every row has ended (pad, and the statistics of pad, after a row's EOS).
    """
    B, T = input_ids.shape
    device = input_ids.device
    past = cache.get_seq_length()
    # generate's position ids: count of real tokens before each column, 0 on the padding.
    position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    mask = torch.cat([attention_mask, attention_mask.new_ones((B, max_new_tokens))], 1)  # [B, T + max_new]
    tokens = torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=device)
    entropy = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=device)
    unfinished = torch.ones(B, dtype=torch.long, device=device)
    check_every = stop_check_every(device, seeded=row_seeds is not None)

    # The first call runs what the cache lacks of `input_ids` (the prompts' last tokens after a
    # shared-prompt prefill, all of them otherwise); then one token per row and step.
    logits = _forward(model, input_ids[:, past:], attention_mask, position_ids[:, past:], forward_kwargs)
    position_ids = position_ids[:, -1:]
    noise = None if row_seeds is None else SeededNoise(row_seeds, logits.shape[1], first_step + max_new_tokens)
    steps = 0
    for t in range(max_new_tokens):
        step = first_step + t
        scores = logits
        if step < min_new_tokens:
            eos_in_vocab = torch.isin(torch.arange(scores.shape[1], device=device), eos_ids)  # [V]
            scores = torch.where(eos_in_vocab, -torch.inf, scores)
        chosen, logprobs[:, t], entropy[:, t] = _draw(
            scores, step, tempering, truncation, noise, unfinished, pad_token_id
        )
        tokens[:, t] = chosen
        unfinished = unfinished & ~torch.isin(chosen, eos_ids)
        steps = t + 1
        if steps == max_new_tokens or (steps % check_every == 0 and not bool(unfinished.any())):
            break
        position_ids = position_ids + 1
        logits = _forward(model, chosen.unsqueeze(1), mask[:, : T + steps], position_ids, forward_kwargs)

    # Steps run after every row had ended (accelerators check every few steps) are not generate's.
    ended = torch.isin(tokens[:, :steps], eos_ids)
    if check_every > 1 and bool(ended.any(-1).all()):
        steps = int(ended.long().argmax(-1).max()) + 1
    return tokens[:, :steps], logprobs[:, :steps], entropy[:, :steps]


def _draw(
    scores: torch.Tensor,
    step: int,
    tempering: Sequence[ScoresTransform],
    truncation: Sequence[ScoresTransform],
    noise: SeededNoise | None,
    unfinished: torch.Tensor,
    pad_token_id: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step's draw from the scores `[B, V]`: (token `[B]`, its log-prob `[B]` under the
    distribution sampled, the entropy `[B]` after `tempering`). Rows no longer `unfinished` get the
    pad token, as in `generate` (their statistics are masked later)."""
    for transform in tempering:
        scores = transform(None, scores)
    entropy = entropy_of_logits(scores)
    for transform in truncation:
        scores = transform(None, scores)
    log_normalizer = scores.logsumexp(-1)  # [B]
    if noise is not None:
        chosen = (noise.at(step) + scores).argmax(-1)
    else:
        chosen = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
    chosen = chosen * unfinished + pad_token_id * (1 - unfinished)
    return chosen, scores.gather(1, chosen.unsqueeze(1)).squeeze(1) - log_normalizer, entropy


def _forward(model, input_ids, attention_mask, position_ids, forward_kwargs: dict[str, Any]) -> torch.Tensor:
    """One decoder call with the cache; the next-token logits `[B, V]`."""
    outputs = model(
        input_ids=input_ids.contiguous(),
        attention_mask=attention_mask,
        position_ids=position_ids.contiguous(),
        use_cache=True,
        return_dict=True,
        **forward_kwargs,
    )
    return _next_token_logits(outputs)


def _next_token_logits(outputs: Any) -> torch.Tensor:
    """The last position's logits `[B, V]` as a float32 copy, as `generate` takes them (the model's
    output, with any full-length prefill logits, is dropped with the caller's reference)."""
    return outputs.logits[:, -1].to(copy=True, dtype=torch.float32)
