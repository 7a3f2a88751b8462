"""Random-weight models for benchmarks: real shapes, both layer kinds, both model families."""

import mlx.core as mx
import pytest

from mlx_diffgemma.bench.synthetic import build_diffusion_model, build_gemma4_model, synthetic_args
from mlx_diffgemma.model import ModelArgs, default_layer_types


def test_layer_pattern_keeps_both_kinds():
    assert default_layer_types(2) == ["sliding_attention", "full_attention"]
    assert default_layer_types(30).count("full_attention") == 5
    assert [i for i, t in enumerate(default_layer_types(30)) if t == "full_attention"] == [5, 11, 17, 23, 29]
    assert ModelArgs().layer_types == default_layer_types(30)
    assert synthetic_args("26b-a4b", layers=3).layer_types == default_layer_types(3)
    with pytest.raises(ValueError, match="unknown shape"):
        synthetic_args("huge")


def test_real_shape_scaled_to_fewer_layers():
    args = synthetic_args("26b-a4b", layers=3)
    assert (args.hidden_size, args.num_experts, args.top_k_experts, args.moe_intermediate_size,
            args.vocab_size) == (2816, 128, 8, 704, 262144)
    assert args.num_hidden_layers == 3 and args.layer_types[-1] == "full_attention"


def test_tiny_models_run_quantized():
    args = synthetic_args("tiny")
    four_bit = lambda path, module: hasattr(module, "to_quantized") and {"group_size": 32, "bits": 4}
    diffusion = build_diffusion_model(args, mx.float32, quant_predicate=four_bit)
    assert diffusion.layers[0].experts.gate_up_proj.bits == 4
    cache = diffusion.make_cache()
    diffusion.encode(mx.zeros((1, 5), dtype=mx.int32), cache)
    assert diffusion.denoise(mx.zeros((1, args.canvas_length), dtype=mx.int32), cache).shape == (
        1, args.canvas_length, args.vocab_size)
    ar = build_gemma4_model(args, mx.float32)
    assert ar(mx.zeros((1, 5), dtype=mx.int32)).shape == (1, 5, args.vocab_size)
