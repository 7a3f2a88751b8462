"""The token-level engine as a server drives it: requests with their own noise,
their own token limits and prefilled caches, admitted while it runs, and
cancelled mid-block."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_diffgemma import batch_generate, load
from mlx_diffgemma.engine import Committed, Denoiser, Draft, Request, RequestQueue, canvas_for, canvas_sizes
from mlx_diffgemma.sampler import MLXNoise, SamplerConfig

# Fixed steps (no early stop) and no end of sequence: every row's work is known in advance.
CONFIG = SamplerConfig(max_new_tokens=16, max_denoising_steps=4, entropy_bound=0.5, confidence_threshold=0.0,
                       eos_token_id=(), pad_token_id=0)


@pytest.fixture(scope="module")
def loaded(make_checkpoint):
    return load(make_checkpoint("four_layer", damping=0.3))


@pytest.fixture(scope="module")
def model(loaded):
    return loaded[0]


def prompts(vocab, lengths=(3, 12, 7, 9)):
    rng = np.random.default_rng(11)
    return [rng.integers(3, vocab, n).tolist() for n in lengths]


def run(model, requests, max_batch=8, logits_rows=None, config=CONFIG):
    """Every event of a run, and each request's committed tokens (kept ones only)."""
    events = list(Denoiser(model, config, MLXNoise(99), logits_rows).run(requests, max_batch))
    return events, answers(events, requests)


def answers(events, requests):
    tokens = {id(r): [] for r in requests}
    for event in events:
        if isinstance(event, Committed):
            for request, row, kept, cancelled in zip(event.requests, event.tokens, event.kept, event.cancelled):
                if id(request) in tokens and not cancelled:
                    tokens[id(request)] += row[:kept].tolist()
    return [tokens[id(r)] for r in requests]


def test_a_seeded_request_gets_its_tokens_whatever_shares_the_batch(model):
    first, *others = prompts(model.args.vocab_size)
    seeded = lambda: Request(first, noise=MLXNoise(5))  # noqa: E731
    _, (alone,) = run(model, [seeded()])
    _, (crowded, *_) = run(model, [seeded()] + [Request(p) for p in others])
    _, (*_, last) = run(model, [Request(p, noise=MLXNoise(i)) for i, p in enumerate(others)] + [seeded()],
                        max_batch=2, logits_rows=1)
    assert len(alone) == 16 and crowded == alone and last == alone
    _, (other_seed,) = run(model, [Request(first, noise=MLXNoise(6))])
    assert other_seed != alone


def test_max_new_tokens_is_exact_per_request(model):
    requests = [Request(p, max_new_tokens=n) for p, n in zip(prompts(model.args.vocab_size), (13, 3, 8, None))]
    events, tokens = run(model, requests)
    L = model.args.canvas_length
    assert [len(t) for t in tokens] == [13, 3, 8, CONFIG.max_new_tokens]
    committed = [e for e in events if isinstance(e, Committed)]
    # Row 0 needs two blocks (8 + 5), rows 1 and 2 one; a row leaves once its limit is reached.
    assert [e.rows for e in committed] == [(0, 1, 2, 3), (0, 3)]
    assert committed[0].kept.tolist() == [L, 3, L, L] and committed[1].kept.tolist() == [5, L]
    assert committed[0].finished.tolist() == [False, True, True, False] and committed[1].finished.all()


def test_the_text_layer_keeps_max_new_tokens_exactly(loaded):
    model, tokenizer = loaded
    result = batch_generate(model, tokenizer, prompts(model.args.vocab_size)[:2], max_new_tokens=13, eos_token_id=[],
                      max_denoising_steps=2, seed=0)
    assert result.generation_tokens == 26 and result.finish_reasons == ["length", "length"]
    # The committed canvases stay whole, as the reference returns them.
    assert [len(t) for t in result.tokens] == [16, 16]


def test_a_prefilled_cache_is_continued(model):
    prefix, suffix, other = prompts(model.args.vocab_size)[1:]
    _, (fresh,) = run(model, [Request(prefix + suffix, noise=MLXNoise(3))])
    cache = model.make_cache()
    model.encode(mx.array([prefix]), cache)
    encoded = []
    model.encode = lambda ids, c: (encoded.append(ids.shape), type(model).encode(model, ids, c))[1]
    try:
        _, (continued, _) = run(model, [Request(suffix, noise=MLXNoise(3), cache=cache), Request(other)])
    finally:
        del model.encode
    assert continued == fresh
    assert encoded[:2] == [(1, len(suffix)), (1, len(other))]  # only the suffix of the prefilled request
    assert cache[0].offset == len(prefix) + len(suffix) + model.args.canvas_length  # one block committed


class Counted:
    """Records the batch of every decoder pass."""

    def __init__(self, model):
        self.model, self.batches = model, []

    def __enter__(self):
        original = self.model.hidden_states

        def hidden_states(canvas, *args, **kwargs):
            self.batches.append(canvas.shape[0])
            return original(canvas, *args, **kwargs)

        self.model.hidden_states = hidden_states
        return self.batches

    def __exit__(self, *exc):
        del self.model.hidden_states


def test_a_cancelled_request_leaves_within_one_step(model):
    first, second = prompts(model.args.vocab_size)[:2]
    kept, doomed = Request(first, noise=MLXNoise(1)), Request(second, noise=MLXNoise(2))
    events = []
    with Counted(model) as batches:
        for event in Denoiser(model, CONFIG, MLXNoise(0)).run([kept, doomed], max_batch=2):
            events.append(event)
            if isinstance(event, Draft) and event.step == 2:
                doomed.cancel()
    N = CONFIG.max_denoising_steps
    # Both rows for two steps, then the kept row alone for the rest of that block and the next.
    assert batches == [2, 2] + [1] * (N - 2) + [1] * N
    drafts = [e for e in events if isinstance(e, Draft) and e.round == 0]
    assert [d.stopped[1] for d in drafts] == [False, False] + [True] * (N - 2)
    commit = next(e for e in events if isinstance(e, Committed))
    assert commit.cancelled.tolist() == [False, True] and commit.finished.tolist() == [False, True]
    assert all(e.rows == (0,) for e in events[events.index(commit) + 1:])
    _, (alone,) = run(model, [Request(first, noise=MLXNoise(1))])
    assert answers(events, [kept])[0] == alone


def test_a_request_cancelled_while_waiting_is_never_admitted(model):
    first, second = prompts(model.args.vocab_size)[:2]
    waiting = Request(second)
    waiting.cancel()
    events, _ = run(model, [Request(first), waiting], max_batch=1)
    assert {e.rows for e in events} == {(0,)}


def test_requests_join_a_running_batch_at_block_boundaries(model):
    first, second, third = prompts(model.args.vocab_size)[:3]
    queue = RequestQueue([Request(first, noise=MLXNoise(1))])
    late = [Request(second, noise=MLXNoise(2)), Request(third, noise=MLXNoise(3), max_new_tokens=8)]
    events = []
    for event in Denoiser(model, CONFIG, MLXNoise(0)).run(queue, max_batch=4):
        events.append(event)
        if isinstance(event, Draft) and event.round == 0 and event.step == 1:
            queue.put(late[0])  # mid-block: it waits for the round's end
        if isinstance(event, Committed) and event.round == 1:
            queue.put(late[1])
    rounds = [(e.rows, e.row_blocks) for e in events if isinstance(e, Committed)]
    assert rounds == [((0,), (0,)), ((0, 1), (1, 0)), ((1, 2), (1, 0))]
    assert len(queue) == 0  # and then the run ended: nothing active, nothing waiting
    for (prompt, seed, limit), tokens in zip([(second, 2, None), (third, 3, 8)], answers(events, late)):
        assert tokens == run(model, [Request(prompt, noise=MLXNoise(seed), max_new_tokens=limit)])[1][0]


def test_canvas_sizes_double_from_an_eighth_canvas():
    assert canvas_sizes(256) == (32, 64, 128, 256) and canvas_sizes(16) == (2, 4, 8, 16) and canvas_sizes(2) == (1, 2)
    assert canvas_sizes(8) == (1, 2, 4, 8)
    assert [canvas_for(n, 256) for n in (1, 32, 33, 64, 65, 128, 200, 256, 1000)] == [32, 32, 64, 64, 128, 128, 256,
                                                                                       256, 256]


def test_auto_canvas_denoises_only_what_is_left(model):
    L = model.args.canvas_length
    requests = [Request(p, max_new_tokens=n, noise=MLXNoise(i))
                for i, (p, n) in enumerate(zip(prompts(model.args.vocab_size), (L + 1, 2, 3)))]
    events = list(Denoiser(model, CONFIG, MLXNoise(0), auto_canvas=True).run(requests[:1], max_batch=1))
    committed = [e for e in events if isinstance(e, Committed)]
    assert [e.tokens.shape for e in committed] == [(1, L), (1, L // 8)] and committed[1].kept.tolist() == [1]
    assert {d.canvas.shape for d in events if isinstance(d, Draft) and d.round == 1} == {(1, L // 8)}
    # A batch takes the canvas its longest remainder needs: 3 tokens fit a half canvas.
    events, tokens = [], answers(events, requests[:1])
    events = list(Denoiser(model, CONFIG, MLXNoise(0), auto_canvas=True).run(requests[1:], max_batch=2))
    assert [e.tokens.shape for e in events if isinstance(e, Committed)] == [(2, L // 2)]
    assert [len(t) for t in answers(events, requests[1:])] == [2, 3] and len(tokens[0]) == L + 1


def test_the_fast_path_keeps_the_engines_promises(model):
    """Its own (uniform) draws per request, exact token limits, any batch and logits chunking."""
    def fast(requests, max_batch=4, logits_rows=None):
        events = list(Denoiser(model, CONFIG, MLXNoise(0), logits_rows, exact=False, top_k=4).run(requests, max_batch))
        return answers(events, requests)

    first, *others = prompts(model.args.vocab_size)
    seeded = lambda: Request(first, noise=MLXNoise(5), max_new_tokens=13)  # noqa: E731
    (alone,) = fast([seeded()])
    crowded = fast([seeded()] + [Request(p) for p in others], logits_rows=1)
    assert len(alone) == 13 and crowded[0] == alone and [len(t) for t in crowded[1:]] == [16, 16, 16]
