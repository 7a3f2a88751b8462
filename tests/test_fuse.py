"""mlxdg fuse: the fused checkpoint computes what the base with its adapters
computes, loads in mlx-vlm, and QLoRA trains on a quantized base."""

import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))

from test_lora import GENERATION_CONFIG, PAIRS, log, lora, pairs_data  # noqa: E402

from mlx_diffgemma.cli import app  # noqa: E402
from mlx_diffgemma.convert.convert import convert  # noqa: E402
from mlx_diffgemma.generate import generate  # noqa: E402
from mlx_diffgemma.loader import load, load_model  # noqa: E402
from mlx_diffgemma.tuner.adapters import load_adapters  # noqa: E402


def fuse(*args):
    return CliRunner().invoke(app, ["fuse", *map(str, args)])


def logits(model, vocab):
    rng = np.random.default_rng(0)
    prompt, canvas = mx.array(rng.integers(0, vocab, (1, 11))), mx.array(rng.integers(0, vocab, (1, 8)))
    cache = model.make_cache()
    model.encode(prompt, cache)
    return np.array(model.denoise(canvas, cache))


def relative(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def trained(make_checkpoint, tmp_path_factory):
    """A LoRA that has learned PAIRS on the unquantized tiny checkpoint."""
    checkpoint = make_checkpoint("two_layer", generation_config=GENERATION_CONFIG)
    tmp = tmp_path_factory.mktemp("lora")
    out = tmp / "adapters"
    result = lora("--model", checkpoint, "--train", "--data", pairs_data(tmp), "--fine-tune-type", "full",
                  "--iters", 200, "--batch-size", 4, "--learning-rate", 3e-3, "--steps-per-eval", 1000,
                  "--adapter-path", out)
    assert result.exit_code == 0, result.output
    lora_out = tmp / "lora"
    result = lora("--model", checkpoint, "--train", "--data", tmp / "data", "--iters", 20, "--batch-size", 2,
                  "--num-layers", -1, "--learning-rate", 1e-2, "--steps-per-eval", 1000, "--adapter-path", lora_out)
    assert result.exit_code == 0, result.output
    return checkpoint, out, lora_out


def test_fused_full_fine_tune_answers_as_the_adapters_do(trained, tmp_path):
    checkpoint, adapters, _ = trained
    assert fuse("--model", checkpoint, "--adapter-path", adapters, "--save-path", tmp_path / "fused").exit_code == 0
    runtime = load(checkpoint, adapter_path=adapters)
    fused = load(tmp_path / "fused")
    for p, expected in PAIRS:
        assert generate(*fused, p, chat=True, seed=0) == generate(*runtime, p, chat=True, seed=0) == expected


def test_fused_lora_computes_what_the_adapters_compute(trained, tmp_path):
    checkpoint, _, adapters = trained
    result = fuse("--model", checkpoint, "--adapter-path", adapters, "--save-path", tmp_path / "fused")
    assert result.exit_code == 0, result.output
    model, _ = load_model(checkpoint)
    load_adapters(model, adapters)
    fused, _ = load_model(tmp_path / "fused")
    vocab = model.args.vocab_size
    assert relative(logits(fused, vocab), logits(model, vocab)) < 1e-5
    assert not any("lora" in k for k in mx.load(str(tmp_path / "fused" / "model.safetensors")))
    # A second fuse into the same place needs --force and leaves the first one whole otherwise.
    again = fuse("--model", checkpoint, "--adapter-path", adapters, "--save-path", tmp_path / "fused")
    assert again.exit_code == 1 and "--force" in again.output


def test_mlx_vlm_loads_the_fused_checkpoint(trained, tmp_path):
    vlm_utils = pytest.importorskip("mlx_vlm.utils")
    checkpoint, _, adapters = trained
    assert fuse("--model", checkpoint, "--adapter-path", adapters, "--save-path", tmp_path / "fused").exit_code == 0
    theirs = vlm_utils.load_model(tmp_path / "fused")
    ours, _ = load_model(tmp_path / "fused")
    rng = np.random.default_rng(0)
    prompt, canvas = mx.array(rng.integers(0, 128, (1, 11))), mx.array(rng.integers(0, 128, (1, 8)))
    cache = ours.make_cache()
    ours.encode(prompt, cache)
    their_logits = theirs.diffusion_decoder_logits(canvas, theirs.diffusion_prefill_cache(prompt))
    assert mx.allclose(their_logits.astype(mx.float32), ours.denoise(canvas, cache), rtol=0, atol=1e-4)


def test_qlora_on_a_quantized_base_then_fuse(make_checkpoint, tmp_path):
    base = convert(str(make_checkpoint("quantizable", generation_config=GENERATION_CONFIG)), str(tmp_path / "q4"),
                   quantize=True, show_progress=False)
    adapters = tmp_path / "adapters"
    result = lora("--model", base, "--train", "--data", pairs_data(tmp_path), "--iters", 30, "--batch-size", 4,
                  "--num-layers", -1, "--learning-rate", 1e-2, "--steps-per-report", 10, "--steps-per-eval", 1000,
                  "--adapter-path", adapters, "--cpu-dequantize", "never")
    assert result.exit_code == 0, result.output
    losses = [r["train_loss"] for r in log(adapters) if "train_loss" in r]
    assert losses[-1] < losses[0], losses

    # The adapters on the quantized base (MLX's quantized kernels) ...
    quantized, _ = load_model(base, cpu_dequantize="never")
    assert "scales" in quantized.model.decoder.layers[0].self_attn.q_proj
    load_adapters(quantized, adapters)
    vocab = quantized.args.vocab_size
    expected = logits(quantized, vocab)
    # ... equal the base de-quantized with the adapters merged in,
    assert fuse("--model", base, "--adapter-path", adapters, "--save-path", tmp_path / "fp", "--de-quantize").exit_code == 0
    assert "quantization" not in json.loads((tmp_path / "fp" / "config.json").read_text())
    assert relative(logits(load_model(tmp_path / "fp", cpu_dequantize="never")[0], vocab), expected) < 1e-4
    # and the fused layers re-quantized, by default or with a recipe, stay close.
    for name, extra in (("q", []), ("q8", ["--recipe", "8bit"])):
        assert fuse("--model", base, "--adapter-path", adapters, "--save-path", tmp_path / name, *extra).exit_code == 0
        config = json.loads((tmp_path / name / "config.json").read_text())
        assert "quantization" in config
        fused = logits(load_model(tmp_path / name, cpu_dequantize="never")[0], vocab)
        assert np.mean(fused.argmax(-1) == expected.argmax(-1)) > 0.5
