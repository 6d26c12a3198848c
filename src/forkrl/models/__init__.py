"""Loading Hugging Face causal LMs as RL policies, and the tiny in-code model/tokenizer factory."""

from forkrl.models.loading import forward_hidden_states, get_lm_head, load_policy, unwrap_peft
from forkrl.models.tiny import build_tiny_model, build_tiny_tokenizer, save_tiny_model_dir

__all__ = [
    "build_tiny_model",
    "build_tiny_tokenizer",
    "forward_hidden_states",
    "get_lm_head",
    "load_policy",
    "save_tiny_model_dir",
    "unwrap_peft",
]
