"""The Python examples of mlx-lm's README and its batch example, with
``mlx_lm`` replaced by ``mlx_diffgemma`` and nothing else changed, on a tiny
checkpoint; then what mlx-lm users type that this sampler reads differently."""

import mlx.core as mx
import pytest

from mlx_diffgemma import batch_generate, generate, load, stream_blocks, stream_generate
from mlx_diffgemma.engine import Draft
from mlx_diffgemma.generate import Block, GenerationResponse


@pytest.fixture(scope="module")
def checkpoint(make_checkpoint):
    # Two steps per block keep the README's 512 tokens quick.
    return str(make_checkpoint("two_layer", generation_config={"max_denoising_steps": 2, "eos_token_id": [1, 106]}))


def test_readme_generate(checkpoint, capsys):
    model, tokenizer = load(checkpoint)

    prompt = "Write a story about Einstein"

    messages = [{"role": "user", "content": prompt}]
    prompt = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True,
    )

    mx.random.seed(0)
    text = generate(model, tokenizer, prompt=prompt, verbose=True)

    out = capsys.readouterr().out
    assert isinstance(text, str) and text in out
    assert out.startswith("=" * 10) and "Prompt: " in out and "Generation: " in out and "Peak memory: " in out
    mx.random.seed(0)
    assert batch_generate(model, tokenizer, prompt).text == text


def test_readme_stream_generate(checkpoint, capsys):
    repo = checkpoint
    model, tokenizer = load(repo)

    prompt = "Write a story about Einstein"

    messages = [{"role": "user", "content": prompt}]
    prompt = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True,
    )

    mx.random.seed(1)
    for response in stream_generate(model, tokenizer, prompt, max_tokens=512):
        print(response.text, end="", flush=True)
    print()

    streamed = capsys.readouterr().out
    assert isinstance(response, GenerationResponse) and response.finish_reason in ("stop", "length")
    assert 0 < response.generation_tokens <= 512 and response.prompt_tokens == len(prompt)
    assert response.prompt_tps > 0 and response.generation_tps > 0 and response.peak_memory > 0
    mx.random.seed(1)
    result = batch_generate(model, tokenizer, prompt, max_tokens=512)
    assert streamed == result.text + "\n" and response.generation_tokens == result.generation_tokens


def test_batch_example(checkpoint, capsys):
    model, tokenizer = load(path_or_hf_repo=checkpoint)

    prompts = [
        "Write a story about Einstein.",
        "Why is the sky blue?",
        "What time is it?",
        "How tall is Mt Everest?",
    ]

    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}],
            add_generation_prompt=True,
        )
        for p in prompts
    ]

    response = batch_generate(model, tokenizer, prompts, verbose=True, max_tokens=128)

    assert len(response.texts) == 4 and response.stats.prompt_tokens == sum(map(len, prompts))
    assert all(len(t) <= 128 for t in response.tokens)
    assert "Generation: " in capsys.readouterr().out


def test_drafts_come_from_stream_blocks(checkpoint):
    model, tokenizer = load(checkpoint)
    events = list(stream_blocks(model, tokenizer, "hi", max_tokens=16, seed=0))
    assert {type(e) for e in events} == {Draft, Block}
    responses = list(stream_generate(model, tokenizer, "hi", max_tokens=16, seed=0))
    assert [r.text for r in responses] == [e.text for e in events if isinstance(e, Block)]


def test_max_tokens_is_exact_and_may_differ_per_prompt(checkpoint):
    model, tokenizer = load(checkpoint)
    result = batch_generate(model, tokenizer, ["a", "b"], max_tokens=[5, 11], eos_token_id=[], seed=0)
    assert result.generation_tokens == 16 and result.finish_reasons == ["length", "length"]
    responses = list(stream_generate(model, tokenizer, "a", 5, eos_token_id=[], seed=0))
    assert sum(len(r.tokens) for r in responses) == responses[-1].generation_tokens == 5
    # transformers' name says the same.
    assert generate(model, tokenizer, "a", max_new_tokens=5, seed=0) == generate(model, tokenizer, "a", 5, seed=0)


def test_temp_is_a_constant_temperature(checkpoint):
    model, tokenizer = load(checkpoint)
    options = dict(max_tokens=16, seed=4)
    constant = batch_generate(model, tokenizer, "x", temp=0.6, **options)
    assert constant.tokens == batch_generate(model, tokenizer, "x", t_min=0.6, t_max=0.6, **options).tokens
    assert constant.tokens != batch_generate(model, tokenizer, "x", temp=1.5, **options).tokens


@pytest.mark.parametrize("keyword, message", [
    ("max_token", r"unexpected options: max_token \(did you mean max_tokens\?\)"),
    ("entropy_bund", r"did you mean entropy_bound\?"),
    ("sampler", r"sampler \(a per-token sampler; .*set temp="),
    ("logits_processors", r"logits_processors \(per-token logits processors do not apply"),
    ("prompt_cache", r"use cache="),
])
def test_unknown_keywords_get_a_hint(checkpoint, keyword, message):
    model, tokenizer = load(checkpoint)
    with pytest.raises(TypeError, match=message):
        generate(model, tokenizer, "x", **{keyword: 1})


def test_one_prompt_functions_refuse_a_batch(checkpoint):
    model, tokenizer = load(checkpoint)
    with pytest.raises(TypeError, match="use batch_generate"):
        generate(model, tokenizer, ["a", "b"])
    with pytest.raises(TypeError, match="use stream_blocks"):
        next(stream_generate(model, tokenizer, [[3, 4], [5, 6]]))
