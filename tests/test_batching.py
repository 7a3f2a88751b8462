"""Batched generation: prompts of different lengths, rows finishing at different
blocks, continuous batching. Every row must come out exactly as it does alone
with the same noise."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_diffgemma import batch_generate, load, stream_blocks
from mlx_diffgemma.generate import Block, Draft
from mlx_diffgemma.memory import DEFAULT_MAX_BATCH, InsufficientMemory, generation_plan

PROMPT_LENGTHS = [3, 12, 7, 9, 5]  # around the sliding windows (4 and 6)
OPTIONS = dict(max_new_tokens=24, max_denoising_steps=6, entropy_bound=0.5, confidence_threshold=0.5,
               pad_token_id=0)


class PromptNoise:
    """Draws keyed by (prompt, block, step), so a prompt gets the same noise
    whichever batch row it occupies and whoever shares the batch."""

    def __init__(self, keys):
        self.keys = keys  # batch row -> prompt key

    def _rng(self, row, block, step, kind):
        return np.random.default_rng([self.keys[row], block, step, kind])

    def canvas(self, rows, length, vocab_size, *, block, step):
        return mx.array(np.stack([self._rng(r, block, step, 0).integers(0, vocab_size, length) for r in rows]))

    def proposal(self, logits, rows, *, block, step):
        gumbel = np.stack([self._rng(r, block, step, 1).gumbel(size=logits.shape[1:]) for r in rows])
        return mx.argmax(logits + mx.array(gumbel.astype(np.float32)), axis=-1)


@pytest.fixture(scope="module")
def model_and_tokenizer(make_checkpoint):
    return load(make_checkpoint("four_layer", damping=0.3))


def prompts(vocab):
    rng = np.random.default_rng(7)
    return [rng.integers(3, vocab, n).tolist() for n in PROMPT_LENGTHS]


def alone(model, tokenizer, batch, **options):
    return [batch_generate(model, tokenizer, [p], noise=PromptNoise([key]), **OPTIONS, **options)
            for key, p in enumerate(batch)]


def pick_eos(result, row, block, position, length):
    return result.tokens[row][block * length + position]


def assert_rows_match(batched, singles):
    for row, single in enumerate(singles):
        assert batched.tokens[row] == single.tokens[0], f"row {row}"
        assert batched.steps_per_block[row] == single.steps_per_block[0], f"row {row}"
        assert batched.finish_reasons[row] == single.finish_reasons[0]
        assert batched.tokens_per_forward[row] == pytest.approx(single.tokens_per_forward[0])


def rows_ending_apart(model, tokenizer):
    """The prompts, end-of-sequence ids that end rows 0 and 2 at different
    blocks through tokens they really produce, and each row generated alone."""
    batch = prompts(model.args.vocab_size)
    singles = alone(model, tokenizer, batch, eos_token_id=[])
    L = model.args.canvas_length
    eos = [pick_eos(singles[0], 0, 0, 2, L), pick_eos(singles[2], 0, 1, 5, L)]
    singles = alone(model, tokenizer, batch, eos_token_id=eos)
    ends = [len(s.tokens[0]) // L for s in singles]
    assert len(set(ends)) > 1, "the rows should finish at different blocks"
    steps = {s for single in singles for s in single.steps_per_block[0]}
    assert len(steps) > 1, "blocks should stop after different numbers of steps"
    return batch, eos, singles


def test_padded_batch_is_per_row_identical(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    batch, eos, singles = rows_ending_apart(model, tokenizer)
    batched = batch_generate(model, tokenizer, batch, noise=PromptNoise(range(len(batch))), eos_token_id=eos, **OPTIONS)
    assert_rows_match(batched, singles)


def test_logits_are_computed_a_few_rows_at_a_time_when_they_do_not_fit(model_and_tokenizer):
    """A memory limit with room for every canvas but only two canvases' logits."""
    model, tokenizer = model_and_tokenizer
    batch, eos, singles = rows_ending_apart(model, tokenizer)
    memory = generation_plan(model, map(len, batch), OPTIONS["max_new_tokens"], memory_limit=1 << 40)
    limit = memory.peak(len(batch), 2) + memory.logits_per_canvas // 2

    seen = []
    # The vocabulary projection: host_logits on the CPU, logits elsewhere.
    projections = {name: getattr(model, name) for name in ("logits", "host_logits")}
    for name, projection in projections.items():
        setattr(model, name, lambda hidden, projection=projection: seen.append(hidden.shape[0]) or projection(hidden))
    try:
        batched = batch_generate(model, tokenizer, batch, noise=PromptNoise(range(len(batch))), eos_token_id=eos,
                           memory_limit=limit, **OPTIONS)
    finally:
        for name in projections:
            delattr(model, name)
    assert max(seen) == 2 and seen[:3] == [2, 2, 1], "all five canvases, their logits two at a time"
    assert_rows_match(batched, singles)


def test_continuous_batching_keeps_the_batch_full(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    batch = prompts(model.args.vocab_size)
    L = model.args.canvas_length
    singles = alone(model, tokenizer, batch, eos_token_id=[])
    eos = [pick_eos(singles[1], 0, 0, 1, L)]  # row 1 ends in its first block
    singles = alone(model, tokenizer, batch, eos_token_id=eos)

    events = list(stream_blocks(model, tokenizer, batch, noise=PromptNoise(range(len(batch))),
                                  eos_token_id=eos, max_batch=2, **OPTIONS))
    blocks = [e for e in events if isinstance(e, Block)]
    # Two canvases at a time while prompts wait; a row that ends frees its slot at the next block.
    waiting = len(batch)
    for block in blocks:
        assert len(block.rows) == min(2, waiting) or waiting <= 2
        waiting -= sum(reason is not None for reason in block.finish_reasons)
    joined_late = [b for b in blocks if 0 in b.row_blocks and b.round > 0]
    assert joined_late, "a waiting prompt should start while another row is mid-generation"
    assert max(len(e.rows) for e in events if isinstance(e, Draft)) == 2

    batched = batch_generate(model, tokenizer, batch, noise=PromptNoise(range(len(batch))), eos_token_id=eos,
                       max_batch=2, **OPTIONS)
    assert_rows_match(batched, singles)


def test_default_batch_is_what_fits_and_at_most_the_cap(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    rng = np.random.default_rng(3)
    many = [rng.integers(3, model.args.vocab_size, 6).tolist() for _ in range(DEFAULT_MAX_BATCH + 2)]
    options = dict(OPTIONS, max_new_tokens=8, eos_token_id=[])

    def widest(**kwargs):
        events = stream_blocks(model, tokenizer, many, noise=PromptNoise(range(len(many))), **options, **kwargs)
        return max(len(e.rows) for e in events if isinstance(e, Draft))

    assert widest() == DEFAULT_MAX_BATCH
    assert widest(max_batch=len(many)) == len(many)
    memory = generation_plan(model, [6], options["max_new_tokens"], memory_limit=1 << 40)
    assert widest(memory_limit=memory.peak(3, 1) + (memory.kv_per_prompt + memory.per_canvas) // 2) == 3


def test_chat_cache_continues_a_conversation(model_and_tokenizer):
    """``cache=`` appends to an existing cache: same result as encoding everything at once."""
    model, tokenizer = model_and_tokenizer
    first, second = prompts(model.args.vocab_size)[:2]
    fresh = batch_generate(model, tokenizer, [first + second], noise=PromptNoise([0]), **OPTIONS)
    cache = model.make_cache()
    model.encode(mx.array([first]), cache)
    continued = batch_generate(model, tokenizer, [second], cache=cache, noise=PromptNoise([0]), **OPTIONS)
    assert continued.tokens == fresh.tokens
    blocks = len(fresh.tokens[0]) // model.args.canvas_length
    assert cache[0].offset == len(first) + len(second) + (blocks - 1) * model.args.canvas_length


def test_request_that_cannot_fit_fails_before_allocating(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    mx.synchronize()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    with pytest.raises(InsufficientMemory, match="is available"):
        batch_generate(model, tokenizer, prompts(model.args.vocab_size), memory_limit=4096, **OPTIONS)
    assert mx.get_peak_memory() <= before + (1 << 20)
