"""`mlxdg convert` on tiny checkpoints written by transformers.

Quality figures (KL divergence and argmax agreement against float32) are
printed; run with ``-s`` to see them.
"""

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map
from mlx_lm.utils import quantize_model, save_config, save_model
from typer.testing import CliRunner

from mlx_diffgemma.cli import app
from mlx_diffgemma.convert import convert as convert_module
from mlx_diffgemma.convert import recipes
from mlx_diffgemma.convert.convert import ConvertError, convert, main, recipe_table
from mlx_diffgemma import loader
from mlx_diffgemma.model import VISION_PREFIXES, Model, ModelArgs


def load_model(path):
    """The weights as the conversion wrote them: no dequantizing for the CPU backend."""
    return loader.load_model(path, cpu_dequantize="never")

# Mean KL(float32 || quantized) in nats over 256 canvas positions of the
# "quantizable" fixture. Its O(1) random weights make it far more sensitive
# than a trained model: rounding the float32 weights to bfloat16 alone costs
# 0.05 nats and flips 12% of the argmaxes. Measured: 8bit 0.25, mixed 0.51,
# 4bit 1.80.
KL_BOUND_8BIT = 0.35
KL_BOUND_MIXED = 0.75
VOCAB = 128  # of both fixtures used here
SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.fixture(scope="module")
def hf_checkpoint(make_checkpoint):
    return make_checkpoint("quantizable", generation_config={"max_new_tokens": 8})


@pytest.fixture(scope="module")
def converted(hf_checkpoint, tmp_path_factory):
    """``converted(**convert_kwargs)``: the output folder, made once per set of arguments."""
    made = {}

    def get(**kwargs):
        key = json.dumps(kwargs, sort_keys=True)
        if key not in made:
            out = tmp_path_factory.mktemp("converted") / "out"
            made[key] = convert(str(hf_checkpoint), str(out), show_progress=False, **kwargs)
        return made[key]

    return get


def logits(model):
    """Logits of a first denoising step over 4 x 64 canvas positions."""
    rng = np.random.default_rng(0)
    prompt = mx.array(rng.integers(0, VOCAB, (4, 11)))
    canvas = mx.array(rng.integers(0, VOCAB, (4, 64)))
    cache = model.make_cache()
    model.encode(prompt, cache)
    return model.denoise(canvas, cache)


def kl_and_argmax(reference, ours):
    p = reference - mx.logsumexp(reference, axis=-1, keepdims=True)
    q = ours - mx.logsumexp(ours, axis=-1, keepdims=True)
    kl = (mx.exp(p) * (p - q)).sum(-1).mean().item()
    return kl, (reference.argmax(-1) == ours.argmax(-1)).mean().item()


def tensors(folder):
    out = {}
    for path in sorted(Path(folder).glob("model*.safetensors")):
        out.update(mx.load(str(path)))
    return out


def leftovers(parent):
    """Hidden work folders the converter may have left next to its output."""
    return [p.name for p in Path(parent).iterdir() if p.name.startswith(".") and p.name.endswith((".partial", ".old"))]


def test_unquantized_conversion_gives_identical_logits(hf_checkpoint, converted):
    out = converted(max_shard_bytes=200_000)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 3 and all(p.stat().st_size <= 200_000 + 65_536 for p in shards)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}

    reference, _ = load_model(hf_checkpoint)
    model, config = load_model(out)
    assert mx.array_equal(logits(reference), logits(model))
    assert "quantization" not in config and "vision_config" in config

    source, written = tensors(hf_checkpoint), tensors(out)
    vision = [k for k in source if k.startswith(VISION_PREFIXES)]
    assert vision and all(mx.array_equal(source[k], written[k]) for k in vision)
    assert set(index["weight_map"]) == set(written)
    assert "model.decoder.layers.0.experts.gate_up_proj.weight" in written
    for name in SIDE_FILES:
        assert (out / name).read_bytes() == (hf_checkpoint / name).read_bytes()


def test_quantized_tensors_match_mlx_lm(hf_checkpoint, converted):
    """Streaming per-tensor quantization writes what quantizing the loaded
    model with mlx-lm and saving it would write."""
    out = converted(quantize=True)
    model, config = load_model(hf_checkpoint)

    def predicate(path, module):
        return recipes.quant_params("mixed", f"{path}.weight", module.weight.shape, 4, 64) or False

    model, expected_config = quantize_model(model, config, 64, 4, quant_predicate=predicate)
    written = tensors(out)
    for name, value in tree_flatten(model.parameters()):
        assert mx.array_equal(written[name], value), name
    quantization = json.loads((out / "config.json").read_text())["quantization"]
    default = {"group_size": 64, "bits": 4, "mode": "affine"}
    for path, params in expected_config["quantization"].items():
        if isinstance(params, dict):
            assert quantization.get(path, default) == {**params, "mode": "affine"}, path
    assert quantization["model.decoder.layers.0.self_attn.q_proj"]["bits"] == 8
    assert "model.decoder.layers.0.experts.gate_up_proj" not in quantization  # the top-level 4 bits
    assert "model.decoder.layers.0.router.scale" in written and "model.decoder.layers.0.layer_scalar" in written


def test_quantization_quality(hf_checkpoint, converted):
    model, _ = load_model(hf_checkpoint)
    reference = logits(model)
    model.update(tree_map(lambda w: w.astype(mx.bfloat16).astype(mx.float32), model.parameters()))
    figures = {"bf16 rounding": kl_and_argmax(reference, logits(model))}
    for recipe in ("8bit", "mixed", "4bit"):
        figures[recipe] = kl_and_argmax(reference, logits(load_model(converted(recipe=recipe))[0]))
    for name, (kl, agree) in figures.items():
        print(f"{name:>14}: KL {kl:.3f} nats, argmax agreement {agree:.1%}")
    assert figures["8bit"][0] < KL_BOUND_8BIT
    assert figures["mixed"][0] < KL_BOUND_MIXED
    # The point of the mixed recipe: most of plain 4-bit's loss comes back.
    assert figures["mixed"][0] < figures["4bit"][0] / 2


def test_loads_mlx_community_layout_with_mixed_bits(hf_checkpoint, tmp_path):
    """A checkpoint as mlx-vlm writes it: its 8-bit-sensitive predicate, which
    leaves the self-conditioning MLP at 4 bits, saved by mlx-lm, vision kept."""
    model, config = load_model(hf_checkpoint)
    reference = logits(model)

    def predicate(path, module):
        if path.endswith(("embed_tokens", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")) or \
                ".self_attn." in path or "router" in path:
            return {"group_size": 64, "bits": 8}
        return True

    model, config = quantize_model(model, config, 64, 4, quant_predicate=predicate)
    out = tmp_path / "mlx-community"
    save_model(out, model)
    vision = {k: v for k, v in tensors(hf_checkpoint).items() if k.startswith(VISION_PREFIXES)}
    mx.save_safetensors(str(out / "model-vision.safetensors"), vision, metadata={"format": "mlx"})
    save_config(config, out / "config.json", keep_vision_config=True)
    for name in SIDE_FILES:
        shutil.copy(hf_checkpoint / name, out)

    loaded, _ = load_model(out)
    layers = loaded.model.decoder
    assert layers.layers[0].self_attn.q_proj.bits == 8 and layers.embed_tokens.bits == 8
    assert layers.self_conditioning.gate_proj.bits == 4
    kl, agree = kl_and_argmax(reference, logits(loaded))
    print(f"mlx-vlm recipe: KL {kl:.3f} nats, argmax agreement {agree:.1%}")
    assert kl < KL_BOUND_MIXED
    assert main(str(out), str(tmp_path / "again"), True, None, 64, None, None, None, False, False) == 1


@pytest.mark.parametrize("kwargs", [{}, {"quantize": True}, {"recipe": "8bit", "text_only": True}])
def test_mlx_vlm_gives_the_same_logits(converted, kwargs):
    """mlx-vlm is not a dependency: this runs where it is installed (0.7.10 passes)."""
    vlm_utils = pytest.importorskip("mlx_vlm.utils")
    out = converted(**kwargs)
    theirs = vlm_utils.load_model(out)
    assert (theirs.model.encoder.vision_tower is None) == bool(kwargs.get("text_only"))
    rng = np.random.default_rng(0)
    prompt, canvas = mx.array(rng.integers(0, VOCAB, (1, 11))), mx.array(rng.integers(0, VOCAB, (1, 64)))
    ours, _ = load_model(out)
    cache = ours.make_cache()
    ours.encode(prompt, cache)
    their_logits = theirs.diffusion_decoder_logits(canvas, theirs.diffusion_prefill_cache(prompt))
    assert mx.allclose(their_logits.astype(mx.float32), ours.denoise(canvas, cache), rtol=0, atol=1e-4)


def test_group_size_falls_back_for_narrow_matrices(make_checkpoint, tmp_path):
    """The two_layer fixture's 32-wide inputs take group size 32 under
    --q-group-size 64; its 48-wide ones (multiples of neither) stay unquantized."""
    checkpoint = make_checkpoint("two_layer")
    out = convert(str(checkpoint), str(tmp_path / "out"), recipe="8bit", show_progress=False)
    quantization = json.loads((out / "config.json").read_text())["quantization"]
    assert quantization["model.decoder.layers.0.self_attn.q_proj"] == {"group_size": 32, "bits": 8, "mode": "affine"}
    written = tensors(out)
    assert "model.decoder.layers.0.mlp.down_proj.scales" not in written
    assert written["model.decoder.layers.0.mlp.down_proj.weight"].dtype == mx.float32
    reference, _ = load_model(checkpoint)
    kl, _ = kl_and_argmax(logits(reference), logits(load_model(out)[0]))
    assert kl < KL_BOUND_8BIT


def test_dtype_and_text_only(hf_checkpoint, converted):
    out = converted(dtype="bfloat16", text_only=True)
    written = tensors(out)
    assert not any(k.startswith(VISION_PREFIXES) for k in written)
    assert {v.dtype for v in written.values()} == {mx.bfloat16}
    config = json.loads((out / "config.json").read_text())
    assert config["vision_config"] is None and config["dtype"] == "bfloat16"
    model, _ = load_model(out)
    reference, _ = load_model(hf_checkpoint)
    kl, _ = kl_and_argmax(logits(reference), logits(model))
    assert kl < KL_BOUND_8BIT


def test_recipe_list(capsys):
    assert main(None, "unused", False, None, 64, "list", None, None, False, False) == 0
    text = capsys.readouterr().out
    rows = dict(re.findall(r"^\s+(\w+)\s+([\d.]+)\s", text, re.MULTILINE))
    assert set(recipes.RECIPES) <= set(rows)
    assert float(rows["4bit"]) == 4.5 and float(rows["8bit"]) == 8.5  # affine, group 64, bf16 scales
    assert 4.5 < float(rows["mixed"]) < 5.0
    # The real model's 2112- and 704-wide inputs fall back to group 64, so
    # group 128 saves less than the naive 4.25.
    assert 4.25 < float(re.search(r"4bit\s+([\d.]+)", recipe_table(128)).group(1)) < 4.5


def test_bits_per_weight_of_the_real_shapes():
    shapes = convert_module.text_shapes(Model(ModelArgs()))
    assert math.isclose(sum(math.prod(s) for s in shapes.values()), 25.25e9, rel_tol=1e-3)
    assert math.isclose(recipes.bits_per_weight("4bit", shapes, 4, 64), 4.5, abs_tol=1e-3)  # norms stay 16-bit


def test_existing_output_needs_force(hf_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = [str(hf_checkpoint), str(out), False, None, 64, None, None, None]
    assert main(*args, False, False) == 1
    assert "--force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    # --force replaces a model folder only, never one that holds something else.
    assert main(*args, True, False) == 1
    assert "holds 1 entry (keep.txt) but no model" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"

    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_text("old")
    assert main(*args, True, False) == 0
    assert "Replaced the model that was at" in capsys.readouterr().out
    assert not (out / "keep.txt").exists() and (out / "config.json").read_text() != "{}"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("force", [False, True])
def test_interrupted_run_leaves_nothing(hf_checkpoint, tmp_path, monkeypatch, capsys, force):
    write_tensor = convert_module._write_tensor
    calls = []

    def interrupt_on_tenth(writer, tensor):
        calls.append(tensor.name)
        if len(calls) == 10:
            raise KeyboardInterrupt
        write_tensor(writer, tensor)

    monkeypatch.setattr(convert_module, "_write_tensor", interrupt_on_tenth)
    out = tmp_path / "nested" / "out"
    if force:
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_text("mine")
    assert main(str(hf_checkpoint), str(out), True, None, 64, None, None, None, force, False) == 130
    assert "interrupted" in capsys.readouterr().err
    if force:
        assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
        assert (out / "model.safetensors").read_text() == "mine"
        assert leftovers(out.parent) == []
    else:
        assert list(tmp_path.iterdir()) == []  # the parents it made are gone too


def test_hash_mismatch_is_an_error(hf_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(convert_module, "file_sha256", lambda path, progress=None: "0" * 64)
    with pytest.raises(ConvertError, match="reads back differently"):
        convert(str(hf_checkpoint), str(tmp_path / "out"), show_progress=False)
    assert list(tmp_path.iterdir()) == []


def _bad_checkpoint(kind, hf_checkpoint, tmp_path):
    if kind == "missing":
        return tmp_path / "nope"
    bad = tmp_path / kind
    shutil.copytree(hf_checkpoint, bad)
    if kind == "not DiffusionGemma":
        config = json.loads((bad / "config.json").read_text())
        (bad / "config.json").write_text(json.dumps({**config, "model_type": "gemma4"}))
    elif kind == "corrupt safetensors":
        data = (bad / "model.safetensors").read_bytes()
        (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif kind == "missing tensor":
        weights = tensors(bad)
        mx.eval(weights)  # read it all before overwriting the file it comes from
        del weights["model.decoder.layers.1.router.scale"]
        mx.save_safetensors(str(bad / "model.safetensors"), weights)
    elif kind == "config mismatch":
        config = json.loads((bad / "config.json").read_text())
        config["text_config"]["hidden_size"] = 128
        (bad / "config.json").write_text(json.dumps(config))
    return bad


@pytest.mark.parametrize("kind, message", [
    ("missing", "no such directory"),
    ("not DiffusionGemma", "'gemma4' model, not a DiffusionGemma"),
    ("corrupt safetensors", "not a valid safetensors file"),
    ("missing tensor", "lacks 1 tensors"),
    ("config mismatch", "config.json implies"),
])
def test_bad_checkpoint_is_a_one_line_error(hf_checkpoint, tmp_path, capsys, kind, message):
    source = _bad_checkpoint(kind, hf_checkpoint, tmp_path)
    (tmp_path / "outputs").mkdir()
    out = tmp_path / "outputs" / "out"
    assert main(str(source), str(out), True, None, 64, None, None, None, False, False) == 1
    err = capsys.readouterr().err
    assert err.startswith("mlxdg: ") and err.count("\n") == 1 and message in err, err
    assert list((tmp_path / "outputs").iterdir()) == []


@pytest.mark.parametrize("kwargs, message", [
    (dict(q_bits=8), "--q-bits needs -q"),
    (dict(quantize=True, q_bits=3), "--q-bits must be one of 4, 8"),
    (dict(recipe="4bit", q_bits=8), "sets its own bits"),
    (dict(recipe="2bit"), "unknown recipe"),
    (dict(quantize=True, q_group_size=100), "--q-group-size"),
    (dict(dtype="int8"), "--dtype"),
    (dict(upload_repo="no-owner"), "not a Hugging Face repo id"),
])
def test_bad_options(hf_checkpoint, tmp_path, kwargs, message):
    with pytest.raises(ConvertError, match=re.escape(message)):
        convert(str(hf_checkpoint), str(tmp_path / "out"), show_progress=False, **kwargs)
    assert list(tmp_path.iterdir()) == []


class FakeHfApi:
    calls = []
    fail = False

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))

    def upload_folder(self, **kwargs):
        if self.fail:
            raise RuntimeError("401 Unauthorized\nmore detail")
        self.calls.append(("upload_folder", kwargs))


def test_upload_with_a_model_card(hf_checkpoint, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    monkeypatch.setattr(FakeHfApi, "calls", [])
    # As if the source were the Hub repo, cached locally.
    monkeypatch.setattr(convert_module, "resolve_model_path", lambda repo: hf_checkpoint)
    out = convert("google/diffusiongemma-tiny", str(tmp_path / "out"), quantize=True,
                  upload_repo="me/diffusiongemma-tiny-4bit", show_progress=False)
    assert [c[0] for c in FakeHfApi.calls] == ["create_repo", "upload_folder"]
    assert FakeHfApi.calls[0][1]["repo_id"] == "me/diffusiongemma-tiny-4bit"
    assert Path(FakeHfApi.calls[1][1]["folder_path"]) == out
    card = (out / "README.md").read_text()
    assert "library_name: mlx" in card and "base_model: google/diffusiongemma-tiny" in card
    assert "base_model_relation: quantized" in card
    assert "recipe mixed" in card and "--recipe mixed" in card
    assert 'load("me/diffusiongemma-tiny-4bit")' in card

    monkeypatch.setattr(FakeHfApi, "fail", True)
    with pytest.raises(ConvertError, match=r"upload to me/x failed \(401 Unauthorized\); the converted model is in"):
        convert(str(hf_checkpoint), str(tmp_path / "out2"), upload_repo="me/x", show_progress=False)
    assert (tmp_path / "out2" / "config.json").is_file()


def test_cli_runner(hf_checkpoint, tmp_path):
    runner = CliRunner()
    out = tmp_path / "out"
    result = runner.invoke(app, ["convert", "--hf-path", str(hf_checkpoint), "--mlx-path", str(out), "-q",
                                 "--q-bits", "8", "--text-only"])
    assert result.exit_code == 0, result.output
    assert "Vision tower dropped" in result.stdout
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 8

    result = runner.invoke(app, ["convert", "--hf-path", str(hf_checkpoint), "--mlx-path", str(out)])
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and "already exists" in result.stderr


@pytest.mark.slow
def test_cli_subprocess(hf_checkpoint, tmp_path):
    command = [sys.executable, "-c", "from mlx_diffgemma.cli import app; app()", "convert"]
    out = tmp_path / "out"
    done = subprocess.run(command + ["--hf-path", str(hf_checkpoint), "--mlx-path", str(out), "--recipe", "4bit"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "recipe 4bit" in done.stdout and "shard hashes verified" in done.stdout
    assert load_model(out)[0].model.decoder.layers[0].self_attn.q_proj.bits == 4

    bad = _bad_checkpoint("not DiffusionGemma", hf_checkpoint, tmp_path)
    done = subprocess.run(command + ["--hf-path", str(bad), "--mlx-path", str(tmp_path / "bad-out")],
                          capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.startswith("mlxdg: ") and "Traceback" not in done.stderr
    assert not (tmp_path / "bad-out").exists()


# A model config whose weights come to 2.07 GiB in float32; its biggest tensor
# (one layer's fused experts) is 256 MiB.
SYNTHETIC_TEXT_CONFIG = dict(
    vocab_size=16384, hidden_size=1024, intermediate_size=1024, moe_intermediate_size=512,
    num_hidden_layers=5, num_attention_heads=8, num_key_value_heads=4, head_dim=128, global_head_dim=256,
    num_global_key_value_heads=1, num_experts=64, top_k_experts=4, sliding_window=128,
    layer_types=["sliding_attention"] * 4 + ["full_attention"],
)

MEASURE = r"""
import json, re, resource, sys
from pathlib import Path
import mlx_diffgemma
from mlx_diffgemma.convert.convert import convert

def peak():
    # Linux carries ru_maxrss over from the parent through fork and exec, so
    # it would report pytest's own peak; VmHWM belongs to this process alone.
    status = Path("/proc/self/status")
    if status.exists():
        return 1024 * int(re.search(r"VmHWM:\s+(\d+) kB", status.read_text()).group(1))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS

baseline = peak()
convert(sys.argv[1], sys.argv[2], quantize=sys.argv[3] == "q", max_shard_bytes=int(sys.argv[4]), show_progress=False)
print(json.dumps({"baseline": baseline, "peak": peak()}))
"""


def write_synthetic_checkpoint(out: Path, shard_bytes: int) -> None:
    """Random float32 weights in the Hugging Face key layout, shard by shard."""
    config = {"model_type": "diffusion_gemma", "text_config": SYNTHETIC_TEXT_CONFIG, "canvas_length": 32}
    shapes = {name[: -len(".weight")] if ".experts." in name else name: p.shape
              for name, p in tree_flatten(Model(ModelArgs.from_dict(config)).parameters())}
    shapes["model.encoder.embed_vision.embedding_projection.weight"] = (1024, 64)
    shards, size = [[]], 0
    for name in sorted(shapes):
        n = 4 * math.prod(shapes[name])
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    rng = np.random.default_rng(0)
    out.mkdir()
    for i, names in enumerate(shards):
        arrays = {name: mx.array(rng.random(shapes[name], dtype=np.float32) - 0.5) for name in names}
        mx.save_safetensors(str(out / f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"), arrays)
        del arrays
        mx.clear_cache()
    (out / "config.json").write_text(json.dumps(config))


@pytest.mark.slow
def test_peak_memory_stays_near_one_tensor(tmp_path):
    shard_bytes = 512 << 20
    source = tmp_path / "synthetic"
    try:
        write_synthetic_checkpoint(source, shard_bytes)
        shards = list(source.glob("*.safetensors"))
        total = sum(p.stat().st_size for p in shards)
        largest = max(p.stat().st_size for p in shards)
        assert total >= 2e9 and len(shards) >= 4
        for mode in ("unquantized", "q"):
            out = tmp_path / f"out-{mode}"
            done = subprocess.run([sys.executable, "-c", MEASURE, str(source), str(out), mode, str(shard_bytes)],
                                  capture_output=True, text=True)
            assert done.returncode == 0, done.stderr
            memory = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{mode}: {total / 2**30:.2f} GiB in {len(shards)} shards (largest {largest / 2**20:.0f} MiB): "
                  f"peak RSS {memory['peak'] / 2**20:.0f} MiB, {memory['baseline'] / 2**20:.0f} MiB of it "
                  f"before converting ({memory['peak'] / largest:.2f}x the largest shard)")
            assert memory["peak"] < 1.5 * largest
            shutil.rmtree(out)
    finally:
        shutil.rmtree(source, ignore_errors=True)
