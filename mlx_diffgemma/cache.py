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

    def cached_kv(self) -> Optional[Tuple[mx.array, mx.array]]:
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

    def cached_kv(self) -> Optional[Tuple[mx.array, mx.array]]:
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


def _stack(arrays) -> mx.array:
    """Rows stacked along the batch axis; a single row as it is, not copied once per block."""
    return arrays[0] if len(arrays) == 1 else mx.concatenate(arrays)


class _BatchedLayer:
    """One layer of a BatchedCache, with the interface the attention layer uses."""

    def __init__(self, keys, values, row_caches):
        self.keys, self.values, self.row_caches = keys, values, row_caches

    def cached_kv(self):
        return None if self.keys is None else (self.keys, self.values)

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """Append each row's new keys and values to that row's own cache, and
        return the padded context followed by the new positions."""
        for row, cache in enumerate(self.row_caches):
            cache.update_and_fetch(keys[row : row + 1], values[row : row + 1])
        if self.keys is None:
            return keys, values
        return mx.concatenate([self.keys, keys], axis=2), mx.concatenate([self.values, values], axis=2)


class BatchedCache:
    """The caches of several sequences side by side for one block.

    Each sequence keeps its own cache (batch 1); here every layer's kept keys
    and values are left-padded to the longest row and stacked, once per block,
    so that all the block's denoising steps (and its commit) run as one batch.
    ``valid[l]`` marks the real positions; RoPE uses each row's own offset,
    so padding never changes a row's result.
    """

    def __init__(self, row_caches: List[List[_BaseCache]]):
        self.row_caches = row_caches
        self.offsets = mx.array([row[0].offset for row in row_caches])
        self.layers, self.valid = [], []
        for layer in range(len(row_caches[0])):
            caches = [row[layer] for row in row_caches]
            contexts = [c.cached_kv() for c in caches]
            lengths = [0 if c is None else c[0].shape[2] for c in contexts]
            longest = max(lengths)
            if longest == 0:
                self.layers.append(_BatchedLayer(None, None, caches))
                self.valid.append(None)
                continue
            keys, values = zip(*[self._left_pad(c, contexts, longest) for c in contexts])
            self.layers.append(_BatchedLayer(_stack(keys), _stack(values), caches))
            padding = mx.array([longest - n for n in lengths])
            self.valid.append(None if not any(longest - n for n in lengths)
                              else mx.arange(longest)[None] >= padding[:, None])

    @staticmethod
    def _left_pad(context, contexts, length):
        if context is None:
            template = next(c for c in contexts if c is not None)
            shape = (1, template[0].shape[1], length)
            return (mx.zeros(shape + template[0].shape[3:], template[0].dtype),
                    mx.zeros(shape + template[1].shape[3:], template[1].dtype))
        pad = length - context[0].shape[2]
        if pad == 0:
            return context
        width = [(0, 0), (0, 0), (pad, 0), (0, 0)]
        return mx.pad(context[0], width), mx.pad(context[1], width)

    def __len__(self):
        return len(self.row_caches)

    def take(self, rows) -> "BatchedCache":
        """The context of batch ``rows`` (positions in this batch) only; no re-padding."""
        taken = object.__new__(BatchedCache)
        index = mx.array(rows)
        taken.row_caches = [self.row_caches[r] for r in rows]
        taken.offsets = self.offsets[index]
        taken.layers = [
            _BatchedLayer(None if layer.keys is None else layer.keys[index],
                          None if layer.values is None else layer.values[index],
                          [layer.row_caches[r] for r in rows])
            for layer in self.layers
        ]
        taken.valid = [None if v is None else v[index] for v in self.valid]
        return taken

    def padding_mask(self, layer: int, new_positions: int):
        """[B, 1, 1, context + new] keep-mask, or None when no row is padded."""
        valid = self.valid[layer]
        if valid is None:
            return None
        new = mx.ones((valid.shape[0], new_positions), dtype=mx.bool_)
        return mx.concatenate([valid, new], axis=1)[:, None, None, :]
