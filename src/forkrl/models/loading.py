"""Load a Hugging Face causal LM + tokenizer as an RL policy, and run it without materialising logits.

`forward_hidden_states` + `get_lm_head` let the trainer feed the last hidden states straight into a
fused log-prob/entropy op: full `[B, L, V]` logits for a 150k vocabulary are the largest tensor in
an RLVR step, and the loss only needs two numbers per token from them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from forkrl.models import compat, precision


def load_policy(
    name_or_path: str | os.PathLike,
    dtype: str = "auto",
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
    gradient_checkpointing: bool = False,
    attn_implementation: str | None = None,
    lora_rank: int = 0,
    lora_alpha: float | None = None,
    lora_target_modules: Sequence[str] | str = "all-linear",
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load `(model, tokenizer)` for RL training and generation.

    Args:
        name_or_path: a Hub id (``"Qwen/Qwen3-8B"``) or a local directory. Anything that is not
            an ``org/name`` Hub id must be an existing directory (`check_model_source`); we fail
            early naming the path instead of letting the Hub client retry and report a confusing
            "repo id" error.
        dtype: ``"auto"`` (float32 weights; the caller adds bf16 autocast on CUDA, see
            `forkrl.models.precision`), ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        device: where to put the model; defaults to ``"cuda"`` when available, else ``"cpu"``.
        gradient_checkpointing: recompute activations in backward (non-reentrant) to save memory.
        attn_implementation: passed through (``"sdpa"``, ``"flash_attention_2"``, ``"eager"``...).
        lora_rank: > 0 wraps the model with a `peft` LoRA adapter (needs ``pip install forkrl[lora]``).
        lora_alpha: LoRA scaling numerator; defaults to ``2 * lora_rank``.
        lora_target_modules: module names to adapt, or ``"all-linear"``.
        tokenizer: the model's tokenizer (`load_tokenizer`) when the caller has loaded it already,
            from the name `check_model_source` returned; then neither is done again here.

    The tokenizer is set to left padding (prompts flush against the generated tokens). If it has no
    pad token, EOS is used as pad: that is safe here because rollouts carry an explicit
    `response_mask` and never infer validity from pad ids, and the first EOS stays in the mask.
    """
    path_str = check_model_source(name_or_path) if tokenizer is None else os.fspath(name_or_path)
    weights_dtype = precision.weights_dtype(dtype)

    if tokenizer is None:
        tokenizer = load_tokenizer(path_str, trust_remote_code=trust_remote_code)

    kwargs = {"dtype": weights_dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(path_str, trust_remote_code=trust_remote_code, **kwargs)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    if gradient_checkpointing:
        compat.enable_activation_checkpointing(model)
    if lora_rank > 0:
        model = _wrap_lora(model, lora_rank, lora_alpha, lora_target_modules, gradient_checkpointing)
    return model, tokenizer


_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_model_source(name_or_path: str | os.PathLike) -> str:
    """Check a model name before anything is loaded; return it (local paths expanded).

    A name that looks like a path (absolute, ``./``, ``~``, several slashes), exists locally, or is
    not of the Hub's ``org/name`` form must be a local directory: it is reported as missing and
    never sent to the Hub (where a typo would retry for a minute before failing). A Hub id with
    ``HF_HUB_OFFLINE=1`` must already be in the local cache. Raises FileNotFoundError.
    """
    path_str = os.fspath(name_or_path)
    if not path_str:
        raise FileNotFoundError("no model given (an empty name)")
    if _looks_local(path_str) or not _HUB_ID.match(path_str):
        path = Path(path_str).expanduser()
        if not path.is_dir():
            hint = "" if _looks_local(path_str) else " (nor a Hub id of the form org/name)"
            raise FileNotFoundError(f"model path {path_str!r} does not exist or is not a directory{hint}")
        return str(path)
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(path_str, "config.json"), str):
            raise FileNotFoundError(
                f"model {path_str!r}: not a local directory and not in the Hub cache, and HF_HUB_OFFLINE is set"
            )
    return path_str


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The model's tokenizer, left-padded, with a pad token (EOS when it has none; see `load_policy`).

    A local directory without tokenizer files is an error naming it (transformers would build an
    empty tokenizer that fails only at the first step, with "empty prompt").
    """
    path = Path(name_or_path)
    if path.is_dir() and not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"model directory {str(path)!r} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)})"
        )
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if len(tokenizer) <= 1:
        raise ValueError(f"tokenizer of {name_or_path!r} has {len(tokenizer)} token(s): not a usable tokenizer")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {name_or_path!r} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def get_lm_head(model: PreTrainedModel) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output projection: `weight [V, H]` and `bias [V]` (None for most LMs)."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (LM head)")
    return head.weight, getattr(head, "bias", None)


def forward_hidden_states(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run the decoder stack only (no LM head) and return the final hidden states `[B, L, H]`.

    `hidden @ weight.T (+ bias)` equals `model(...).logits` (see `get_lm_head`). Note that some
    architectures scale logits after the head (e.g. Gemma's soft-capping); callers that need exact
    logits for such models must apply it themselves.

    Args:
        input_ids: `[B, L]` token ids, left- and/or right-padded.
        attention_mask: `[B, L]`, 1 for real tokens.
        position_ids: `[B, L]`; default `cumsum(attention_mask) - 1` (0 on padding), which is what
            `model.generate` uses, so left-padded rows see the same positions as during sampling.
    """
    if position_ids is None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    decoder = unwrap_peft(model).get_decoder()
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return out.last_hidden_state


def _looks_local(path: str) -> bool:
    """Whether a string is clearly a filesystem path rather than a Hub id like ``org/name``."""
    return (
        os.path.isabs(path)
        or path.startswith(("./", "../", "~", ".\\", "..\\"))
        or path in (".", "..")
        or path.count("/") > 1  # Hub ids have exactly one slash
        or os.path.exists(path)
    )


def unwrap_peft(model: PreTrainedModel) -> PreTrainedModel:
    """The underlying transformers model of a `peft.PeftModel` (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _wrap_lora(model, rank, alpha, target_modules, gradient_checkpointing):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise ImportError("LoRA needs the `peft` package: pip install 'forkrl[lora]'") from err
    if gradient_checkpointing:
        # With frozen embeddings no checkpointed input requires grad, so gradients would not flow.
        model.enable_input_require_grads()
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else 2 * rank,
        target_modules=target_modules if isinstance(target_modules, str) else list(target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)
