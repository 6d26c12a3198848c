"""Seeds derived from a run's seed: one function, so every stream of a run is named by integers."""

from __future__ import annotations

_GOLDEN = 0x9E3779B97F4A7C15
_MASK64 = 0xFFFFFFFFFFFFFFFF


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (the run's seed, a position, an index...), stable across runs,
    processes and platforms; different tuples give unrelated seeds (a boost-style hash combine
    over 64-bit words)."""
    h = _GOLDEN
    for p in parts:
        h ^= (int(p) + _GOLDEN + ((h << 6) & _MASK64) + (h >> 2)) & _MASK64
    return h & 0x7FFFFFFFFFFFFFFF
