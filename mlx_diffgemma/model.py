"""DiffusionGemma text model in MLX.

One text stack runs in two modes. ``encode`` is a causal pass that appends
the keys and values of the prompt (or of a committed block) to the cache.
``denoise`` is a bidirectional pass over a canvas that reads the cache and
never writes it. Both modes share every weight except the per-layer
``layer_scalar``: the checkpoint stores one set for the encoder and one for
the decoder.

The Gemma 4 pieces that are the same here (router, RoPE variants, expert
matmuls, GeGLU) come from mlx-lm.
"""

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.gemma4_text import RMSNormNoScale, Router, geglu, logit_softcap
from mlx_lm.models.rope_utils import initialize_rope
from mlx_lm.models.switch_layers import SwitchLinear, _gather_sort, _scatter_unsort

from .cache import BatchedCache, FullAttentionCache, SlidingWindowCache

MODEL_TYPE = "diffusion_gemma"

# Top-level checkpoint prefixes that belong to the vision tower; this port is text only.
VISION_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")

SLIDING, FULL = "sliding_attention", "full_attention"


def default_layer_types(layers: int) -> List[str]:
    """Five sliding layers to one full layer, the last layer always full."""
    types = [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(layers)]
    if types:
        types[-1] = FULL
    return types


@dataclass(frozen=True)
class AttentionShape:
    """One layer's attention geometry, the one place model, cache, memory
    planner and roofline read it from (``ModelArgs.attention``)."""

    sliding: bool
    heads: int
    kv_heads: int
    head_dim: int
    window: Optional[int]  # keys a causal query sees, itself included; None: every earlier one

    @property
    def has_values(self) -> bool:
        """Full layers have no value projection: their values are the normed raw keys."""
        return self.sliding

    @property
    def q_dims(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dims(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def kept(self) -> Optional[int]:
        """Positions the layer's cache keeps (None: all). A sliding layer keeps
        ``window - 1``: all the next causal query sees besides itself, and what
        the reference decoder attends to besides the canvas."""
        return None if self.window is None else self.window - 1

    def kept_positions(self, tokens: int) -> int:
        """Cached positions after ``tokens`` were encoded."""
        return tokens if self.kept is None else min(tokens, self.kept)

    def kv_bytes_per_position(self, dtype_bytes: int) -> int:
        return 2 * self.kv_dims * dtype_bytes


@dataclass
class ModelArgs:
    model_type: str = MODEL_TYPE
    vocab_size: int = 262144
    hidden_size: int = 2816
    intermediate_size: int = 2112
    moe_intermediate_size: int = 704
    num_hidden_layers: int = 30
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 256
    global_head_dim: int = 512
    num_global_key_value_heads: Optional[int] = 2
    num_experts: int = 128
    top_k_experts: int = 8
    sliding_window: int = 1024
    layer_types: Optional[List[str]] = None
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: float = 30.0
    max_position_embeddings: int = 262144
    rope_parameters: Dict[str, Dict[str, Any]] = field(
        default_factory=lambda: {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {
                "rope_type": "proportional",
                "partial_rotary_factor": 0.25,
                "rope_theta": 1000000.0,
            },
        }
    )
    canvas_length: int = 256
    tie_word_embeddings: bool = True

    def __post_init__(self):
        if self.layer_types is None:
            self.layer_types = default_layer_types(self.num_hidden_layers)
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries for "
                f"{self.num_hidden_layers} layers"
            )

    @classmethod
    def from_dict(cls, config: Dict[str, Any]) -> "ModelArgs":
        """Build from a checkpoint's ``config.json`` (text settings nested under
        ``text_config``, as Hugging Face and mlx-vlm both write them)."""
        text = dict(config.get("text_config", config))
        full_layer = _full_layer_overrides(text)
        if "global_head_dim" not in text and "head_dim" in full_layer:
            text["global_head_dim"] = full_layer["head_dim"]
        if text.get("num_global_key_value_heads") is None:
            text["num_global_key_value_heads"] = full_layer.get("num_key_value_heads")
        if text.get("use_bidirectional_attention") == "all":
            text["sliding_window"] = text["sliding_window"] // 2 + 1
        names = cls.__dataclass_fields__.keys()
        args = {k: v for k, v in text.items() if k in names and v is not None}
        if "canvas_length" in config:
            args["canvas_length"] = config["canvas_length"]
        args["model_type"] = config.get("model_type", MODEL_TYPE)
        return cls(**args)

    def attention(self, layer_type: str) -> AttentionShape:
        """The attention geometry of a layer of ``layer_type``."""
        if layer_type == SLIDING:
            return AttentionShape(True, self.num_attention_heads, self.num_key_value_heads, self.head_dim,
                                  self.sliding_window)
        return AttentionShape(False, self.num_attention_heads,
                              self.num_global_key_value_heads or self.num_key_value_heads, self.global_head_dim, None)

    def attention_layers(self) -> List[AttentionShape]:
        """Each layer's attention geometry, in order."""
        return [self.attention(t) for t in self.layer_types]


def _full_layer_overrides(text: Dict[str, Any]) -> Dict[str, Any]:
    """The per-layer settings ``save_pretrained`` writes for full layers."""
    per_layer = text.get("per_layer_config") or {}
    types = text.get("layer_types") or []
    for key, values in per_layer.items():
        index = int(key) if str(key).isdigit() else None
        if key == FULL or (index is not None and index < len(types) and types[index] == FULL):
            return values
    return {}


class GeGLUMLP(nn.Module):
    def __init__(self, dims: int, hidden_dims: int):
        super().__init__()
        self.gate_proj = nn.Linear(dims, hidden_dims, bias=False)
        self.up_proj = nn.Linear(dims, hidden_dims, bias=False)
        self.down_proj = nn.Linear(hidden_dims, dims, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(geglu(self.gate_proj(x), self.up_proj(x)))


# Experts at least this large (elements of one expert's fused gate and up
# projection) run grouped on the CPU: reading such an expert once per routed row
# costs more than the host synchronisation grouping needs (4M for 26B-A4B; at
# 32K the synchronisation and per-expert calls cost more than they save).
GROUPED_EXPERT_SIZE = 1 << 20


def grouped_experts(hidden_size: int, gate_up_size: int) -> bool:
    """Whether float experts of this shape run grouped on the current device
    (``Experts._grouped``): on MLX's CPU backend, when they are large."""
    return mx.default_device().type == mx.cpu and hidden_size * gate_up_size >= GROUPED_EXPERT_SIZE


class Experts(nn.Module):
    """The routed experts, with gate and up projections fused in one tensor
    (rows ``[:width]`` gate, ``[width:]`` up) as the checkpoints store them."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        width = args.moe_intermediate_size
        self.gate_up_proj = SwitchLinear(args.hidden_size, 2 * width, args.num_experts, bias=False)
        self.down_proj = SwitchLinear(width, args.hidden_size, args.num_experts, bias=False)

    def __call__(self, x: mx.array, indices: mx.array, weights: mx.array) -> mx.array:
        dtype = x.dtype
        dense = isinstance(self.gate_up_proj, SwitchLinear) or isinstance(self.down_proj, SwitchLinear)
        on_cpu = mx.default_device().type == mx.cpu
        if dense and dtype != mx.float32 and on_cpu:
            # The CPU backend's GatherMM is float32 only; the loader has stored
            # these weights as float32 there, so only the activations convert.
            x = x.astype(mx.float32)
        if self.grouped and indices.size >= 64:
            y = self._grouped(x, indices)
            if y is not None:
                return (y * mx.expand_dims(weights, -1).astype(y.dtype)).sum(axis=-2).astype(dtype)
        x = mx.expand_dims(x, (-2, -3))
        # Many (token, expert) pairs: group them by expert for contiguous weight reads.
        do_sort = indices.size >= 64
        idx, inv_order = indices, None
        if do_sort:
            x, idx, inv_order = _gather_sort(x, indices)
        gate, up = mx.split(self.gate_up_proj(x, idx, sorted_indices=do_sort), 2, axis=-1)
        y = self.down_proj(geglu(gate, up), idx, sorted_indices=do_sort)
        if do_sort:
            y = _scatter_unsort(y, inv_order, indices.shape)
        y = y.squeeze(-2)
        return (y * mx.expand_dims(weights, -1).astype(y.dtype)).sum(axis=-2).astype(dtype)

    @property
    def grouped(self) -> bool:
        """Whether these experts run grouped (``_grouped``), reading the routing on the host."""
        return (isinstance(self.gate_up_proj, SwitchLinear) and isinstance(self.down_proj, SwitchLinear)
                and grouped_experts(self.gate_up_proj.input_dims, self.gate_up_proj.output_dims))

    def _grouped(self, x: mx.array, indices: mx.array) -> Optional[mx.array]:
        """The experts' outputs [..., top_k, hidden] as one matrix product per expert
        over the rows routed to it, or None inside a function transformation
        (``mx.compile``), where the routing cannot be read.

        The CPU backend's GatherMM multiplies each (row, expert) pair on its own,
        reading the expert's weights once per pair; grouping reads them once per
        expert, about twice as fast for a 256-token canvas. It needs the routing
        on the host: one synchronisation per layer, which costs little on a CPU.
        """
        try:
            flat = np.array(indices).reshape(-1)
        except ValueError:
            return None
        top_k, dims = indices.shape[-1], x.shape[-1]
        order = np.argsort(flat, kind="stable")
        counts = np.bincount(flat, minlength=self.gate_up_proj.weight.shape[0])
        rows = x.reshape(-1, dims)[mx.array(order // top_k, dtype=mx.uint32)]
        gate_up, down = self.gate_up_proj.weight, self.down_proj.weight
        parts, start = [], 0
        for expert in np.flatnonzero(counts).tolist():
            group = rows[start : start + counts[expert]]
            start += counts[expert]
            # A slice is a view; ``weight[expert]`` would gather a copy of the
            # expert, which autograd keeps until the backward pass.
            gate, up = mx.split(group @ gate_up[expert : expert + 1].squeeze(0).T, 2, axis=-1)
            parts.append(geglu(gate, up) @ down[expert : expert + 1].squeeze(0).T)
        y = mx.concatenate(parts)[mx.array(np.argsort(order), dtype=mx.uint32)]
        return y.reshape(*indices.shape, -1)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_type: str):
        super().__init__()
        shape = args.attention(layer_type)
        self.has_values, self.window = shape.has_values, shape.window
        self.head_dim, self.n_heads, self.n_kv_heads = shape.head_dim, shape.heads, shape.kv_heads
        dims = args.hidden_size

        self.q_proj = nn.Linear(dims, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dims, self.n_kv_heads * self.head_dim, bias=False)
        if self.has_values:
            self.v_proj = nn.Linear(dims, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, dims, bias=False)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=args.rms_norm_eps)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=args.rms_norm_eps)
        self.v_norm = RMSNormNoScale(self.head_dim, eps=args.rms_norm_eps)

        rope_config = args.rope_parameters[layer_type]
        self.rope = initialize_rope(
            dims=self.head_dim,
            base=rope_config["rope_theta"],
            traditional=False,
            scaling_config=rope_config,
            max_position_embeddings=args.max_position_embeddings,
        )

    def _heads(self, x: mx.array, n: int) -> mx.array:
        B, L, _ = x.shape
        return x.reshape(B, L, n, self.head_dim)

    def __call__(self, x: mx.array, cache, offset: int, writes_cache: bool, mask) -> mx.array:
        B, L, _ = x.shape
        queries = self.rope(self.q_norm(self._heads(self.q_proj(x), self.n_heads)).swapaxes(1, 2), offset=offset)
        raw_keys = self._heads(self.k_proj(x), self.n_kv_heads)
        raw_values = self._heads(self.v_proj(x), self.n_kv_heads) if self.has_values else raw_keys
        keys = self.rope(self.k_norm(raw_keys).swapaxes(1, 2), offset=offset)
        values = self.v_norm(raw_values).swapaxes(1, 2)

        if writes_cache:
            keys, values = cache.update_and_fetch(keys, values)
        elif (cached := cache.cached_kv()) is not None:
            keys = mx.concatenate([cached[0], keys], axis=2)
            values = mx.concatenate([cached[1], values], axis=2)

        out = mx.fast.scaled_dot_product_attention(queries, keys, values, scale=1.0, mask=mask)
        return self.o_proj(out.swapaxes(1, 2).reshape(B, L, -1))


class TransformerLayer(nn.Module):
    """Attention, then a dense GeGLU MLP and the MoE side by side."""

    def __init__(self, args: ModelArgs, layer_type: str):
        super().__init__()
        self.layer_type = layer_type
        dims, eps = args.hidden_size, args.rms_norm_eps
        self.self_attn = Attention(args, layer_type)
        self.mlp = GeGLUMLP(dims, args.intermediate_size)
        self.router = Router(args)
        self.experts = Experts(args)
        self.input_layernorm = nn.RMSNorm(dims, eps=eps)
        self.post_attention_layernorm = nn.RMSNorm(dims, eps=eps)
        self.pre_feedforward_layernorm = nn.RMSNorm(dims, eps=eps)
        self.post_feedforward_layernorm = nn.RMSNorm(dims, eps=eps)
        self.post_feedforward_layernorm_1 = nn.RMSNorm(dims, eps=eps)
        self.pre_feedforward_layernorm_2 = nn.RMSNorm(dims, eps=eps)
        self.post_feedforward_layernorm_2 = nn.RMSNorm(dims, eps=eps)
        # The decoder's scalar; the encoder's lives in EncoderLayerScalar.
        self.layer_scalar = mx.ones((1,))

    def __call__(self, x, cache, offset, writes_cache, mask, layer_scalar) -> mx.array:
        h = self.self_attn(self.input_layernorm(x), cache, offset, writes_cache, mask)
        x = x + self.post_attention_layernorm(h)

        dense = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(x)))
        # The router reads the residual stream itself, not a normed copy.
        indices, weights = self.router(x)
        routed = self.experts(self.pre_feedforward_layernorm_2(x), indices, weights)
        routed = self.post_feedforward_layernorm_2(routed)
        x = x + self.post_feedforward_layernorm(dense + routed)
        return x * layer_scalar.astype(x.dtype)


class SelfConditioning(nn.Module):
    """Feeds the previous step's distribution back into the canvas embedding."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.pre_norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def __call__(self, soft_embeddings: mx.array) -> mx.array:
        h = self.pre_norm(soft_embeddings)
        return self.down_proj(geglu(self.gate_proj(h), self.up_proj(h)))


class TextStack(nn.Module):
    """The decoder's modules, which hold every text weight."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [TransformerLayer(args, t) for t in args.layer_types]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.self_conditioning = SelfConditioning(args)


class EncoderLayerScalar(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer_scalar = mx.ones((1,))


class EncoderScalars(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.layers = [EncoderLayerScalar() for _ in range(args.num_hidden_layers)]


class Encoder(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.language_model = EncoderScalars(args)


class DiffusionGemmaModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.decoder = TextStack(args)
        self.encoder = Encoder(args)


def _embedding_dtype(embedding: nn.Module) -> mx.Dtype:
    return embedding.scales.dtype if hasattr(embedding, "scales") else embedding.weight.dtype


def _probabilities_times_embeddings(embedding: nn.Module, probs: mx.array) -> mx.array:
    """``probs @ E`` for a plain or quantized embedding table ``E`` [vocab, dims]."""
    if hasattr(embedding, "scales"):
        return mx.quantized_matmul(
            probs,
            embedding.weight,
            embedding.scales,
            embedding.get("biases"),
            transpose=False,
            group_size=embedding.group_size,
            bits=embedding.bits,
            mode=embedding.mode,
        )
    return probs @ embedding.weight


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = DiffusionGemmaModel(args)

    @property
    def layers(self):
        return self.model.decoder.layers

    @property
    def dtype(self) -> mx.Dtype:
        """The activations' dtype (the embedding's)."""
        return _embedding_dtype(self.model.decoder.embed_tokens)

    def make_cache(self) -> list:
        return [FullAttentionCache() if shape.kept is None else SlidingWindowCache(shape.kept)
                for shape in self.args.attention_layers()]

    def _embed(self, ids: mx.array) -> mx.array:
        embedding = self.model.decoder.embed_tokens
        scale = mx.array(math.sqrt(self.args.hidden_size), dtype=_embedding_dtype(embedding))
        return embedding(ids) * scale

    def encode(self, ids: mx.array, cache, chunk_size: int = 2048) -> None:
        """Causally encode ``ids`` [B, S] and append them to ``cache``.

        ``cache`` is a list of layer caches, or a ``BatchedCache`` whose rows
        each receive their own row of ``ids`` (the context is stale afterwards).
        Long inputs to a plain cache are encoded ``chunk_size`` tokens at a time
        so that the attention scores of a long prompt never exist all at once.
        """
        if isinstance(cache, BatchedCache):
            self._encode_chunk(ids, cache.layers, cache.offsets, cache)
            mx.eval([(c.keys, c.values) for row in cache.row_caches for c in row])
            return
        for start in range(0, ids.shape[1], chunk_size):
            self._encode_chunk(ids[:, start : start + chunk_size], cache, cache[0].offset)
            mx.eval([(c.keys, c.values) for c in cache])

    def _encode_chunk(self, ids: mx.array, layer_caches, offset, batched: BatchedCache = None) -> None:
        decoder = self.model.decoder
        scalars = self.model.encoder.language_model.layers
        x = self._embed(ids)
        S = ids.shape[1]
        masks = {}
        for i, (layer, c, scalar) in enumerate(zip(decoder.layers, layer_caches, scalars)):
            cached = c.cached_kv()
            kept = 0 if cached is None else cached[0].shape[2]
            window = layer.self_attn.window
            key = (window, kept)
            if key not in masks:
                masks[key] = create_causal_mask(S, kept, window_size=window)
                padding = batched.padding_mask(i, S) if batched is not None else None
                if padding is not None:
                    masks[key] = masks[key][None, None] & padding
            # Only the cache is evaluated, so MLX never computes the last layer's
            # feed-forward, which nothing reads while encoding.
            x = layer(x, c, offset, True, masks[key], scalar.layer_scalar)

    def denoise(self, canvas: mx.array, cache: list, self_conditioning_logits: Optional[mx.array] = None) -> mx.array:
        """Logits [B, L, vocab] (float32, softcapped) for ``canvas`` [B, L].

        ``self_conditioning_logits`` are the previous step's processed
        (temperature-divided) logits; ``None`` on the first step of a block.
        The engine runs the three parts separately, so that it never needs
        every row's logits at once.
        """
        soft = None if self_conditioning_logits is None else self.soft_embeddings(self_conditioning_logits)
        return self.logits(self.hidden_states(canvas, cache, soft))

    def soft_embeddings(self, processed_logits: mx.array) -> mx.array:
        """The self-conditioning input [B, L, hidden] of the next step: the
        token embeddings weighted by softmax(``processed_logits``), scaled as
        the embedding is."""
        embedding = self.model.decoder.embed_tokens
        dtype = self.dtype
        probs = mx.softmax(processed_logits.astype(dtype).astype(mx.float32), axis=-1)
        soft = _probabilities_times_embeddings(embedding, probs.astype(dtype))
        return soft * mx.array(math.sqrt(self.args.hidden_size), dtype=dtype)

    def top_k_soft_embeddings(self, ids: mx.array, weights: mx.array) -> mx.array:
        """The fast path's self-conditioning input [B, L, hidden]: the embedding
        rows of each position's ``ids`` [B, L, K] weighted by ``weights`` [B, L, K]
        (their probabilities renormalised over the K, as ``sampler.one_pass``
        gives them), scaled as the embedding is. K rows a position instead of the
        whole vocabulary: with K = vocab this is ``soft_embeddings``."""
        dtype = self.dtype
        rows = self.model.decoder.embed_tokens(ids)  # [B, L, K, hidden]; a quantized table dequantizes the rows
        soft = (weights.astype(dtype)[..., None, :] @ rows.astype(dtype)).squeeze(-2)
        return soft * mx.array(math.sqrt(self.args.hidden_size), dtype=dtype)

    def decoder_inputs(self, canvas: mx.array, soft_embeddings: Optional[mx.array] = None) -> mx.array:
        """The first decoder layer's input [B, L, hidden]: the canvas embedding
        plus the self-conditioning branch, RMS-normalised without a scale."""
        x = self._embed(canvas)
        if soft_embeddings is not None:
            x = x + self.model.decoder.self_conditioning(soft_embeddings)
        return mx.fast.rms_norm(x, None, self.args.rms_norm_eps)

    def hidden_states(self, canvas: mx.array, cache, soft_embeddings: Optional[mx.array] = None) -> mx.array:
        """The decoder's final-norm output [B, L, hidden] for ``canvas`` [B, L]
        after the cache (a list of layer caches or a ``BatchedCache``)."""
        decoder = self.model.decoder
        x = self.decoder_inputs(canvas, soft_embeddings)
        L = canvas.shape[1]
        if isinstance(cache, BatchedCache):
            layer_caches, offset = cache.layers, cache.offsets
            masks = [cache.padding_mask(i, L) for i in range(len(cache.layers))]
        else:
            layer_caches, offset, masks = cache, cache[0].offset, [None] * len(cache)
        for layer, c, mask in zip(decoder.layers, layer_caches, masks):
            x = layer(x, c, offset, False, mask, layer.layer_scalar)
        return decoder.norm(x)

    def logits(self, hidden_states: mx.array) -> mx.array:
        """Float32 softcapped logits [..., vocab] of decoder hidden states."""
        logits = self.model.decoder.embed_tokens.as_linear(hidden_states).astype(mx.float32)
        return logit_softcap(self.args.final_logit_softcapping, logits)

    def host_logits(self, hidden_states: mx.array) -> np.ndarray:
        """``logits`` as a NumPy array, for inference on the CPU backend: the
        projection by MLX (the BLAS), the softcap by NumPy, whose tanh is
        vectorised where MLX's CPU tanh is not (1.7 s against 0.09 s over
        256 x 262,144 logits on a Xeon). Evaluates; no gradient flows through it."""
        logits = self.model.decoder.embed_tokens.as_linear(hidden_states).astype(mx.float32)
        mx.eval(logits)
        raw = np.asarray(logits)  # MLX's buffer, not a copy
        cap = self.args.final_logit_softcapping
        if not cap:
            return raw
        # In place on that fresh buffer: a new one per call (256 MiB for a real canvas) is faulted in each time.
        out = raw if raw.flags.writeable else np.empty_like(raw)
        np.divide(raw, np.float32(cap), out=out)
        np.tanh(out, out=out)
        out *= np.float32(cap)
        return out

    def sanitize(self, weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
        """Map Hugging Face or mlx-community checkpoint keys onto this module tree."""
        out = {}
        for key, value in weights.items():
            if key.startswith(VISION_PREFIXES) or key == "lm_head.weight" or "rotary_emb" in key:
                continue
            if key.startswith("model.encoder.language_model.") and not key.endswith("layer_scalar"):
                continue  # tied to the decoder's copy
            if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
                key += ".weight"
            out[key] = value
        return out
