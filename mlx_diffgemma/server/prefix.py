"""A bounded LRU of encoder KV caches, keyed by the tokens each one holds.

Chat clients resend the whole conversation every turn. A request whose
prompt starts with a stored entry's tokens starts from a copy of that cache
and encodes only the rest. An entry is only ever extended, never cut: a
sliding-window layer keeps just the last ``window - 1`` positions, so a cache
cannot be taken back to an earlier length, but it can always go on from its
own. Entries are compact copies, so the live caches never write into them.
"""

from collections import OrderedDict
from typing import List, Optional

import mlx.core as mx
import numpy as np

from ..cache import FullAttentionCache, SlidingWindowCache

DEFAULT_MAX_ENTRIES = 16


def _copy_layer(layer, copy) -> object:
    """A new layer cache holding ``copy`` of ``layer``'s kept positions."""
    if isinstance(layer, SlidingWindowCache):
        out = SlidingWindowCache(layer.max_size)
    elif isinstance(layer, FullAttentionCache):
        out = FullAttentionCache()
    else:
        raise TypeError(f"cannot keep a {type(layer).__name__} in the prefix cache")
    out.offset = layer.offset
    context = layer.cached_kv()
    if context is not None:
        out.keys, out.values = (copy(a) for a in context)
    return out


def _nbytes(cache: list) -> int:
    return sum(c.keys.nbytes + c.values.nbytes for c in cache if c.keys is not None)


class PrefixCache:
    """At most ``capacity`` bytes and ``max_entries`` entries, least recently used out first."""

    def __init__(self, capacity: int, max_entries: int = DEFAULT_MAX_ENTRIES):
        self.capacity = capacity
        self.max_entries = max_entries
        self.entries: "OrderedDict[bytes, tuple]" = OrderedDict()  # key -> (tokens, cache, bytes)
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def lookup(self, prompt: np.ndarray) -> Optional[list]:
        """A cache to extend for ``prompt``: a copy of the longest entry whose
        tokens begin it, or None."""
        best = None
        for key, (tokens, _, _) in self.entries.items():
            if len(tokens) <= len(prompt) and (best is None or len(tokens) > len(self.entries[best][0])) \
                    and np.array_equal(prompt[: len(tokens)], tokens):
                best = key
        if best is None:
            self.misses += 1
            return None
        self.hits += 1
        self.entries.move_to_end(best)
        # Fresh layer objects over the stored arrays: growing a cache concatenates, never writes into them.
        return [_copy_layer(layer, lambda a: a) for layer in self.entries[best][1]]

    def store(self, tokens: np.ndarray, cache: List) -> None:
        """Keep a compact copy of ``cache``, which holds exactly ``tokens``."""
        key = np.asarray(tokens, dtype=np.int32).tobytes()
        if key in self.entries:
            self.entries.move_to_end(key)
            return
        # An entry this one extends was a turn of the same conversation: this one replaces it.
        for old, (held, _, _) in list(self.entries.items()):
            if len(held) < len(tokens) and np.array_equal(tokens[: len(held)], held):
                self._drop(old)
        kept = [_copy_layer(layer, mx.contiguous) for layer in cache]
        mx.eval([(c.keys, c.values) for c in kept if c.keys is not None])
        size = _nbytes(kept)
        if size > self.capacity:
            return
        while self.entries and (self.bytes + size > self.capacity or len(self.entries) >= self.max_entries):
            self.evict_one()
        self.entries[key] = (np.array(tokens, dtype=np.int32), kept, size)
        self.bytes += size

    def evict_one(self) -> None:
        """Drop the least recently used entry."""
        self._drop(next(iter(self.entries)))

    def _drop(self, key: bytes) -> None:
        self.bytes -= self.entries.pop(key)[2]

    def stats(self) -> dict:
        return {"entries": len(self.entries), "bytes": self.bytes, "capacity": self.capacity,
                "hits": self.hits, "misses": self.misses}
