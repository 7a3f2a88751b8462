"""DiffusionGemma's fine-tuning objective.

One training step of a batch (see ``batches``):

1. The encoder runs causally over each row's context and answer, clean. Its
   keys and values are the context every canvas reads; its outputs give the
   autoregressive loss.
2. Every answer canvas is corrupted: each example draws a noise level
   t ~ U(0.001, 1), and each canvas position is replaced, independently with
   probability t, by a token drawn uniformly from the whole vocabulary (there
   is no mask token). Pad positions after the answer are corrupted too, as the
   sampler's canvases are, but never scored.
3. With probability ``self_conditioning_p`` per example the decoder pass that
   is scored is self-conditioned: a first pass over the same corrupted canvas,
   without gradient, gives logits; they are divided by
   ``self_conditioning_temperature`` (the sampler divides by its step's
   temperature) and turned into the self-conditioning input by
   ``Model.soft_embeddings``, the same function the sampler feeds. Examples
   that are not self-conditioned get no self-conditioning input at all, as the
   first step of a block has none.
4. The loss is the decoder's cross-entropy averaged over every supervised
   canvas position of the batch (corrupted or not, no 1/t weight), plus
   ``encoder_loss_weight`` times the encoder's next-token cross-entropy
   averaged over every answer token of the batch. Both are means per token
   over the whole batch, so a long answer counts for more than a short one.

Canvas ``b`` of an answer attends to the context plus the answer's first ``b``
canvases, as generation commits them: full-attention layers to all of it,
sliding layers to its last ``sliding_window - 1`` positions, and every layer
to the whole canvas. Gradients flow from the decoder loss into the encoder
through those keys and values.

Every random draw is in ``Draws``, so a test can inject them.
"""

from dataclasses import dataclass
from typing import Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.base import create_causal_mask

from .batches import Batch

# The reference recipe's lower bound on the noise level: t = 0 would score a clean canvas.
MIN_NOISE = 0.001


@dataclass(frozen=True)
class Draws:
    """The random draws of one step."""

    noise_level: mx.array  # [B] t per example
    replace: mx.array  # [N, L] bool: positions that become noise
    noise: mx.array  # [N, L] the uniformly random tokens they become
    self_condition: mx.array  # [B] bool: examples whose scored pass is self-conditioned


def draw(batch: Batch, vocab_size: int, self_conditioning_p: float, key: Optional[mx.array] = None) -> Draws:
    """Draws for ``batch`` from ``key`` (MLX's global generator when None)."""
    keys = mx.random.split(key, 4) if key is not None else [None] * 4
    B = batch.tokens.shape[0]
    shape = batch.canvas_targets.shape
    t = mx.random.uniform(MIN_NOISE, 1.0, (B,), key=keys[0])
    replace = mx.random.uniform(shape=shape, key=keys[1]) < t[batch.canvas_rows][:, None]
    noise = mx.random.randint(0, vocab_size, shape, key=keys[2]).astype(batch.canvas_targets.dtype)
    self_condition = mx.random.uniform(shape=(B,), key=keys[3]) < self_conditioning_p
    return Draws(t, replace, noise, self_condition)


def corrupt(batch: Batch, draws: Draws) -> mx.array:
    """The decoder's input canvases [N, L]."""
    return mx.where(draws.replace, draws.noise, batch.canvas_targets)


@dataclass(frozen=True)
class Objective:
    """The objective's settings (see the module docstring)."""

    encoder_loss_weight: float = 1.0
    self_conditioning_p: float = 0.5
    self_conditioning_temperature: float = 1.0
    grad_checkpoint: bool = False

    def __call__(self, model, batch: Batch, draws: Draws) -> Tuple[mx.array, mx.array, mx.array, mx.array]:
        """(loss, supervised canvas tokens, decoder loss, encoder loss); the
        gradient is the first's. ``self_condition`` is read on the host."""
        hidden, kv = encode(model, batch.tokens, self.grad_checkpoint)
        canvas = corrupt(batch, draws)
        soft = None
        chosen = draws.self_condition[batch.canvas_rows]
        if chosen.any().item():
            soft = self.self_conditioning(model, canvas, kv, batch, chosen)
        logits = model.logits(denoise(model, canvas, kv, batch, soft, self.grad_checkpoint))
        decoder_loss = masked_mean(nn.losses.cross_entropy(logits, batch.canvas_targets), batch.canvas_mask)

        encoder_loss = mx.array(0.0)
        if self.encoder_loss_weight:
            index = mx.broadcast_to(batch.ar_positions[..., None], batch.ar_positions.shape + (hidden.shape[-1],))
            answer_logits = model.logits(mx.take_along_axis(hidden, index, axis=1))
            encoder_loss = masked_mean(nn.losses.cross_entropy(answer_logits, batch.ar_targets), batch.ar_mask)
        loss = decoder_loss + self.encoder_loss_weight * encoder_loss
        return loss, batch.supervised_tokens, decoder_loss, encoder_loss

    def self_conditioning(self, model, canvas, kv, batch: Batch, chosen: mx.array) -> mx.array:
        """The scored pass's self-conditioning input [N, L, hidden] (zero for
        canvases not ``chosen``): the first pass's processed logits, soft-embedded."""
        first = model.logits(denoise(model, canvas, kv, batch, None, self.grad_checkpoint))
        processed = mx.stop_gradient(first) / self.self_conditioning_temperature
        soft = model.soft_embeddings(processed) * chosen[:, None, None].astype(model.dtype)
        return detached(soft) if any(layer.experts.grouped for layer in model.layers) else soft


def detached(x: mx.array) -> mx.array:
    """``x``'s values as a new array with no graph behind it. Inside a gradient
    transformation MLX keeps the whole graph of an array evaluated early, as
    grouped experts do when they read the routing on the host; without this,
    the first pass's buffers would live until the backward pass. (Without
    grouped experts nothing is evaluated early, and MLX frees them as it goes.)"""
    return mx.array(np.array(x.astype(mx.float32))).astype(x.dtype)


def masked_mean(values: mx.array, mask: mx.array) -> mx.array:
    mask = mask.astype(mx.float32)
    return (values.astype(mx.float32) * mask).sum() / mx.maximum(mask.sum(), 1)


class _Kept:
    """What an encoder layer writes: its keys and values, kept for the decoder."""

    keys = values = None

    def update_and_fetch(self, keys, values):
        self.keys, self.values = keys, values
        return keys, values


class _Context:
    """What a decoder layer reads: the encoder's keys and values before its canvas."""

    def __init__(self, keys, values):
        self.keys, self.values = keys, values

    def cached_kv(self):
        return self.keys, self.values


def _encoder_layer(layer, x, mask, layer_scalar):
    kept = _Kept()
    x = layer(x, kept, 0, True, mask, layer_scalar)
    return x, kept.keys, kept.values


def _decoder_layer(layer, x, keys, values, offsets, mask):
    return layer(x, _Context(keys, values), offsets, False, mask, layer.layer_scalar)


def _call(layer, fn, checkpoint: bool, *arrays):
    """``fn(layer, *arrays)``; with ``checkpoint``, its activations are
    recomputed in the backward pass instead of kept. Not for a layer whose
    experts read their routing on the host: MLX keeps what it evaluates
    inside the gradient transformation, so checkpointing would only add the
    recomputation (measured: 1.4-1.7x the memory of not checkpointing)."""
    if not checkpoint or layer.experts.grouped:
        return fn(layer, *arrays)

    def inner(params, *arrays):
        layer.update(params)
        return fn(layer, *arrays)

    return mx.checkpoint(inner)(layer.trainable_parameters(), *arrays)


def encode(model, tokens: mx.array, checkpoint: bool = False):
    """The encoder's final-norm outputs [B, S, hidden] of ``tokens`` and each
    layer's keys and values [B, kv_heads, S, head_dim]."""
    decoder = model.model.decoder
    scalars = model.model.encoder.language_model.layers
    S = tokens.shape[1]
    masks = {None: create_causal_mask(S), model.args.sliding_window: create_causal_mask(S, window_size=model.args.sliding_window)}
    x = model._embed(tokens)
    kv = []
    for layer, scalar in zip(decoder.layers, scalars):
        window = layer.self_attn.window
        x, keys, values = _call(layer, _encoder_layer, checkpoint, x, masks[window], scalar.layer_scalar)
        kv.append((keys, values))
    return decoder.norm(x), kv


def context_mask(batch: Batch, positions: int, canvas_length: int, window: Optional[int]) -> mx.array:
    """[N, 1, 1, positions + L] keep-mask of each canvas over the encoder's
    positions and then its own: the positions before the canvas (the last
    ``window - 1`` of them on sliding layers) and the whole canvas."""
    position = mx.arange(positions)[None]
    start = batch.canvas_context[:, None]
    before = position < start
    if window is not None:
        before = before & (position >= start - (window - 1))
    canvas = mx.ones((before.shape[0], canvas_length), dtype=mx.bool_)
    return mx.concatenate([before, canvas], axis=1)[:, None, None, :]


def denoise(model, canvas: mx.array, kv, batch: Batch, soft_embeddings: Optional[mx.array],
            checkpoint: bool = False) -> mx.array:
    """The decoder's final-norm outputs [N, L, hidden] for the corrupted
    ``canvas``, each canvas after its own context (``kv``: ``encode``'s keys and values)."""
    decoder = model.model.decoder
    N, L = canvas.shape
    rows = batch.canvas_rows
    same_rows = N == batch.tokens.shape[0]  # one canvas per row, in order
    positions = batch.tokens.shape[1]
    masks = {}
    x = model.decoder_inputs(canvas, soft_embeddings)
    for layer, (keys, values) in zip(decoder.layers, kv):
        window = layer.self_attn.window
        if window not in masks:
            masks[window] = context_mask(batch, positions, L, window)
        if not same_rows:
            keys, values = keys[rows], values[rows]
        x = _call(layer, _decoder_layer, checkpoint, x, keys, values, batch.canvas_context, masks[window])
    return decoder.norm(x)
