"""Training examples laid out the way block diffusion generates them.

An example is a context (prompt, chat history) and an answer that ends with
an end-of-sequence token. The context goes through the causal encoder; the
answer fills canvases of ``canvas_length`` tokens, the last one padded after
the end-of-sequence token. Canvas ``b`` of an answer sees the context and the
answer's first ``b`` canvases, committed as generation commits them.
"""

from dataclasses import dataclass
from typing import Sequence

import mlx.core as mx
import numpy as np


@dataclass(frozen=True)
class Example:
    context: Sequence[int]  # at least one token
    answer: Sequence[int]  # ends with an end-of-sequence token

    def canvases(self, canvas_length: int) -> int:
        return -(-len(self.answer) // canvas_length)

    def length(self, canvas_length: int) -> int:
        """Positions the example occupies: its context and every canvas, padded."""
        return len(self.context) + self.canvases(canvas_length) * canvas_length


@dataclass(frozen=True)
class Batch:
    """A batch of examples as arrays: B rows, N canvases (all rows' answer
    canvases, row by row), S encoder positions, A the longest answer."""

    tokens: mx.array  # [B, S] context then answer, right-padded: the encoder's input
    canvas_targets: mx.array  # [N, L] the clean answer canvases, pad after the end of the answer
    canvas_mask: mx.array  # [N, L] bool: the supervised positions (answer tokens up to the EOS)
    canvas_rows: mx.array  # [N] the batch row of each canvas
    canvas_context: mx.array  # [N] tokens before each canvas: its context and the earlier canvases
    ar_positions: mx.array  # [B, A] encoder positions whose next token is an answer token
    ar_targets: mx.array  # [B, A] those answer tokens
    ar_mask: mx.array  # [B, A] bool: real (not padding) entries

    @property
    def supervised_tokens(self) -> mx.array:
        return self.canvas_mask.sum()


def collate(examples: Sequence[Example], canvas_length: int, pad_token_id: int) -> Batch:
    """The ``Batch`` of ``examples``."""
    L = canvas_length
    for e in examples:
        if not len(e.context) or not len(e.answer):
            raise ValueError("an example needs at least one context token and one answer token")
    S = max(len(e.context) + len(e.answer) for e in examples)
    A = max(len(e.answer) for e in examples)
    tokens = np.full((len(examples), S), pad_token_id, dtype=np.int32)
    ar_positions = np.zeros((len(examples), A), dtype=np.int32)
    ar_targets = np.full((len(examples), A), pad_token_id, dtype=np.int32)
    ar_mask = np.zeros((len(examples), A), dtype=bool)
    targets, mask, rows, context = [], [], [], []
    for row, e in enumerate(examples):
        P, n = len(e.context), len(e.answer)
        tokens[row, :P] = e.context
        tokens[row, P : P + n] = e.answer
        # The encoder at position i predicts token i + 1.
        ar_positions[row, :n] = np.arange(P - 1, P + n - 1)
        ar_targets[row, :n] = e.answer
        ar_mask[row, :n] = True
        padded = np.full(e.canvases(L) * L, pad_token_id, dtype=np.int32)
        padded[:n] = e.answer
        supervised = np.arange(len(padded)) < n
        for b in range(e.canvases(L)):
            targets.append(padded[b * L : (b + 1) * L])
            mask.append(supervised[b * L : (b + 1) * L])
            rows.append(row)
            context.append(P + b * L)
    return Batch(
        tokens=mx.array(tokens),
        canvas_targets=mx.array(np.stack(targets)),
        canvas_mask=mx.array(np.stack(mask)),
        canvas_rows=mx.array(np.array(rows, dtype=np.int32)),
        canvas_context=mx.array(np.array(context, dtype=np.int32)),
        ar_positions=mx.array(ar_positions),
        ar_targets=mx.array(ar_targets),
        ar_mask=mx.array(ar_mask),
    )
