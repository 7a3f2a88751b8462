"""The MLX model against transformers' DiffusionGemma, in float32.

Each test walks the reference's own sequence of calls: encode a prompt longer
than the sliding window, denoise a canvas, denoise again with
self-conditioning, commit the block (encode it) and denoise the next block.
"""

import mlx.core as mx
import numpy as np
import pytest
import torch
from transformers import DiffusionGemmaForBlockDiffusion, DynamicCache

from mlx_diffgemma.cache import SlidingWindowCache
from mlx_diffgemma.loader import load_model

TOLERANCE = 1e-4  # max |error| relative to max |logit|
PROMPT_LENGTH = 11  # longer than every tiny sliding window


def relative_error(ours, reference: torch.Tensor) -> float:
    reference = reference.float().numpy()
    return float(np.abs(np.array(ours, dtype=np.float32) - reference).max() / np.abs(reference).max())


def positions(start, length, batch):
    return torch.arange(start, start + length)[None].expand(batch, -1)


def run_both(checkpoint, batch=2, seed=1, mlx_model=None):
    """Yield (stage, our logits, reference logits) through two blocks."""
    reference = DiffusionGemmaForBlockDiffusion.from_pretrained(checkpoint).eval()
    model = mlx_model or load_model(checkpoint)[0]
    vocab, length = reference.config.text_config.vocab_size, reference.config.canvas_length
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (batch, PROMPT_LENGTH), generator=g)
    canvases = [torch.randint(0, vocab, (batch, length), generator=g) for _ in range(3)]
    P = PROMPT_LENGTH

    ref_cache = DynamicCache(config=reference.config.text_config)
    cache = model.make_cache()
    with torch.no_grad():
        first = reference(input_ids=prompt, cache=ref_cache, position_ids=positions(0, P, batch),
                          decoder_input_ids=canvases[0], decoder_position_ids=positions(P, length, batch))
    model.encode(mx.array(prompt.numpy()), cache)
    yield "encoder cache", cache, ref_cache
    yield "first step", model.denoise(mx.array(canvases[0].numpy()), cache), first.logits

    processed = first.logits / 0.7  # self-conditioning takes the temperature-divided logits
    with torch.no_grad():
        second = reference(cache=ref_cache, decoder_input_ids=canvases[1], self_conditioning_logits=processed,
                           decoder_position_ids=positions(P, length, batch))
    ours = model.denoise(mx.array(canvases[1].numpy()), cache, mx.array(processed.numpy()))
    yield "self-conditioned step", ours, second.logits

    block = second.logits.argmax(-1)
    with torch.no_grad():
        third = reference(input_ids=block, cache=ref_cache, position_ids=positions(P, length, batch),
                          decoder_input_ids=canvases[2], decoder_position_ids=positions(P + length, length, batch))
    model.encode(mx.array(block.numpy()), cache)
    yield "next block", model.denoise(mx.array(canvases[2].numpy()), cache), third.logits


def max_error(checkpoint, **kw):
    errors = {}
    for stage, ours, ref in run_both(checkpoint, **kw):
        if stage == "encoder cache":
            continue
        errors[stage] = relative_error(ours, ref)
    return errors


@pytest.mark.parametrize("config", ["two_layer", "four_layer", "quantizable"])
@pytest.mark.parametrize("batch", [1, 2])
def test_logits_match_reference(make_checkpoint, config, batch):
    errors = max_error(make_checkpoint(config), batch=batch)
    print(config, batch, {k: f"{v:.2e}" for k, v in errors.items()})
    assert max(errors.values()) <= TOLERANCE, errors


def test_encoder_cache_matches_reference(make_checkpoint):
    stages = run_both(make_checkpoint("four_layer"))
    _, cache, ref_cache = next(stages)
    for i, (ours, ref) in enumerate(zip(cache, ref_cache.layers)):
        keys, values = ours.cached_kv()
        assert keys.shape == tuple(ref.keys.shape), f"layer {i}"
        assert relative_error(keys, ref.keys) < TOLERANCE
        assert relative_error(values, ref.values) < TOLERANCE
    # Sliding layers keep window - 1 positions, full layers all of them.
    assert cache[0].cached_kv()[0].shape[2] == 5 and cache[1].cached_kv()[0].shape[2] == PROMPT_LENGTH


# Negative controls: plausible porting mistakes must break parity, or the test above proves nothing.

def test_keeping_the_whole_window_breaks_parity(make_checkpoint, monkeypatch):
    checkpoint = make_checkpoint("two_layer")
    model, _ = load_model(checkpoint)
    window = model.args.sliding_window
    monkeypatch.setattr(model, "make_cache", lambda: [
        SlidingWindowCache(window) if t == "sliding_attention" else c
        for t, c in zip(model.args.layer_types, type(model).make_cache(model))
    ])
    errors = max_error(checkpoint, mlx_model=model)
    assert errors["first step"] > 100 * TOLERANCE, errors


def test_one_plus_w_norms_break_parity(make_checkpoint):
    checkpoint = make_checkpoint("two_layer")
    model, _ = load_model(checkpoint)
    for _, module in model.named_modules():
        if type(module).__name__ == "RMSNorm":
            module.weight = module.weight + 1
    errors = max_error(checkpoint, mlx_model=model)
    assert errors["first step"] > 100 * TOLERANCE, errors


def test_swapped_layer_scalars_break_parity(make_checkpoint):
    checkpoint = make_checkpoint("two_layer")
    model, _ = load_model(checkpoint)
    encoder = model.model.encoder.language_model.layers
    for enc, dec in zip(encoder, model.model.decoder.layers):
        enc.layer_scalar, dec.layer_scalar = dec.layer_scalar, enc.layer_scalar
    errors = max_error(checkpoint, mlx_model=model)
    assert errors["first step"] > 100 * TOLERANCE, errors
