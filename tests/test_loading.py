"""Loading Hugging Face and MLX-layout checkpoints, and refusing bad ones clearly."""

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.utils import save_config, save_model

from mlx_diffgemma import load
from mlx_diffgemma.loader import CheckpointError, load_model, resolve_model_path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def logits_of(model, seed=0, self_conditioning=False):
    rng = np.random.default_rng(seed)
    vocab, length = model.args.vocab_size, model.args.canvas_length
    cache = model.make_cache()
    model.encode(mx.array(rng.integers(0, vocab, (2, 9))), cache)
    canvas = mx.array(rng.integers(0, vocab, (2, length)))
    sc = mx.array(rng.normal(size=(2, length, vocab)).astype(np.float32)) if self_conditioning else None
    return np.array(model.denoise(canvas, cache, sc))


def copy_side_files(src, dst):
    for name in TOKENIZER_FILES + ("generation_config.json",):
        if (src / name).exists():
            shutil.copy(src / name, dst / name)


def save_mlx_layout(model, config, out, quantization=None):
    out.mkdir(parents=True)
    save_model(out, model)
    if quantization:
        config = dict(config, quantization=quantization)
    save_config(config, out / "config.json")
    return out


def test_load_hf_checkpoint_returns_model_and_tokenizer(make_checkpoint):
    model, tokenizer = load(str(make_checkpoint("two_layer")))
    names = [k for k, _ in nn.utils.tree_flatten(model.parameters())]
    assert not any("vision" in k for k in names)  # recognised and skipped
    assert sum("encoder.language_model.layers" in k for k in names) == model.args.num_hidden_layers
    ids = tokenizer.encode("the sky", add_special_tokens=False)
    assert tokenizer.decode(ids) == "the sky"


def test_mlx_layout_round_trips_exactly(make_checkpoint, tmp_path):
    hf = make_checkpoint("four_layer")
    model, config = load_model(hf)
    out = save_mlx_layout(model, config, tmp_path / "mlx")
    keys = mx.load(str(out / "model.safetensors")).keys()
    assert "model.decoder.layers.0.experts.gate_up_proj.weight" in keys  # fused, mlx-community names
    reloaded, _ = load_model(out)
    np.testing.assert_array_equal(logits_of(model, self_conditioning=True), logits_of(reloaded, self_conditioning=True))


def test_mixed_bit_mlx_checkpoint_loads(make_checkpoint, tmp_path):
    """The mlx-community recipe: experts at 4 bits, the rest at 8, per-layer overrides in config."""
    hf = make_checkpoint("quantizable")
    model, config = load_model(hf)
    quantization = {"group_size": 64, "bits": 4, "mode": "affine"}

    def predicate(path, module):
        if not hasattr(module, "to_quantized"):
            return False
        if ".experts." in path:
            return True
        quantization[path] = {"group_size": 32, "bits": 8}
        return quantization[path]

    nn.quantize(model, group_size=64, bits=4, class_predicate=predicate)
    out = save_mlx_layout(model, config, tmp_path / "mixed", quantization)
    copy_side_files(hf, out)
    loaded, tokenizer = load(str(out), cpu_dequantize="never")  # keep the layout as stored
    layer = loaded.layers[0]
    assert (layer.experts.gate_up_proj.bits, layer.self_attn.q_proj.bits) == (4, 8)
    assert loaded.model.decoder.embed_tokens.bits == 8
    # The quantized embedding also serves the self-conditioning product.
    np.testing.assert_array_equal(logits_of(loaded, self_conditioning=True),
                                  logits_of(model, self_conditioning=True))


def test_wrong_model_type_is_refused(make_checkpoint, tmp_path):
    out = shutil.copytree(make_checkpoint("two_layer"), tmp_path / "ck")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(dict(config, model_type="gemma4")))
    with pytest.raises(CheckpointError, match="'gemma4' model, not a DiffusionGemma"):
        load(str(out))


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "config.json").unlink(), "has no config.json"),
    (lambda d: (d / "config.json").write_text("{not json"), "not valid JSON"),
    (lambda d: (d / "model.safetensors").unlink(), "no model\\*.safetensors"),
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:5000]),
     "model.safetensors: not a valid safetensors file"),
])
def test_damaged_checkpoint_gives_one_line_error(make_checkpoint, tmp_path, damage, message):
    out = shutil.copytree(make_checkpoint("two_layer"), tmp_path / "ck")
    damage(out)
    with pytest.raises(CheckpointError, match=message) as info:
        load(str(out))
    assert "\n" not in str(info.value)


def test_weights_that_do_not_match_the_config_are_refused(make_checkpoint, tmp_path):
    out = shutil.copytree(make_checkpoint("two_layer"), tmp_path / "ck")
    config = json.loads((out / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = 3
    config["text_config"]["layer_types"].append("full_attention")
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="weights do not match the config"):
        load(str(out))


def test_unknown_repo_offline_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError, match="hf download someone/missing-model"):
        resolve_model_path("someone/missing-model")


def test_missing_local_path_is_not_mistaken_for_a_repo():
    with pytest.raises(CheckpointError, match="no such directory"):
        resolve_model_path("./does/not/exist")


def test_sharded_checkpoint_with_index_loads(make_checkpoint, tmp_path):
    """Google publishes the weights as several shards plus model.safetensors.index.json."""
    from tiny_checkpoints import build_model

    out = tmp_path / "sharded"
    build_model("four_layer").save_pretrained(out, max_shard_size="40KB")
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").exists()
    single, _ = load_model(make_checkpoint("four_layer"))
    sharded, _ = load_model(out)
    np.testing.assert_array_equal(logits_of(single), logits_of(sharded))
