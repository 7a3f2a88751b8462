"""Roofline arithmetic for the real 26B-A4B shape, against values worked out by hand."""

import pytest

from mlx_diffgemma.bench.roofline import (ParameterCounts, ar_token, commit, crossover_steps, denoise_step,
                                          expected_distinct_experts, roofline)
from mlx_diffgemma.model import ModelArgs

REAL = ModelArgs()
G = 1e9


def test_parameter_counts():
    p = ParameterCounts.of(REAL)
    # sliding: q 2816x4096, k and v 2816x2048, o 4096x2816; full: q 2816x8192, k 2816x1024, o 8192x2816
    assert p.attention == 25 * 2816 * (2 * 4096 + 2 * 2048) + 5 * 2816 * (2 * 8192 + 1024)
    assert p.expert == 3 * 2816 * 704 == 5_947_392
    assert p.embedding == 262144 * 2816
    assert p.total / G == pytest.approx(25.25, abs=0.01)
    assert p.active_per_token / G == pytest.approx(3.82, abs=0.01)


def test_distinct_experts():
    assert expected_distinct_experts(128, 8, 1) == pytest.approx(8)
    assert expected_distinct_experts(128, 8, 256) == pytest.approx(128, abs=1e-4)
    assert [round(expected_distinct_experts(128, 8, t)) for t in (4, 16, 64)] == [29, 82, 126]


def test_bytes_and_flops_at_4_bit():
    ar = ar_token(REAL, 4.5, 1024)  # 4-bit with group-64 scales and biases: 4.5 bits per weight
    # 3.82 B active weights at 4.5 bits, plus the bf16 KV cache after 1024 tokens: a sliding layer's cache
    # keeps the last window - 1 = 1023 positions of 2 x 8 heads x 256 x 2 bytes = 8 KiB, a full layer's all
    # 1024 of 2 x 2 heads x 512 x 2 bytes = 4 KiB: 25 x 1023 x 8192 + 5 x 1024 x 4096 = 230_481_920 bytes
    # (the old count, 1024 positions on every layer, read 25 x 8192 = 204_800 bytes more).
    kv = 25 * 1023 * 8192 + 5 * 1024 * 4096
    assert kv == 230_481_920
    assert ar.bytes == pytest.approx(3_821_830_144 * 4.5 / 8 + kv)
    step = denoise_step(REAL, 4.5, 1024)
    assert step.bytes / G == pytest.approx(15.39, abs=0.02)
    assert step.flops / 1e12 == pytest.approx(2.53, abs=0.01)
    block = commit(REAL, 4.5, 1024)
    assert block.bytes / G == pytest.approx(14.0, abs=0.02)
    assert block.flops / 1e12 == pytest.approx(1.75, abs=0.01)


def test_m4_max_roofline():
    """M4 Max (40 GPU cores): 546 GB/s, 17.2 FP16 TFLOP/s."""
    r = roofline(REAL, 4.5, 1024, bandwidth=546e9, flops_per_second=17.2e12)
    assert r.ar_tokens_per_second == pytest.approx(229, abs=1)
    assert r.step_ms == pytest.approx(147, abs=1) and r.step_bound == "compute"
    assert r.commit_ms == pytest.approx(102, abs=1)
    assert r.crossover_steps == pytest.approx(6.9, abs=0.05)


def test_crossover_definition():
    # AR at 100 tok/s makes a 256-token block in 2.56 s; 60 ms commit + s x 100 ms steps ties at s = 25.
    assert crossover_steps(100, 0.1, 0.06) == pytest.approx(25.0)


def test_machine_probe_measures_this_device():
    from mlx_diffgemma.bench.probe import matmul_throughput, memory_bandwidth, probe

    assert memory_bandwidth(megabytes=8, repeats=2) > 1e8
    assert matmul_throughput(64, 128, repeats=2) > 1e7
    result = probe(hidden=128, rows=32, quantized_bits=(4,)).to_dict()
    assert result["versions"]["mlx"] != "not installed" and result["memory_bytes"] > 0
    assert set(result["quantized_flops"]) == {4}


def test_attention_geometry_is_the_models():
    """The roofline's attention parameters and the cache's kept positions are the built model's."""
    from mlx.utils import tree_flatten

    from mlx_diffgemma.bench.synthetic import synthetic_args
    from mlx_diffgemma.model import Model

    args = synthetic_args("tiny", layers=6)
    model = Model(args)
    projections = sum(p.size for layer in model.layers for name, p in tree_flatten(layer.self_attn.parameters())
                      if name.endswith("_proj.weight"))
    assert ParameterCounts.of(args).attention == projections
    kept = [getattr(c, "max_size", None) for c in model.make_cache()]
    assert kept == [args.sliding_window - 1] * 5 + [None]
