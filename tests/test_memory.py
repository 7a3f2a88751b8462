"""The memory planner's forecasts against what MLX actually allocates."""

from dataclasses import replace

import mlx.core as mx
import mlx.nn as nn
import pytest

from mlx_diffgemma.cache import BatchedCache
from mlx_diffgemma.engine import Denoiser, Row
from mlx_diffgemma.loader import load_model
from mlx_diffgemma.memory import (InsufficientMemory, cgroup_memory_limit, checkpoint_weight_bytes, device_budget,
                                  inference_plan, kv_bytes, parse_size)
from mlx_diffgemma.model import Model, ModelArgs
from mlx_diffgemma.sampler import MLXNoise, SamplerConfig, empty_history

SMALL = ModelArgs(vocab_size=16384, hidden_size=128, intermediate_size=192, moe_intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                  global_head_dim=64, num_global_key_value_heads=1, num_experts=8, top_k_experts=2,
                  sliding_window=128, layer_types=["sliding_attention", "full_attention"], canvas_length=128)


def test_parse_size():
    assert parse_size("16GB") == parse_size("16GiB") == parse_size("16g") == 16 << 30
    assert parse_size("512MB") == 512 << 20 and parse_size(1234) == 1234
    with pytest.raises(ValueError, match="not a memory size"):
        parse_size("lots")


def test_budget_override_and_cpu_default():
    assert device_budget("3GB") == 3 << 30
    assert 0 < device_budget() < __import__("os").sysconf("SC_PAGE_SIZE") * __import__("os").sysconf("SC_PHYS_PAGES")


def _cgroup_tree(tmp_path, proc_lines, files):
    tmp_path.mkdir()
    (tmp_path / "cgroup").write_text("\n".join(proc_lines) + "\n")
    for name, value in files.items():
        (tmp_path / "fs" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "fs" / name).write_text(value + "\n")
    return cgroup_memory_limit(tmp_path / "cgroup", tmp_path / "fs")


def test_container_memory_limit_is_read_from_the_cgroup(tmp_path):
    # v2: the process's group and the groups above it; the tightest limit counts.
    assert _cgroup_tree(tmp_path / "v2", ["0::/box/job"], {
        "memory.max": "max", "box/memory.max": str(8 << 30), "box/job/memory.max": "max"}) == 8 << 30
    # v1: the memory controller's hierarchy; ~2**63 means no limit.
    assert _cgroup_tree(tmp_path / "v1", ["5:cpu,cpuacct:/", "4:memory:/job"], {
        "memory/memory.limit_in_bytes": "9223372036854771712",
        "memory/job/memory.limit_in_bytes": str(6 << 30)}) == 6 << 30
    assert _cgroup_tree(tmp_path / "none", ["0::/"], {"memory.max": "max"}) is None
    assert _cgroup_tree(tmp_path / "v1 none", ["4:memory:/"], {
        "memory/memory.limit_in_bytes": "9223372036854771712"}) is None
    assert cgroup_memory_limit(tmp_path / "missing", tmp_path) is None


def test_cpu_budget_respects_a_container_limit(monkeypatch):
    import mlx_diffgemma.memory as memory

    monkeypatch.setattr(memory, "physical_memory", lambda: 64 << 30)
    monkeypatch.setattr(memory, "cgroup_memory_limit", lambda: 8 << 30)
    monkeypatch.setattr(memory.mx, "default_device", lambda: memory.mx.cpu)
    assert device_budget() == (8 << 30) - (2 << 30)
    monkeypatch.setattr(memory, "cgroup_memory_limit", lambda: None)
    assert device_budget() == (64 << 30) - int((64 << 30) * 0.15)


def test_weight_bytes_from_headers_match_the_loaded_model(make_checkpoint):
    checkpoint = make_checkpoint("four_layer")
    model, _ = load_model(checkpoint)
    loaded = sum(v.nbytes for _, v in nn.utils.tree_flatten(model.parameters()))
    assert checkpoint_weight_bytes(checkpoint) == loaded  # vision weights are not counted


@pytest.mark.parametrize("tokens", [5, 127, 300, 700])
def test_kv_forecast_is_exact(tokens):
    model = Model(SMALL)
    cache = model.make_cache()
    model.encode(mx.zeros((1, tokens), dtype=mx.int32), cache)
    stored = sum(c.keys.nbytes + c.values.nbytes for c in cache)
    assert kv_bytes(SMALL, tokens, 4) == stored


@pytest.mark.parametrize("batch,logits_rows", [(1, 1), (2, 2), (4, 4), (4, 1), (8, 3)])
@pytest.mark.parametrize("prompt", [16, 300])
def test_step_peak_forecast_within_25_percent(batch, logits_rows, prompt):
    """Two engine steps (the second self-conditioned) over prompts of different
    lengths, with every row's logits at once or a few rows' at a time."""
    model = Model(SMALL)
    mx.eval(model.parameters())
    weights = sum(v.nbytes for _, v in nn.utils.tree_flatten(model.parameters()))
    caches = []
    for row in range(batch):
        caches.append(model.make_cache())
        model.encode(mx.zeros((1, prompt + row), dtype=mx.int32), caches[-1])
    batched = BatchedCache(caches)
    config, noise, rows = SamplerConfig(confidence_threshold=0.0), MLXNoise(0), list(range(batch))
    canvas = mx.zeros((batch, SMALL.canvas_length), dtype=mx.int32)
    history = empty_history(config, batch, SMALL.canvas_length)
    forecast = inference_plan(SMALL, weights, prompt + batch, dtype_bytes=4, budget=1 << 40)

    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    resident = mx.get_active_memory()
    denoiser = Denoiser(model, config, noise, logits_rows)
    first = denoiser.step(batched, canvas, None, history, [Row(r, r) for r in rows], step=1, temperature=0.8)
    second = denoiser.step(batched, first.canvas, first.soft_embeddings, first.history, [Row(r, r) for r in rows],
                           step=2, temperature=0.7)
    assert not second.stop.any() and second.soft_embeddings.shape[0] == batch
    measured = mx.get_peak_memory() - resident
    expected = forecast.peak(batch, logits_rows) - weights - batch * forecast.kv_per_prompt
    print(f"batch {batch} logits rows {logits_rows} prompt {prompt}: measured {measured / 1e6:.1f} MB, "
          f"forecast {expected / 1e6:.1f} MB")
    assert 0.75 * measured <= expected <= 1.25 * measured


def test_real_model_forecast_by_hand():
    """26B-A4B, bf16 KV, 4096 tokens of context."""
    real = inference_plan(ModelArgs(), weight_bytes=14 << 30, kv_tokens=4096, budget=16 << 30)
    sliding = 25 * 2 * 1023 * 8 * 256 * 2  # 25 layers keep 1023 positions of 8 heads x 256
    full = 5 * 2 * 4096 * 2 * 512 * 2  # 5 layers keep all 4096 of 2 heads x 512
    assert real.kv_per_prompt == sliding + full == 293_396_480
    attention = 16 * 256 * (4096 + 256) * 4  # scores of 16 heads over cache and canvas
    experts = 256 * 8 * 3 * 704 * 2  # top-8 experts' gate, up and product
    hidden = 4 * 256 * 2816 * 2
    assert real.per_canvas == attention + experts + hidden == 85_721_088
    logits = 256 * 262144 * 4  # 268 MB, three of them at the peak
    assert real.logits_per_canvas == 3 * logits
    # 2 GiB free: three canvases with their caches, and one canvas's logits at a time.
    assert real.max_canvases == 3 and real.logits_rows(3) == 1
    roomy = replace(real, budget=32 << 30)
    # 32 GiB: 24 canvases leave 10.2 GB, twelve canvases' logits.
    assert roomy.max_canvases == 48 and roomy.logits_rows(8) == 8 and roomy.logits_rows(24) == 12


def test_impossible_request_fails_before_allocating():
    real = inference_plan(ModelArgs(), weight_bytes=14 << 30, kv_tokens=4096, budget=16 << 30)
    with pytest.raises(InsufficientMemory, match="needs about .* GiB .* but 16.0 GiB is available"):
        real.require(canvases=real.max_canvases + 1)
    with pytest.raises(InsufficientMemory):
        inference_plan(ModelArgs(), weight_bytes=50 << 30, kv_tokens=512, budget=24 << 30).require()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_one_forecast_before_loading_and_in_the_engine(make_checkpoint, monkeypatch, dtype):
    """The check before any weight is read and the engine's batch sizing get the same plan for the
    same run: same weights (as loaded, after the CPU backend's upcast of bfloat16), activation dtype
    and cache length (the prompt and every block but the last; the canvas is counted apart)."""
    import importlib

    from mlx_diffgemma.loader import Checkpoint
    from mlx_diffgemma.memory import generation_plan, weight_bytes

    generate = importlib.import_module("mlx_diffgemma.generate")  # the module; the package's generate is the function
    path = make_checkpoint("two_layer", dtype=dtype)
    checkpoint = Checkpoint(str(path), memory_limit="4GB")
    checkpoint.sampler = checkpoint.sampler.override(max_new_tokens=20)
    prompts = [[5, 6, 7], [8] * 11]
    before = checkpoint.memory_plan(map(len, prompts))
    checkpoint.check_memory(map(len, prompts), max_batch=2)
    model = checkpoint.load()
    seen = []
    monkeypatch.setattr(generate, "generation_plan", lambda *a, **k: seen.append(generation_plan(*a, **k)) or seen[-1])
    generate.batch_generate(model, checkpoint.tokenizer, prompts, config=checkpoint.sampler, max_batch=2,
                            memory_limit="4GB")
    assert seen == [before]
    assert before.weights == weight_bytes(model)
    L = model.args.canvas_length
    assert before.kv_per_prompt == kv_bytes(model.args, 11 + (-(-20 // L) - 1) * L, model.dtype.size)
    if dtype == "bfloat16" and mx.default_device() == mx.cpu:
        # What the safetensors headers alone say is the bfloat16 size; the CPU backend holds float32.
        assert model.dtype == mx.float32 and before.weights > checkpoint_weight_bytes(path)
