"""The fine-tuning objective against an independent torch computation on
transformers' DiffusionGemmaForBlockDiffusion, in float32.

The reference side computes every canvas on its own: a fresh cache, the
encoder over the canvas's context (prompt plus the answer's earlier canvases),
the model's own decoder with its own self-conditioning path, and the encoder
over the whole row for the autoregressive term. Both sides get the same
corruption and self-conditioning draws.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mlx.utils import tree_flatten
from mlx_lm.tuner.utils import linear_to_lora_layers
from transformers import DiffusionGemmaForBlockDiffusion, DynamicCache

from mlx_diffgemma.loader import load_model
from mlx_diffgemma.tuner.batches import Example, collate
from mlx_diffgemma.tuner.losses import Draws, Objective, draw

LOSS_TOLERANCE = 1e-5
GRAD_TOLERANCE = 1e-4
LORA_KEYS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
TEMPERATURE = 0.7


def examples(vocab, canvas_length, seed=3):
    """Row 0: a context longer than the sliding window and a two-canvas answer
    whose last canvas ends in pad; row 1: a one-canvas answer."""
    rng = np.random.default_rng(seed)
    tokens = lambda n: rng.integers(3, vocab, n).tolist()
    long_answer = tokens(canvas_length + canvas_length // 2) + [1]
    return [Example(tokens(11), long_answer), Example(tokens(5), tokens(canvas_length - 3) + [1])]


def fixed_draws(batch, vocab, self_condition, seed=5):
    rng = np.random.default_rng(seed)
    B, (N, L) = batch.tokens.shape[0], batch.canvas_targets.shape
    t = rng.uniform(0.2, 0.9, B).astype(np.float32)
    replace = rng.uniform(size=(N, L)) < t[np.array(batch.canvas_rows)][:, None]
    return Draws(mx.array(t), mx.array(replace), mx.array(rng.integers(0, vocab, (N, L)).astype(np.int32)),
                 mx.array(np.array(self_condition)))


def softcapped(reference, hidden):
    cap = reference.config.text_config.final_logit_softcapping
    return torch.tanh(reference.lm_head(hidden).float() / cap) * cap


def reference_loss(reference, batch, draws, *, encoder_loss_weight=1.0, temperature=TEMPERATURE,
                   score="all", weight_by_t=False, context="committed"):
    """The objective in torch, one canvas at a time; the keyword arguments
    other than the first two select deliberately wrong variants."""
    tokens = np.array(batch.tokens)
    targets, mask = np.array(batch.canvas_targets), np.array(batch.canvas_mask)
    rows, starts = np.array(batch.canvas_rows), np.array(batch.canvas_context)
    replace = np.array(draws.replace)
    canvas = np.where(replace, np.array(draws.noise), targets)
    t, chosen = np.array(draws.noise_level), np.array(draws.self_condition)
    L = targets.shape[1]

    decoder_sum, decoder_count = 0.0, 0
    for n in range(len(rows)):
        row, start = rows[n], int(starts[n])
        prompt_length = int(starts[rows == row].min())
        seen = start if context == "committed" else prompt_length
        cache = DynamicCache(config=reference.config.text_config)
        reference.model.encoder(input_ids=torch.tensor(tokens[row : row + 1, :seen]).long(), cache=cache,
                                position_ids=torch.arange(seen)[None])
        kwargs = dict(cache=cache, decoder_input_ids=torch.tensor(canvas[n : n + 1]).long(),
                      decoder_position_ids=torch.arange(start, start + L)[None])
        sc = None
        if chosen[row]:
            with torch.no_grad():
                first = softcapped(reference, reference.model.decoder(**kwargs).last_hidden_state)
            sc = first / temperature
        hidden = reference.model.decoder(**kwargs, self_conditioning_logits=sc).last_hidden_state
        ce = F.cross_entropy(softcapped(reference, hidden)[0], torch.tensor(targets[n]).long(), reduction="none")
        scored = {"all": mask[n], "corrupted": mask[n] & replace[n], "with pad": np.ones_like(mask[n])}[score]
        scored = torch.tensor(scored)
        weight = 1 / float(t[row]) if weight_by_t else 1.0
        decoder_sum = decoder_sum + (ce * scored).sum() * weight
        decoder_count += int(scored.sum())
    loss = decoder_sum / decoder_count

    if encoder_loss_weight:
        positions, ar_targets, ar_mask = (np.array(a) for a in (batch.ar_positions, batch.ar_targets, batch.ar_mask))
        encoder_sum, encoder_count = 0.0, 0
        for row in range(tokens.shape[0]):
            n = int(ar_mask[row].sum())
            length = int(positions[row, n - 1]) + 2  # the row's context and answer
            ids = torch.tensor(tokens[row : row + 1, :length]).long()
            hidden = reference.model.encoder(input_ids=ids, cache=DynamicCache(config=reference.config.text_config),
                                             position_ids=torch.arange(length)[None]).last_hidden_state
            logits = softcapped(reference, hidden)[0, torch.tensor(positions[row, :n]).long()]
            encoder_sum = encoder_sum + F.cross_entropy(logits, torch.tensor(ar_targets[row, :n]).long(),
                                                        reduction="sum")
            encoder_count += n
        loss = loss + encoder_loss_weight * encoder_sum / encoder_count
    return loss


def relative(ours, reference) -> float:
    ours, reference = np.array(ours, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    return float(np.abs(ours - reference).max() / max(np.abs(reference).max(), 1e-30))


@pytest.fixture(scope="module")
def setup(make_checkpoint):
    checkpoint = make_checkpoint("four_layer")
    reference = DiffusionGemmaForBlockDiffusion.from_pretrained(checkpoint).eval()
    model, _ = load_model(checkpoint)
    vocab, L = model.args.vocab_size, model.args.canvas_length
    batch = collate(examples(vocab, L), L, pad_token_id=0)
    return reference, model, batch


def our_loss(model, batch, draws, **settings):
    objective = Objective(**{"self_conditioning_temperature": TEMPERATURE, **settings})
    return objective(model, batch, draws)[0].item()


def test_the_batch_has_a_two_canvas_answer_and_pad(setup):
    _, _, batch = setup
    assert np.array(batch.canvas_rows).tolist() == [0, 0, 1]
    assert not np.array(batch.canvas_mask)[1].all() and np.array(batch.canvas_mask)[0].all()


@pytest.mark.parametrize("self_condition", [[False, False], [True, True], [True, False]])
@pytest.mark.parametrize("encoder_loss_weight", [0.0, 1.0, 0.3])
def test_loss_matches_reference(setup, self_condition, encoder_loss_weight):
    reference, model, batch = setup
    draws = fixed_draws(batch, model.args.vocab_size, self_condition)
    with torch.no_grad():
        expected = reference_loss(reference, batch, draws, encoder_loss_weight=encoder_loss_weight).item()
    ours = our_loss(model, batch, draws, encoder_loss_weight=encoder_loss_weight)
    print(self_condition, encoder_loss_weight, ours, expected)
    assert relative(ours, expected) <= LOSS_TOLERANCE


def test_grad_checkpointing_gives_the_same_loss(setup):
    _, model, batch = setup
    draws = fixed_draws(batch, model.args.vocab_size, [True, False])
    assert relative(our_loss(model, batch, draws, grad_checkpoint=True), our_loss(model, batch, draws)) <= 1e-6


# Negative controls: the objectives the reference recipe is not must fail the comparison.
@pytest.mark.parametrize("variant", [
    dict(score="corrupted"),  # scoring only the corrupted positions
    dict(score="with pad"),  # scoring the pad after the answer's end
    dict(weight_by_t=True),  # the absorbing-kernel 1/t weight
    dict(temperature=1.0),  # self-conditioning on the raw logits
    dict(context="prompt only"),  # a second canvas that does not see the first
    dict(encoder_loss_weight=0.0),  # no encoder term
])
def test_wrong_objectives_fail(setup, variant):
    reference, model, batch = setup
    draws = fixed_draws(batch, model.args.vocab_size, [True, True])
    with torch.no_grad():
        wrong = reference_loss(reference, batch, draws, **variant).item()
    assert relative(our_loss(model, batch, draws), wrong) > 100 * LOSS_TOLERANCE, variant


def test_draws_follow_the_recipe(setup):
    _, model, batch = setup
    big = collate([Example([5], list(range(3, 3 + 64 * 8)) + [1])] * 64, 8, 0)
    d = draw(big, model.args.vocab_size, 0.5, key=mx.random.key(0))
    t = np.array(d.noise_level)
    assert t.min() >= 0.001 and t.max() < 1
    replaced = np.array(d.replace).reshape(64, -1).mean(axis=1)
    assert np.abs(replaced - t).max() < 0.1  # each position independently with probability t
    noise = np.array(d.noise)
    assert noise.min() >= 0 and noise.max() < model.args.vocab_size and len(np.unique(noise)) > 100
    assert 0.3 < np.array(d.self_condition).mean() < 0.7


def _lora_pair(checkpoint, rank=4, scale=2.0, seed=0):
    """Our model with LoRA on every layer's attention and dense MLP, and the
    reference with the same LoRA (same A and B, non-zero) on the same modules,
    the encoder's and the decoder's, which share their weights."""
    reference = DiffusionGemmaForBlockDiffusion.from_pretrained(checkpoint).eval()
    model, _ = load_model(checkpoint)
    model.freeze()
    linear_to_lora_layers(model, len(model.layers), {"rank": rank, "scale": scale, "dropout": 0.0,
                                                     "keys": LORA_KEYS})
    rng = np.random.default_rng(seed)
    torch_params = {}
    text = reference.model
    for i, layer in enumerate(model.layers):
        for key in LORA_KEYS:
            parent, name = key.split(".")
            lora = getattr(getattr(layer, parent), name, None)
            if lora is None:
                continue
            lora.lora_a = mx.array(rng.normal(0, 0.3, lora.lora_a.shape).astype(np.float32))
            lora.lora_b = mx.array(rng.normal(0, 0.3, lora.lora_b.shape).astype(np.float32))
            A = torch.nn.Parameter(torch.tensor(np.array(lora.lora_a)))
            B = torch.nn.Parameter(torch.tensor(np.array(lora.lora_b)))
            torch_params[f"model.decoder.layers.{i}.{key}"] = (A, B)
            for stack in (text.decoder.layers[i], text.encoder.language_model.layers[i]):
                linear = getattr(getattr(stack, parent), name)
                linear.forward = lambda x, linear=linear, A=A, B=B: F.linear(x, linear.weight) + scale * (x @ A) @ B
    for p in reference.parameters():
        p.requires_grad_(False)
    return model, reference, torch_params


@pytest.mark.parametrize("self_condition", [[True, False], [False, False]])
def test_lora_gradients_match_torch_autograd(make_checkpoint, self_condition):
    # Two layers: on the chaotic four-layer checkpoint torch's own float32
    # gradients differ from its float64 ones by 2e-4, above the tolerance.
    model, reference, torch_params = _lora_pair(make_checkpoint("two_layer"))
    L = model.args.canvas_length
    batch = collate(examples(model.args.vocab_size, L), L, pad_token_id=0)
    draws = fixed_draws(batch, model.args.vocab_size, self_condition)
    objective = Objective(self_conditioning_temperature=TEMPERATURE)
    model.train()
    (loss, *_), grads = nn.value_and_grad(model, lambda m: objective(m, batch, draws))(model)
    grads = dict(tree_flatten(grads))
    expected = reference_loss(reference, batch, draws)
    expected.backward()
    assert relative(loss.item(), expected.item()) <= LOSS_TOLERANCE
    worst = 0.0
    for path, (A, B) in torch_params.items():
        for ours, theirs in ((grads[f"{path}.lora_a"], A.grad), (grads[f"{path}.lora_b"], B.grad)):
            worst = max(worst, relative(ours, theirs.numpy()))
    print("worst relative gradient error", worst)
    assert set(grads) == {f"{p}.{leaf}" for p in torch_params for leaf in ("lora_a", "lora_b")}
    assert worst <= GRAD_TOLERANCE


def test_full_fine_tune_gradients_match_torch_autograd(make_checkpoint):
    """Every text weight (the embedding tied to the head, router, experts,
    self-conditioning, norms), as ``--fine-tune-type full`` trains them."""
    checkpoint = make_checkpoint("two_layer")
    reference = DiffusionGemmaForBlockDiffusion.from_pretrained(checkpoint).eval()
    model, _ = load_model(checkpoint)
    L = model.args.canvas_length
    batch = collate(examples(model.args.vocab_size, L), L, pad_token_id=0)
    draws = fixed_draws(batch, model.args.vocab_size, [True, False])
    objective = Objective(self_conditioning_temperature=TEMPERATURE)
    model.train()
    _, grads = nn.value_and_grad(model, lambda m: objective(m, batch, draws)[0])(model)
    grads = dict(tree_flatten(grads))
    reference_loss(reference, batch, draws).backward()
    compared = 0
    for name, p in reference.named_parameters(remove_duplicate=False):
        if "vision" in name or name.startswith("model.encoder.") or name == "lm_head.weight":
            continue  # the encoder's text weights are the decoder's; the head is the embedding
        key = name + ".weight" if name.endswith(("experts.gate_up_proj", "experts.down_proj")) else name
        ours, theirs = np.array(grads[key]), p.grad.numpy()
        if name == "model.decoder.embed_tokens.weight":
            # torch's nn.Embedding(padding_idx=pad) drops the gradient of pad lookups; we keep it.
            ours, theirs = ours[1:], theirs[1:]
        assert relative(ours, theirs) <= GRAD_TOLERANCE, name
        compared += 1
    assert compared >= 40
