"""Tiny DiffusionGemma checkpoints in real Hugging Face format, made with transformers.

Weights are O(1) and every norm weight and layer scalar is moved away from 1,
so no module is silently an identity. Run as a script to write one:

    python tests/tiny_checkpoints.py OUT_DIR [--config NAME] [--dtype float32|bfloat16]
"""

import argparse
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion, PreTrainedTokenizerFast

from mlx_diffgemma.sudoku.checkpoint import VISION_CONFIG

_ROPE = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
    "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6},
}

# Window 4 is shorter than the test prompts, so the W-1 sliding cache matters.
CONFIGS = {
    "two_layer": dict(
        vocab_size=128, hidden_size=32, intermediate_size=48, moe_intermediate_size=8,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        global_head_dim=16, num_global_key_value_heads=1, num_experts=4, top_k_experts=2,
        sliding_window=4, layer_types=["sliding_attention", "full_attention"],
    ),
    "four_layer": dict(
        vocab_size=160, hidden_size=48, intermediate_size=40, moe_intermediate_size=12,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        global_head_dim=32, num_global_key_value_heads=2, num_experts=8, top_k_experts=3,
        sliding_window=6,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    ),
    # Every matrix's input width is a multiple of 64, so all of them quantize at group size 32 or 64.
    "quantizable": dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        global_head_dim=32, num_global_key_value_heads=1, num_experts=8, top_k_experts=2,
        sliding_window=6, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
    ),
}


# Gemma 4's special tokens at their real ids (all below the tiny vocab sizes).
SPECIAL_TOKENS = {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 48: "<|tool_call>", 49: "<tool_call|>",
                  50: "<|tool_response>", 100: "<|channel>", 101: "<channel|>", 105: "<|turn>",
                  106: "<turn|>", 107: "\n"}
# The last few spell Gemma 4's tool calls (call:name{key:<|"|>value<|"|>}); they take ids that were unused.
_CHARS = list("\u2581abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-:;(){}<>|\"_")
# Gemma 4's non-thinking chat format, reduced to what the tiny vocabulary can spell.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] }}<turn|>\n{% endfor %}{% if add_generation_prompt %}<|turn>model\n"
    "{% if not enable_thinking %}<|channel>thought\n<channel|>{% endif %}{% endif %}"
)


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A character-level tokenizer over ``vocab_size`` ids with Gemma 4's special ids."""
    vocab, chars = {}, iter(_CHARS)
    for i in range(vocab_size):
        token = SPECIAL_TOKENS.get(i) or next(chars, None) or f"<unused{i}>"
        vocab[token] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="never")
    specials = [t for i, t in SPECIAL_TOKENS.items() if t != "\n"]
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>", chat_template=CHAT_TEMPLATE)


def build_model(config: str = "two_layer", seed: int = 0, canvas_length: int = 8, **overrides):
    text = dict(CONFIGS[config], max_position_embeddings=4096, rms_norm_eps=1e-6,
                final_logit_softcapping=30.0, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                use_bidirectional_attention="vision", hidden_activation="gelu_pytorch_tanh",
                tie_word_embeddings=True, rope_parameters=_ROPE)
    text.update(overrides)
    vocab = text["vocab_size"]
    cfg = DiffusionGemmaConfig(text_config=text, vision_config=VISION_CONFIG, canvas_length=canvas_length,
                               image_token_id=vocab - 1, boi_token_id=vocab - 3, eoi_token_id=vocab - 2)
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(cfg).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vision" in name:
                continue
            if p.ndim == 1 or name.endswith("per_expert_scale"):
                p.copy_(0.5 + torch.rand(p.shape, generator=generator))
            else:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=generator) * fan_in**-0.5 * 2.0)
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(0.5 + torch.rand(b.shape, generator=generator))
    return model


def write_checkpoint(out: Path, config: str = "two_layer", dtype: str = "float32", seed: int = 0,
                     generation_config: dict = None, damping: float = None, **overrides) -> Path:
    """``damping`` scales the attention and feed-forward outputs (through their
    post-norms) and the self-conditioning branch. The undamped random
    checkpoints are chaotic: every step's argmax differs from the last, so
    stable-and-confident stopping never fires, and a 1e-6 difference between
    two implementations grows tenfold a step. Damped ones settle, so blocks
    stop early, at different steps for different rows."""
    model = build_model(config, seed=seed, **overrides)
    if damping is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("post_attention_layernorm.weight", "post_feedforward_layernorm.weight",
                                  "self_conditioning.down_proj.weight")):
                    p.mul_(damping)
    model = model.to(getattr(torch, dtype))
    out = Path(out)
    model.save_pretrained(out)
    build_tokenizer(model.config.text_config.vocab_size).save_pretrained(out)
    if generation_config is not None:
        (out / "generation_config.json").write_text(json.dumps(generation_config, indent=2))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--config", default="two_layer", choices=sorted(CONFIGS))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    print(write_checkpoint(Path(args.out), args.config, args.dtype))


if __name__ == "__main__":
    main()
