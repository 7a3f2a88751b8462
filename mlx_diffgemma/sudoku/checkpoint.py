"""The Sudoku model's checkpoint: its vocabulary, tokenizer, chat template,
architecture and sampler settings, written from a random init in the real
Hugging Face layout (with transformers, so that transformers loads it as it
wrote it), and the export of trained MLX weights back into that layout.

    python -m mlx_diffgemma.sudoku.checkpoint init OUT_DIR [--seed N]
    python -m mlx_diffgemma.sudoku.checkpoint export INIT_DIR WEIGHTS OUT_DIR

The canvas holds the solution as 9 lines of 9 digits and the end-of-sequence
token (90 positions); the prompt is the chat template around the puzzle in
the same layout, so a cell's row and column are the same offsets in both.
"""

import argparse
import json
import shutil
from pathlib import Path
from typing import Dict

from . import TASK, TASK_KEY

# Gemma 4's special tokens, at the low ids the real tokenizer gives them, then
# the words of the chat template and the characters of a grid.
SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<|turn>", "<turn|>"]
WORDS = ["user", "model", "system"]
CHARS = ["\n"] + [str(d) for d in range(10)]
IMAGE = ["<|image>", "<image|>", "<|image|>"]  # the config's image ids; no image is ever fed
VOCAB = SPECIAL + WORDS + CHARS + IMAGE
PAD, EOS, BOS = 0, 1, 2
TURN_END = VOCAB.index("<turn|>")

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] }}<turn|>\n{% endfor %}{% if add_generation_prompt %}<|turn>model\n{% endif %}"
)

CANVAS_LENGTH = 90  # 9 rows of 9 digits, 8 newlines, end of sequence

# The architecture (see the README's Sudoku section for how it was chosen).
TEXT_CONFIG = dict(
    vocab_size=len(VOCAB), hidden_size=128, intermediate_size=128, moe_intermediate_size=64,
    num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    global_head_dim=64, num_global_key_value_heads=1, num_experts=4, top_k_experts=2,
    # Wider than prompt + canvas, so the sliding layers see the whole puzzle.
    sliding_window=128,
    layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
    max_position_embeddings=512, rms_norm_eps=1e-6, final_logit_softcapping=30.0,
    pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS, use_bidirectional_attention="vision",
    hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
    rope_parameters={
        # 1696 ~ (2 pi / 10) ** -16: one rotation repeats every 10 positions, a column's stride.
        "sliding_attention": {"rope_type": "default", "rope_theta": 1696.0},
        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6},
    },
)
VISION_CONFIG = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=2, head_dim=8, patch_size=4, pooling_kernel_size=2,
                     position_embedding_size=64)
GENERATION_CONFIG = dict(
    max_new_tokens=CANVAS_LENGTH, max_denoising_steps=48, t_min=0.4, t_max=0.8,
    stability_threshold=1, confidence_threshold=0.005,
    sampler_config={"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.1},
    eos_token_id=[EOS, TURN_END], pad_token_id=PAD, bos_token_id=BOS,
)


def build_tokenizer():
    """One token per character of a grid, plus the template's words and Gemma 4's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(VOCAB)}, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="never")
    tok.add_special_tokens(SPECIAL + IMAGE)
    tok.add_tokens(WORDS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>", chat_template=CHAT_TEMPLATE)


def write_init(out: Path, seed: int = 0, **overrides) -> Path:
    """A randomly initialised checkpoint (transformers' own init) with the tokenizer and configs.
    ``overrides`` replace entries of TEXT_CONFIG (architecture probes)."""
    import torch
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    text = dict(TEXT_CONFIG, **overrides)
    config = DiffusionGemmaConfig(
        text_config=text, vision_config=VISION_CONFIG, canvas_length=CANVAS_LENGTH,
        image_token_id=VOCAB.index("<|image|>"), boi_token_id=VOCAB.index("<|image>"),
        eoi_token_id=VOCAB.index("<image|>"),
    )
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(config).eval()
    out = Path(out)
    model.save_pretrained(out)
    build_tokenizer().save_pretrained(out)
    config_file = out / "config.json"
    config_json = json.loads(config_file.read_text())
    config_json[TASK_KEY] = TASK
    config_file.write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")
    (out / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
    return out


def parse_overrides(items) -> dict:
    """``KEY=JSON`` strings as text-config overrides; ValueError names the bad one."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in TEXT_CONFIG:
            raise ValueError(f"{item!r}: not KEY=JSON with KEY one of the text config's entries")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{item!r}: the value is not JSON ({e.msg})") from None
    return overrides


def hf_key(key: str) -> str:
    """The Hugging Face name of one of our parameters (``Model.sanitize`` inverted)."""
    if key.endswith(("experts.gate_up_proj.weight", "experts.down_proj.weight")):
        return key[: -len(".weight")]
    return key


def export(init: Path, weights: Dict[str, "object"], out: Path) -> Path:
    """``init`` with its text weights replaced by ``weights`` (our parameter
    names, as ``Model.parameters()`` flattens them): the trained model in the
    layout ``init`` has, vision tower and all."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    init, out = Path(init), Path(out)
    tensors = load_file(str(init / "model.safetensors"))
    unknown = []
    for key, value in weights.items():
        name = hf_key(key)
        if name not in tensors:
            unknown.append(key)
            continue
        array = np.asarray(value, dtype=tensors[name].dtype)
        if array.shape != tensors[name].shape:
            raise ValueError(f"{key}: shape {array.shape}, the checkpoint has {tensors[name].shape}")
        tensors[name] = array
    if unknown:
        raise ValueError(f"not in {init}: {', '.join(unknown[:5])}")
    out.mkdir(parents=True, exist_ok=True)
    for file in init.iterdir():
        if file.is_file() and file.name != "model.safetensors":
            shutil.copy(file, out / file.name)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def main():
    parser = argparse.ArgumentParser(description="Write the Sudoku model's checkpoint.")
    sub = parser.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init", help="a random init")
    init.add_argument("out", type=Path)
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                      help="override a text_config entry, e.g. --set num_hidden_layers=4")
    exp = sub.add_parser("export", help="trained MLX weights into the init's layout")
    exp.add_argument("init", type=Path)
    exp.add_argument("weights", type=Path, help="safetensors of our parameter names")
    exp.add_argument("out", type=Path)
    args = parser.parse_args()
    if args.command == "init":
        try:
            overrides = parse_overrides(args.set)
        except ValueError as e:
            parser.error(str(e))
        print(write_init(args.out, args.seed, **overrides))
    else:
        from safetensors.numpy import load_file

        print(export(args.init, load_file(str(args.weights)), args.out))


if __name__ == "__main__":
    main()
