"""Half-precision and quantized checkpoints on MLX's CPU backend."""

import re

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
import typer
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear
from mlx_lm.utils import save_config, save_model
from transformers import DiffusionGemmaForBlockDiffusion, DynamicCache
from typer.testing import CliRunner

from mlx_diffgemma import cpu
from mlx_diffgemma.cli import CpuDequantize, CpuDequantizeOption
from mlx_diffgemma.loader import load_model
from mlx_diffgemma.memory import weight_bytes

pytestmark = pytest.mark.skipif(mx.default_device().type != mx.cpu, reason="checks the CPU backend")

PROMPT_LENGTH = 11


def inputs(vocab, batch, length, seed=1):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (batch, PROMPT_LENGTH), generator=g)
    return prompt, torch.randint(0, vocab, (batch, length), generator=g)


def reference_logits(reference, prompt, canvas) -> np.ndarray:
    batch, length = canvas.shape
    positions = torch.arange(PROMPT_LENGTH + length)[None].expand(batch, -1)
    cache = DynamicCache(config=reference.config.text_config)
    with torch.no_grad():
        out = reference(input_ids=prompt, cache=cache, position_ids=positions[:, :PROMPT_LENGTH],
                        decoder_input_ids=canvas, decoder_position_ids=positions[:, PROMPT_LENGTH:])
    return out.logits.float().numpy()


def mlx_logits(model, prompt, canvas, self_conditioned=False) -> np.ndarray:
    """A first step's logits; with ``self_conditioned``, a second step's after them."""
    cache = model.make_cache()
    model.encode(mx.array(np.asarray(prompt)), cache)
    logits = model.denoise(mx.array(np.asarray(canvas)), cache)
    if self_conditioned:
        logits = mx.stack([logits, model.denoise(mx.array(np.asarray(canvas)), cache, logits)])
    return np.array(logits)


def said(capfd) -> list:
    """Our lines on stderr since the last look (transformers' progress bars aside)."""
    return [line for line in capfd.readouterr().err.splitlines() if line.startswith("mlxdg:")]


def agreement(a, b) -> float:
    return float((a.argmax(-1) == b.argmax(-1)).mean())


def reference_and_inputs(checkpoint, batch=4, length=64):
    reference = DiffusionGemmaForBlockDiffusion.from_pretrained(checkpoint, dtype=torch.float32).eval()
    return reference, *inputs(reference.config.text_config.vocab_size, batch, length)


def test_bfloat16_checkpoint_agrees_with_float32_reference(make_checkpoint, capfd):
    checkpoint = make_checkpoint("quantizable", "bfloat16", canvas_length=64)
    model, _ = load_model(checkpoint)
    assert model.weight_paths == {"dense": cpu.UPCAST, "experts": cpu.UPCAST}
    assert model.layers[0].experts.gate_up_proj.weight.dtype == mx.float32  # what the CPU's GatherMM takes
    assert model.layers[0].mlp.gate_proj.weight.dtype == mx.float32  # and what its BLAS runs fast
    assert len(said(capfd)) == 1

    reference, prompt, canvas = reference_and_inputs(checkpoint)
    assert agreement(mlx_logits(model, prompt, canvas), reference_logits(reference, prompt, canvas)) >= 0.99


def test_bfloat16_checkpoint_without_room_for_float32_runs_in_bfloat16(make_checkpoint, monkeypatch, capfd):
    """The experts still compute in float32 (the CPU's GatherMM takes nothing else), the rest in
    bfloat16. Its rounding flips the argmax of these tiny random MoE models at many positions in
    any implementation, so ours must agree with float32 about as well as transformers' bfloat16 does."""
    checkpoint = make_checkpoint("quantizable", "bfloat16", canvas_length=64)
    monkeypatch.setattr(cpu, "device_budget", lambda: 1)
    model, _ = load_model(checkpoint)
    assert model.weight_paths == {"dense": cpu.NATIVE, "experts": cpu.NATIVE}
    assert model.layers[0].experts.gate_up_proj.weight.dtype == mx.bfloat16
    lines = said(capfd)
    assert len(lines) == 1 and "the rest would not fit in memory" in lines[0]

    reference, prompt, canvas = reference_and_inputs(checkpoint)
    expected = reference_logits(reference, prompt, canvas)
    ours = agreement(mlx_logits(model, prompt, canvas), expected)
    theirs = agreement(reference_logits(reference.to(torch.bfloat16), prompt, canvas), expected)
    assert ours >= theirs - 0.05 and ours >= 0.7


@pytest.fixture(scope="module")
def quantized_checkpoint(make_checkpoint, tmp_path_factory):
    """The tiny model with every matrix at 4 bits, in MLX layout (weights and config only)."""
    hf = make_checkpoint("quantizable", canvas_length=32)
    model, config = load_model(hf)
    quantization = {"group_size": 64, "bits": 4, "mode": "affine"}
    nn.quantize(model, group_size=64, bits=4, class_predicate=lambda p, m: hasattr(m, "to_quantized"))
    out = tmp_path_factory.mktemp("q4") / "checkpoint"
    out.mkdir()
    save_model(out, model)
    save_config(dict(config, quantization=quantization), out / "config.json")
    return out


def test_each_cpu_dequantize_mode_gives_the_quantized_tokens(quantized_checkpoint, capfd):
    quantized, _ = load_model(quantized_checkpoint, cpu_dequantize="never")
    assert quantized.weight_paths == {"dense": cpu.QUANTIZED, "experts": cpu.QUANTIZED}
    assert isinstance(quantized.layers[0].experts.gate_up_proj, QuantizedSwitchLinear)
    prompt, canvas = inputs(quantized.args.vocab_size, 4, 32)
    expected = mlx_logits(quantized, prompt, canvas, self_conditioned=True)
    assert not said(capfd)

    for mode in ("auto", "always"):
        model, _ = load_model(quantized_checkpoint, cpu_dequantize=mode)
        layer = model.layers[0]
        assert model.weight_paths == {"dense": cpu.DEQUANTIZED, "experts": cpu.DEQUANTIZED}
        assert type(layer.experts.gate_up_proj) is SwitchLinear
        assert layer.experts.gate_up_proj.weight.dtype == mx.float32
        assert type(layer.self_attn.q_proj) is nn.Linear and type(model.model.decoder.embed_tokens) is nn.Embedding
        ours = mlx_logits(model, prompt, canvas, self_conditioned=True)
        # Dequantization is exact for the stored values; only the order of summation differs.
        np.testing.assert_array_equal(ours.argmax(-1), expected.argmax(-1))
        np.testing.assert_allclose(ours, expected, atol=1e-4 * np.abs(expected).max())
        lines = said(capfd)
        assert len(lines) == 1 and re.search(r"dequantized (\d+) of \1 quantized matrices", lines[0])


def test_auto_dequantizes_what_fits_the_embedding_first(quantized_checkpoint, capfd):
    model, _ = load_model(quantized_checkpoint, cpu_dequantize="never")
    embedding = model.model.decoder.embed_tokens
    room = weight_bytes(model) + cpu._float32_bytes(embedding) - weight_bytes(embedding)
    paths = cpu.prepare_weights(model, "auto", budget=room)
    assert paths == {"dense": cpu.PARTLY_DEQUANTIZED, "experts": cpu.QUANTIZED}
    assert type(model.model.decoder.embed_tokens) is nn.Embedding
    assert isinstance(model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    lines = said(capfd)
    assert len(lines) == 1 and "dequantized 1 of " in lines[0] and "the rest would not fit" in lines[0]

    model, _ = load_model(quantized_checkpoint, cpu_dequantize="never")
    assert cpu.prepare_weights(model, "auto", budget=1) == {"dense": cpu.QUANTIZED, "experts": cpu.QUANTIZED}
    assert cpu.prepare_weights(model, "always", budget=1) == {"dense": cpu.DEQUANTIZED, "experts": cpu.DEQUANTIZED}


def test_nothing_changes_off_the_cpu(quantized_checkpoint, make_checkpoint, monkeypatch):
    monkeypatch.setattr(cpu, "on_cpu", lambda: False)
    model, _ = load_model(quantized_checkpoint)
    assert model.weight_paths == {"dense": cpu.QUANTIZED, "experts": cpu.QUANTIZED}
    model, _ = load_model(make_checkpoint("quantizable", "bfloat16"))
    assert model.weight_paths == {"dense": cpu.NATIVE, "experts": cpu.NATIVE}
    assert model.layers[0].experts.gate_up_proj.weight.dtype == mx.bfloat16


def test_unknown_cpu_dequantize_mode_is_refused(quantized_checkpoint):
    model, _ = load_model(quantized_checkpoint, cpu_dequantize="never")
    with pytest.raises(ValueError, match="cpu_dequantize must be one of auto, always, never, not 'sometimes'"):
        cpu.prepare_weights(model, "sometimes")


def test_cpu_dequantize_option():
    app = typer.Typer()

    @app.command()
    def run(cpu_dequantize: CpuDequantizeOption = CpuDequantize.auto):
        typer.echo(cpu_dequantize.value)

    runner = CliRunner()
    assert runner.invoke(app, []).output.strip() == "auto"
    assert runner.invoke(app, ["--cpu-dequantize", "never"]).output.strip() == "never"
    assert runner.invoke(app, ["--cpu-dequantize", "sometimes"]).exit_code == 2


def test_the_conversion_is_said_once_per_checkpoint(make_checkpoint, capfd):
    """The server forecasts memory on one thread and loads on its engine's (a second open):
    one line on stderr all the same."""
    import threading

    from mlx_diffgemma.loader import Checkpoint

    checkpoint = Checkpoint(str(make_checkpoint(dtype="bfloat16")))
    checkpoint.check_memory([1])
    loaded = []
    engine = threading.Thread(target=lambda: loaded.append(checkpoint.load()))
    engine.start()
    engine.join()
    assert loaded[0].weight_paths == {"dense": cpu.UPCAST, "experts": cpu.UPCAST}
    lines = said(capfd)
    assert len(lines) == 1 and "half-precision matrices to float32" in lines[0], lines
