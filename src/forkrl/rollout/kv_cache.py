"""A KV cache for `generate` that appends in place instead of re-concatenating every step.

transformers' `DynamicLayer.update` runs `torch.cat([keys, new], dim=-2)` at every decoding step,
which copies the whole cache: O(L) per token, O(L²) per response. On the toy demo's CPU rollouts
that copying was a quarter of generation time (5.3 s of 20.2 s, 2048 responses of ~100 tokens).
`GrowingLayer` keeps capacity-doubling buffers and writes each step's keys/values into the free
slots, so a response costs O(L) copies in all; attention reads a view of the filled part, the same
numbers in the same order as the concatenated tensor.

Only for decoders whose layers are all plain full attention (`shared_prefix_unsupported`): the
sliding-window and linear-attention layers of other models keep other state, and `generate` builds
its own cache for them (reported as a declined fast path).
"""

from __future__ import annotations

import torch

from forkrl.models import compat

MIN_CAPACITY = 64
"""Positions allocated at the first write (then doubled as needed)."""


def growing_cache():
    """An empty cache whose layers are `GrowingLayer`s, or None where transformers lacks the API."""
    if compat.cache_layers_missing() is not None:
        return None
    return compat.new_cache(GrowingLayer)


if compat.DynamicLayer is not None:

    class GrowingLayer(compat.DynamicLayer):
        """`DynamicLayer` with amortized O(1) appends: `keys`/`values` are views `[B, kv_heads, L, d]`
        of buffers with room for more positions along dim -2.

        Every other method of `DynamicLayer` (batch selection, crop, beam reordering) replaces
        `keys`/`values` with new tensors; the next `update` notices (they are no longer the views
        it made) and copies them into fresh buffers, so those methods keep working unchanged."""

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            self.keys = self._append("_key_buffer", self.keys, key_states)
            self.values = self._append("_value_buffer", self.values, value_states)
            self._views = (self.keys, self.values)
            return self.keys, self.values

        def _append(self, name: str, current: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
            buffer: torch.Tensor | None = getattr(self, name, None)
            ours = any(current is view for view in getattr(self, "_views", None) or ())
            used = current.shape[-2] if current.numel() else 0
            needed = used + new.shape[-2]
            if not ours or buffer is None or buffer.shape[:2] != new.shape[:2] or needed > buffer.shape[-2]:
                capacity = max(needed, 2 * used, MIN_CAPACITY)
                fresh = new.new_empty((*new.shape[:2], capacity, new.shape[-1]))
                if used:
                    fresh[..., :used, :] = current
                buffer = fresh
                setattr(self, name, buffer)
            buffer[..., used:needed, :] = new
            return buffer[..., :needed, :]

        def reset(self) -> None:
            self._key_buffer = self._value_buffer = self._views = None
            super().reset()
