"""Random-weight models in real per-layer shapes, for benchmarks without downloads.

The costs that matter (a layer's matmuls, the vocabulary projection, the KV
cache) depend on shapes, not values, so a few layers of the real shape show
what each layer of the real model costs. ``--layers`` keeps the 26B-A4B shape
within this machine's memory; reports say what was scaled.
"""

from dataclasses import replace
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import gemma4_text

from mlx_diffgemma.model import Model, ModelArgs, default_layer_types

SHAPES = {
    "tiny": ModelArgs(vocab_size=512, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      global_head_dim=32, num_global_key_value_heads=1, num_experts=8, top_k_experts=2,
                      sliding_window=64, canvas_length=32),
    "small": ModelArgs(vocab_size=32768, hidden_size=1024, intermediate_size=768, moe_intermediate_size=256,
                       num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=128,
                       global_head_dim=256, num_global_key_value_heads=1, num_experts=32, top_k_experts=4,
                       sliding_window=512, canvas_length=256),
    "26b-a4b": ModelArgs(),  # the real checkpoint's shape (ModelArgs defaults)
}


def synthetic_args(shape: str, layers: Optional[int] = None) -> ModelArgs:
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    args = SHAPES[shape]
    layers = layers or args.num_hidden_layers
    return replace(args, num_hidden_layers=layers, layer_types=default_layer_types(layers))


def _randomize(model: nn.Module, dtype: mx.Dtype, seed: int) -> None:
    """Small random weights (as a trained model's are), unit norms and scalars."""
    mx.random.seed(seed)
    params = []
    for name, value in nn.utils.tree_flatten(model.parameters()):
        if value.ndim == 1:
            params.append((name, mx.ones_like(value).astype(dtype)))
        else:
            params.append((name, (0.02 * mx.random.normal(value.shape)).astype(dtype)))
    model.load_weights(params)


def _with_random_weights(model: nn.Module, dtype: mx.Dtype, seed: int, quant_predicate: Optional[Callable]):
    _randomize(model, dtype, seed)
    if quant_predicate is not None:
        nn.quantize(model, class_predicate=quant_predicate)
    mx.eval(model.parameters())
    return model


def build_diffusion_model(args: ModelArgs, dtype: mx.Dtype = mx.bfloat16, seed: int = 0,
                          quant_predicate: Optional[Callable] = None) -> Model:
    """``quant_predicate(path, module)`` as ``nn.quantize`` takes it (e.g. a convert recipe's)."""
    return _with_random_weights(Model(args), dtype, seed, quant_predicate)


def gemma4_args(args: ModelArgs) -> gemma4_text.ModelArgs:
    """mlx-lm's Gemma 4 (the autoregressive model DiffusionGemma is built on) in the same shape."""
    return gemma4_text.ModelArgs(
        model_type="gemma4_text", hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
        intermediate_size=args.intermediate_size, num_attention_heads=args.num_attention_heads,
        head_dim=args.head_dim, global_head_dim=args.global_head_dim, rms_norm_eps=args.rms_norm_eps,
        vocab_size=args.vocab_size, vocab_size_per_layer_input=args.vocab_size,
        num_key_value_heads=args.num_key_value_heads,
        num_global_key_value_heads=args.num_global_key_value_heads, num_kv_shared_layers=0,
        hidden_size_per_layer_input=0, rope_parameters=args.rope_parameters, sliding_window=args.sliding_window,
        max_position_embeddings=args.max_position_embeddings, attention_k_eq_v=True,
        final_logit_softcapping=args.final_logit_softcapping, use_double_wide_mlp=False, enable_moe_block=True,
        num_experts=args.num_experts, top_k_experts=args.top_k_experts,
        moe_intermediate_size=args.moe_intermediate_size, layer_types=list(args.layer_types),
        tie_word_embeddings=True,
    )


def build_gemma4_model(args: ModelArgs, dtype: mx.Dtype = mx.bfloat16, seed: int = 0,
                       quant_predicate: Optional[Callable] = None) -> gemma4_text.Model:
    return _with_random_weights(gemma4_text.Model(gemma4_args(args)), dtype, seed, quant_predicate)
