"""Generation backend on Hugging Face models: batched, KV-cached, seeded, with sampler stats.

Decoding runs in forkrl's lean loop over the model's `forward` (`rollout/decode.py`) where the
in-place KV cache can be built, and in `model.generate` otherwise (and with `lean_decode=False`, the
reference the tests compare it with); both give the same tokens and statistics.

How the per-token statistics are obtained: instead of asking `generate` for `output_scores` /
`output_logits` (which keeps a `[B, V]` tensor for every step, i.e. `R·B·V` floats — 300 GB for
B = 64, R = 8k, V = 150k), we hand `generate` our own processor chain and record what we need as the
scores flow through it, one vectorised op per step over the batch (the lean loop applies the same
processors and records the same values in its own loop):

    raw logits -> temperature (or entropy-aware temperature) -> [record entropy] -> top-k -> top-p
               -> [record log-normaliser of the final scores] -> [seeded Gumbel-max, with row_seeds]

The sampled token of step t is only known at step t + 1 (it is then the last column of
`input_ids`), so its log-prob is gathered then from the kept final scores of step t; the last step
is gathered after `generate` returns. Peak extra memory is one `[B, V]` tensor.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from forkrl import fast_paths
from forkrl.models import compat
from forkrl.models.loading import unwrap_peft
from forkrl.models.mode import eval_mode
from forkrl.models.scoring import prompt_groups, shared_prefix_unsupported
from forkrl.rollout.base import Prompts, Rollout, SamplingParams, pad_rows, prompt_token_ids
from forkrl.rollout.decode import decode_tokens
from forkrl.rollout.entropy_temperature import EntropyAwareTemperature, entropy_of_logits
from forkrl.rollout.kv_cache import growing_cache
from forkrl.rollout.seeded_sampling import SeededGumbelSampler


class HFGenerationBackend:
    """Sample with the in-process training model.

    Args:
        model: a causal LM (possibly `peft`-wrapped); sampling runs in eval mode and restores the mode.
        tokenizer: used to tokenize text prompts and for the pad/EOS ids.
        batch_size: sequences decoded together; larger batches are split into chunks.
        eos_token_ids: tokens that end a response; default: the tokenizer's EOS plus those in
            `model.generation_config` (chat models often have several, e.g. `<|im_end|>`).
        share_prompt: prefill each run of identical prompt rows once (see below).
        decode_phase: tokens per decoding phase, 0 = one phase (see "Long tails" below).
        lean_decode: decode in forkrl's own loop over the model's `forward` (`rollout/decode.py`;
            the fast path `lean_decode_loop`), with `model.generate` only where the in-place KV
            cache cannot be built; False: always `generate` (the reference path, same results).
        around: called for a context entered around every `generate` (the trainer passes its
            autocast and, under FSDP2, the gathering of the full weights: what sampling with the
            in-process model needs).

    Seeding: with `SamplingParams.seed` set, generation runs inside `torch.random.fork_rng` after
    `torch.manual_seed(seed)` (HF samples with `torch.multinomial` on the global generator, which
    takes no `generator=` argument). Same seed, prompts and batch size give the same tokens, and
    the caller's RNG state is left untouched.

    With `SamplingParams.row_seeds` set, the last processor picks each row's token by Gumbel-max
    with noise hashed from (row seed, step, token id) and hands `generate` a one-hot distribution
    (see `seeded_sampling`), so a row's tokens do not depend on `batch_size`, on the other prompts
    or on their order. Its cost is one `[B, V]` int64 hash per step. The caller's RNG state is left
    untouched here too (the one-hot multinomial draw still advances a forked generator).

    Shared prompts: GRPO samples G responses per prompt in contiguous rows, and `generate` would
    prefill every copy. With `share_prompt` (default), runs of identical consecutive prompt rows are
    prefilled once (all but their last token), the KV cache is copied to the rows, and `generate`
    runs each row's last prompt token and the responses against it. This changes the arithmetic
    of the prompt's keys/values only by float rounding; the sampling, seeds and recorded
    statistics are untouched.

    Long tails: `generate` decodes every row of a batch until its longest response ends, so one
    long response keeps the whole batch busy. With `decode_phase = n > 0`, generation stops every
    n tokens and goes on with only the unfinished rows (and their slice of the KV cache). With
    `row_seeds` the tokens are those of a single call (each row's draw depends on its seed and
    step only); the cost is one more start of the decode loop, and its setup, per phase.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        batch_size: int = 64,
        eos_token_ids: Sequence[int] | None = None,
        share_prompt: bool = True,
        decode_phase: int = 0,
        lean_decode: bool = True,
        around: Callable[[], contextlib.AbstractContextManager] | None = None,
    ):
        if tokenizer.pad_token_id is None:
            raise ValueError("tokenizer needs a pad token (load_policy sets pad = EOS when missing)")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.share_prompt = share_prompt
        self.decode_phase = decode_phase
        self.lean_decode = lean_decode
        self.around = around or contextlib.nullcontext
        self.pad_token_id = tokenizer.pad_token_id
        self.eos_token_ids = list(eos_token_ids) if eos_token_ids is not None else _default_eos_ids(model, tokenizer)
        if not self.eos_token_ids:
            raise ValueError("no EOS token id found; pass eos_token_ids")

    def update_weights(self, model: torch.nn.Module) -> None:
        """In-process: generation already uses the training weights; just track the object."""
        self.model = model

    def generate(self, prompts: Prompts, params: SamplingParams) -> Rollout:
        """Sample one response per prompt. Prompts are text (tokenized with the tokenizer's defaults,
        so a BOS is added where the model expects one) or lists of token ids."""
        if len(prompts) == 0:
            raise ValueError("no prompts")
        if params.row_seeds is not None and len(params.row_seeds) != len(prompts):
            raise ValueError(f"{len(params.row_seeds)} row_seeds for {len(prompts)} prompts")
        prompt_ids = prompt_token_ids(self.tokenizer, prompts)
        device = next(self.model.parameters()).device
        seeded = params.seed is not None or params.row_seeds is not None
        rng = (
            torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
            if seeded
            else contextlib.nullcontext()
        )
        with self.around(), rng, eval_mode(self.model):
            if params.seed is not None:
                torch.manual_seed(params.seed)
            chunks = []
            for i in range(0, len(prompt_ids), self.batch_size):
                # A chunk's rows keep their own seeds: slice them along with the prompts.
                seeds = None if params.row_seeds is None else params.row_seeds[i : i + self.batch_size]
                chunks.append(self._generate_batch(prompt_ids[i : i + self.batch_size], params, device, seeds))
        return chunks[0] if len(chunks) == 1 else Rollout.cat(chunks, self.pad_token_id)

    def _generate_batch(
        self, prompts: list[list[int]], params: SamplingParams, device, row_seeds: list[int] | None
    ) -> Rollout:
        # Left padding keeps every prompt flush against its response, so step t of every row is the
        # same column and the KV cache stays rectangular.
        B, P = len(prompts), max(len(p) for p in prompts)
        prompt_ids, prompt_mask = pad_rows(prompts, self.pad_token_id, left=True)
        prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)

        seeds = None if row_seeds is None else torch.tensor(row_seeds, dtype=torch.long, device=device)
        # generate continues from a cache holding a prefix of `input_ids` (it runs only the rest).
        # On full-attention decoders that cache appends in place (`kv_cache.GrowingLayer`); on others
        # generate builds its own, and the paths built on our cache are reported as declined.
        cache, reason = self._new_cache()
        if cache is None:
            fast_paths.declined(fast_paths.INPLACE_KV_CACHE, reason)
            if self.decode_phase > 0:
                fast_paths.declined(fast_paths.DECODE_PHASES, reason)
            if self.lean_decode:
                fast_paths.declined(fast_paths.LEAN_DECODE_LOOP, reason)
        else:
            fast_paths.used(fast_paths.INPLACE_KV_CACHE)
            if self.decode_phase > 0:
                fast_paths.used(fast_paths.DECODE_PHASES)
            if self.lean_decode:
                fast_paths.used(fast_paths.LEAN_DECODE_LOOP)
        if self.share_prompt:
            cache = self._prefill_shared_prompts(prompt_ids, prompt_mask, cache, reason)
        phase = self.decode_phase if cache is not None else 0
        eos = torch.tensor(self.eos_token_ids, device=device)

        # Decode in phases of `phase` tokens; after each, only the rows without an EOS go on, with
        # their slice of the cache. A row's tokens depend only on its seed and step (the sampler's
        # step counts from the original padded prompt length), so they are those of one long call.
        rows, row_seeds_now = torch.arange(B, device=device), seeds
        input_ids, attention_mask, done = prompt_ids, prompt_mask, 0
        response_ids = logprobs = entropy = None
        while True:
            n = params.max_new_tokens - done if phase <= 0 else min(phase, params.max_new_tokens - done)
            new, lp, ent = self._generate_phase(input_ids, attention_mask, params, row_seeds_now, P, n, cache)
            if response_ids is None:
                if phase <= 0 or new.shape[1] < n:  # one call did it all: no copies
                    response_ids, logprobs, entropy = new, lp, ent
                    break
                size = (B, params.max_new_tokens)
                response_ids = torch.full(size, self.pad_token_id, dtype=new.dtype, device=device)
                logprobs = torch.zeros(size, dtype=lp.dtype, device=device)
                entropy = torch.zeros(size, dtype=ent.dtype, device=device)
            R = new.shape[1]
            response_ids[rows, done : done + R] = new
            logprobs[rows, done : done + R] = lp
            entropy[rows, done : done + R] = ent
            done += R
            going = ~torch.isin(new, eos).any(-1)
            if done >= params.max_new_tokens or R < n or not bool(going.any()):
                response_ids, logprobs, entropy = response_ids[:, :done], logprobs[:, :done], entropy[:, :done]
                break
            keep = going.nonzero().squeeze(1)
            rows = rows[keep]
            row_seeds_now = None if row_seeds_now is None else row_seeds_now[keep]
            input_ids = torch.cat([input_ids, new], 1)[keep]
            attention_mask = torch.cat([attention_mask, torch.ones_like(new)], 1)[keep]
            cache.batch_select_indices(keep)

        # Valid = no EOS strictly before this position; the EOS itself is kept (it is a decision).
        is_eos = torch.isin(response_ids, eos)
        response_mask = ((is_eos.long().cumsum(-1) - is_eos.long()) == 0).long()
        return Rollout(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            response_ids=response_ids.masked_fill(response_mask == 0, self.pad_token_id),
            response_mask=response_mask,
            sampler_logprobs=logprobs.masked_fill(response_mask == 0, 0.0),
            sampler_entropy=entropy.masked_fill(response_mask == 0, 0.0),
            finished=is_eos.any(-1),
            response_lengths=response_mask.sum(-1),
            row_seeds=seeds,
        )

    def _generate_phase(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        params: SamplingParams,
        seeds: torch.Tensor | None,
        prompt_len: int,
        max_new_tokens: int,
        cache,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Up to `max_new_tokens` tokens from `input_ids` (and the `cache` holding a prefix of them:
        all but their last column, or none) in the lean loop, or in one `generate` call where there
        is no cache of ours or `lean_decode` is off; returns the new tokens `[B, R]` and their
        log-probs and entropies `[B, R]`."""
        eos = torch.tensor(self.eos_token_ids, device=input_ids.device)
        tempering, truncation = _warpers(params)
        if self.lean_decode and cache is not None:
            model = unwrap_peft(self.model)
            forward_kwargs = compat.cache_kwargs(model, cache)
            if compat.takes_logits_to_keep(model):
                forward_kwargs["logits_to_keep"] = 1
            return decode_tokens(
                self.model,
                input_ids,
                attention_mask,
                cache,
                first_step=input_ids.shape[1] - prompt_len,
                max_new_tokens=max_new_tokens,
                tempering=tempering,
                truncation=truncation,
                row_seeds=seeds,
                eos_ids=eos,
                pad_token_id=self.pad_token_id,
                min_new_tokens=params.min_new_tokens,
                forward_kwargs=forward_kwargs,
            )

        recorder = _SamplerStatsRecorder()
        processors = LogitsProcessorList([*tempering, recorder.entropy_stage(), *truncation, recorder.logprob_stage()])
        if params.min_new_tokens > 0:
            # First, like generate's own: the EOS mask shapes the distribution that is recorded.
            processors.insert(0, MinNewTokensLengthLogitsProcessor(prompt_len, params.min_new_tokens, eos))
        if seeds is not None:
            # After the recorder: the Gumbel-max draw is from the recorded final scores' softmax.
            processors.append(SeededGumbelSampler(seeds, prompt_len=prompt_len))
        # The warpers live in our processor list, so generate's own must be neutral:
        # do_sample with T = 1, top_k = 0, top_p = 1 adds none of them.
        gen_config = GenerationConfig(
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            eos_token_id=self.eos_token_ids,
            pad_token_id=self.pad_token_id,
            use_cache=True,
        )
        with _neutral_model_generation_config(self.model):
            sequences = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                generation_config=gen_config,
                logits_processor=processors,
                **compat.cache_kwargs(unwrap_peft(self.model), cache),
            )
        new = sequences[:, input_ids.shape[1] :]
        logprobs, entropy = recorder.finish(new)
        return new, logprobs, entropy

    def _new_cache(self):
        """`(cache, None)`: an empty in-place cache for `generate`, or `(None, reason)` where it cannot run."""
        model = unwrap_peft(self.model)
        reason = shared_prefix_unsupported(model.get_decoder())
        if reason is None and compat.cache_argument(model) is None:
            reason = f"{type(model).__name__}.forward takes no cache argument"
        if reason is None and (cache := growing_cache()) is not None:
            return cache, None
        return None, reason or compat.cache_layers_missing() or "no in-place cache could be built"

    @torch.no_grad()
    def _prefill_shared_prompts(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, cache, no_cache_reason):
        """Fill the empty `cache` with every row's prompt but its last token `[B, P - 1]`, computed
        once per run of identical rows, and return it; return it unchanged (empty) when no row
        repeats, and `generate` then prefills as usual. The last token stays uncached because
        `generate` needs one new token per row to produce the first logits. With no cache
        (`no_cache_reason`), repeated prompts are reported as a declined fast path."""
        if prompt_ids.shape[1] < 2:
            return cache
        first_rows, row_to_group = prompt_groups(prompt_ids, prompt_mask)
        if len(first_rows) == len(prompt_ids):
            return cache
        if cache is None:
            fast_paths.declined(fast_paths.SHARED_PROMPT_PREFILL, no_cache_reason)
            return None
        decoder = unwrap_peft(self.model).get_decoder()
        mask = prompt_mask[first_rows, :-1]  # (U, P - 1)
        decoder(
            input_ids=prompt_ids[first_rows, :-1],
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp_min(0),  # as `generate` computes them
            use_cache=True,
            **compat.cache_kwargs(decoder, cache),
        )
        if cache.get_seq_length() != prompt_ids.shape[1] - 1:  # the decoder ignored the cache it was given
            fast_paths.declined(
                fast_paths.SHARED_PROMPT_PREFILL, f"{type(decoder).__name__} did not fill the cache it was given"
            )
            return growing_cache()
        cache.batch_select_indices(row_to_group)  # (U, ...) -> (B, ...)
        fast_paths.used(fast_paths.SHARED_PROMPT_PREFILL)
        return cache


class _SamplerStatsRecorder:
    """Collects per-step entropy `[B]` and sampled-token log-probs `[B]` from inside `generate`."""

    def __init__(self):
        self.entropy: list[torch.Tensor] = []
        self.logprobs: list[torch.Tensor] = []
        self._last_scores: torch.Tensor | None = None  # [B, V] final scores of the latest step
        self._last_lse: torch.Tensor | None = None  # [B] their logsumexp

    def entropy_stage(self) -> LogitsProcessor:
        """Processor recording the entropy of the (temperature-scaled, untruncated) scores."""
        return _Tap(lambda input_ids, scores: self.entropy.append(entropy_of_logits(scores)))

    def logprob_stage(self) -> LogitsProcessor:
        """Processor keeping the final scores; also resolves the previous step's sampled token."""
        return _Tap(self._on_final_scores)

    def _on_final_scores(self, input_ids: torch.Tensor, scores: torch.Tensor) -> None:
        if self._last_scores is not None:
            self._gather(input_ids[:, -1])
        # No copy needed: the scores tensor is created anew at every step and never mutated later.
        self._last_scores, self._last_lse = scores, scores.float().logsumexp(-1)

    def _gather(self, tokens: torch.Tensor) -> None:
        picked = self._last_scores.float().gather(1, tokens.unsqueeze(1)).squeeze(1)
        self.logprobs.append(picked - self._last_lse)

    def finish(self, response_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(logprobs, entropy)`, each `[B, R]` for `response_ids [B, R]`; frees the kept scores."""
        R = response_ids.shape[1]
        if len(self.logprobs) < R:
            self._gather(response_ids[:, len(self.logprobs)])
        self._last_scores = self._last_lse = None
        # [:R] drops a step that generate ran and then undid (deferred stop checks on some devices).
        return torch.stack(self.logprobs[:R], 1), torch.stack(self.entropy[:R], 1)


class _Tap(LogitsProcessor):
    """A pass-through processor that lets a callback look at the scores."""

    def __init__(self, callback):
        self.callback = callback

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        self.callback(input_ids, scores)
        return scores


class _Greedy(LogitsProcessor):
    """T -> 0: all mass on the argmax, so sampling returns it and its log-prob is exactly 0."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, scores.argmax(-1, keepdim=True), 0.0)


def _warpers(params: SamplingParams) -> tuple[list[LogitsProcessor], list[LogitsProcessor]]:
    """`(tempering, truncation)`: the processors before the recorded entropy (temperature, or
    entropy-aware temperature, or greedy) and after it (top-k, top-p), in the order they apply."""
    tempering: list[LogitsProcessor] = []
    if params.entropy_temperature is not None:
        tempering.append(EntropyAwareTemperature(*params.entropy_temperature))
    elif params.temperature == 0:
        tempering.append(_Greedy())
    elif params.temperature != 1.0:
        tempering.append(TemperatureLogitsWarper(params.temperature))
    truncation: list[LogitsProcessor] = []
    if params.top_k > 0:
        truncation.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        truncation.append(TopPLogitsWarper(params.top_p))
    return tempering, truncation


@contextlib.contextmanager
def _neutral_model_generation_config(model: torch.nn.Module) -> Iterator[None]:
    """Hide the checkpoint's `generation_config.json` during `generate`.

    `generate` fills every field we leave unset from the model's generation config, and checkpoints
    ship sampling defaults (Qwen3: top_k = 20, top_p = 0.95; others repetition_penalty, min_p...)
    that would silently change the distribution we sample from and record.
    """
    target = unwrap_peft(model)
    saved = target.generation_config
    target.generation_config = GenerationConfig(
        bos_token_id=saved.bos_token_id, eos_token_id=saved.eos_token_id, pad_token_id=saved.pad_token_id
    )
    try:
        yield
    finally:
        target.generation_config = saved


def _default_eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    ids = [tokenizer.eos_token_id]
    model_eos = unwrap_peft(model).generation_config.eos_token_id
    ids += model_eos if isinstance(model_eos, list) else [model_eos]
    return sorted({i for i in ids if i is not None})


def build_hf_backend(ctx) -> HFGenerationBackend:
    """The `hf` entry of `forkrl.rollout.registry`: sample with the training model in process."""
    return HFGenerationBackend(
        ctx.model,
        ctx.tokenizer,
        batch_size=ctx.rollout.generation_batch_size,
        decode_phase=ctx.rollout.decode_phase,
        around=ctx.forward_context,
    )
