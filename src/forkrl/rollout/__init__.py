"""Generation backends and samplers: prompts in, `Rollout` (tokens + sampler log-probs/entropy) out."""

from forkrl.rollout.base import GenerationBackend, Prompts, Rollout, SamplingParams
from forkrl.rollout.entropy_temperature import EntropyAwareTemperature, entropy_of_logits
from forkrl.rollout.hf import HFGenerationBackend

__all__ = [
    "EntropyAwareTemperature",
    "GenerationBackend",
    "HFGenerationBackend",
    "Prompts",
    "Rollout",
    "SamplingParams",
    "entropy_of_logits",
]
