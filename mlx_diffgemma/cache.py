"""Encoder KV caches for DiffusionGemma.

The encoder appends keys and values; the decoder only reads them. Full
attention layers keep every position (mlx-lm's ``KVCache``). Sliding layers
keep the last ``window - 1`` positions: that is all the next causal query can
see, and it is exactly what the reference decoder attends to besides the
canvas. Keeping ``window`` positions instead changes the logits.
"""

from typing import List, Optional, Tuple

import mlx.core as mx
from mlx_lm.models.cache import KVCache, _BaseCache


class FullAttentionCache(KVCache):
    """Every encoded position, as mlx-lm stores it."""

    def context(self) -> Optional[Tuple[mx.array, mx.array]]:
        return None if self.keys is None else self.keys_and_values()


class SlidingWindowCache(_BaseCache):
    """The last ``max_size`` encoded positions, oldest first."""

    def __init__(self, max_size: int):
        self.max_size = max_size
        self.keys = None
        self.values = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """Append ``keys``/``values`` and return what the new queries attend to:
        the kept positions followed by the new ones."""
        self.offset += keys.shape[2]
        if self.keys is not None:
            keys = mx.concatenate([self.keys, keys], axis=2)
            values = mx.concatenate([self.values, values], axis=2)
        start = max(keys.shape[2] - self.max_size, 0)
        self.keys = keys[..., start:, :]
        self.values = values[..., start:, :]
        return keys, values

    def context(self) -> Optional[Tuple[mx.array, mx.array]]:
        return None if self.keys is None else (self.keys, self.values)

    def size(self):
        return 0 if self.keys is None else self.keys.shape[2]

    def empty(self):
        return self.keys is None

    @property
    def state(self):
        return self.keys, self.values

    @state.setter
    def state(self, v):
        self.keys, self.values = v

    @property
    def meta_state(self):
        return tuple(map(str, (self.max_size, self.offset)))

    @meta_state.setter
    def meta_state(self, v):
        self.max_size, self.offset = map(int, v)


def cached_length(cache: List[_BaseCache]) -> int:
    """Positions encoded so far (the position of the next token)."""
    return cache[0].offset
