"""The engines `mlxdg bench` times, and what it observes while they run.

Every run yields one record (a flat dict) with the same fields for every
engine, so diffusion and autoregression are compared on the same definitions:

* prefill: the prompt's causal pass (for AR, up to its first token, as mlx-lm counts it);
* first output: the first text a user could see (AR: the first token; diffusion:
  the first committed block);
* decode: tokens produced after the prefill, over the time after the prefill
  (diffusion: up to the last committed block; AR: from the first token to the last).

Autoregression runs through mlx-lm's own ``generate_step``, greedy and without
an end-of-sequence test, for mlx-lm's Gemma 4 and for our encoder alike, so the
two AR rows differ only in the model code.
"""

import math
import time
from contextlib import contextmanager, nullcontext
from typing import Callable, List, Optional, Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.generate import generate_step
from mlx_lm.models.gemma4_text import Router, logit_softcap

from mlx_diffgemma.engine import Draft
from mlx_diffgemma.generate import stream_blocks

# Answer lengths whose latency the report shows: the upper end of each bucket (1-5, 6-20, 21-64, 65-256).
ANSWER_BUCKETS = ((1, 5), (6, 20), (21, 64), (65, 256))


class ExpertCounter:
    """Distinct experts each router picks in one forward pass, counted from the
    router's indices: mlx-lm's ``Router`` (which both model families use) is
    wrapped while ``counting`` is active."""

    def __init__(self):
        self.counts: List[int] = []

    @contextmanager
    def counting(self, rows: int, skip: Callable[[], bool] = lambda: False):
        """Count router calls over ``rows`` positions (a canvas, or one AR token),
        except while ``skip()`` holds."""
        original = Router.__call__
        routed = []

        def call(router, x):
            indices, weights = original(router, x)
            if indices.size // indices.shape[-1] == rows and not skip():
                routed.append(indices)
            return indices, weights

        Router.__call__ = call
        try:
            yield
        finally:
            Router.__call__ = original
            # The indices were computed with each pass; reading them now adds nothing to the timed graph.
            self.counts.extend(len(np.unique(np.array(indices))) for indices in routed)


class EncodeTimer:
    """Wraps ``model.encode`` while active: each call's start and end (the first
    call is the prefill, the others are commits), and the cache it writes."""

    def __init__(self, model):
        self.model = model
        self.spans: List[tuple] = []
        self.cache = None
        self.running = False

    def _encode(self, ids, cache, *args, **kwargs):
        if self.cache is None:
            self.cache = cache
        self.running = True
        start = time.perf_counter()
        try:
            return type(self.model).encode(self.model, ids, cache, *args, **kwargs)
        finally:
            self.spans.append((start, time.perf_counter()))
            self.running = False

    def __enter__(self):
        self.model.encode = self._encode
        return self

    def __exit__(self, *exc):
        del self.model.encode

    @property
    def last_end(self) -> float:
        return self.spans[-1][1] if self.spans else -math.inf


def next_token_logits(model, tokens: mx.array, cache) -> mx.array:
    """Logits [B, vocab] after ``tokens`` [B, 1]: the encoder's causal pass over
    one new position, appended to ``cache``, then the tied LM head, as the
    autoregressive Gemma 4 the encoder started from computes them."""
    decoder = model.model.decoder
    scalars = model.model.encoder.language_model.layers
    x = model._embed(tokens)
    offset = cache[0].offset
    for layer, c, scalar in zip(decoder.layers, cache, scalars):
        # One query sees the whole kept cache (a sliding cache keeps window - 1), so no mask.
        x = layer(x, c, offset, True, None, scalar.layer_scalar)
    logits = decoder.embed_tokens.as_linear(decoder.norm(x[:, -1])).astype(mx.float32)
    return logit_softcap(model.args.final_logit_softcapping, logits)


class EncoderLM:
    """Our model's encoder as a causal LM with mlx-lm's calling convention, so
    that ``generate_step`` decodes with it one token at a time: the same
    backbone and quantization as the diffusion engine, another decoding strategy."""

    def __init__(self, model):
        self.model = model

    def make_cache(self):
        return self.model.make_cache()

    def __call__(self, inputs: mx.array, cache) -> mx.array:
        # Only the last position's logits are read; the rest of a prompt takes the encoder's chunked pass.
        if inputs.shape[1] > 1:
            self.model.encode(inputs[:, :-1], cache)
        return next_token_logits(self.model, inputs[:, -1:], cache)[:, None]


class SyntheticTokenizer:
    """What the diffusion engine asks of a tokenizer, for random-weight models,
    whose tokens have no text: no special tokens, no end of sequence."""

    all_special_ids: Sequence[int] = ()
    eos_token_ids: Sequence[int] = ()

    class _Detokenizer:
        last_segment = ""

        def add_token(self, token):
            pass

        def finalize(self):
            pass

    def get_vocab(self) -> dict:
        return {}

    @property
    def detokenizer(self):
        return self._Detokenizer()


def _answer_seconds(token_seconds: Callable[[int], Optional[float]]) -> dict:
    return {str(high): token_seconds(high) for _, high in ANSWER_BUCKETS}


def _record(prompt_tokens, generated, prefill_s, first_output_s, decode_tokens, decode_s, total_s, forwards,
            step_s, peak, answer_seconds, **diffusion) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "generated_tokens": generated,
        "prefill_seconds": prefill_s,
        "prefill_tokens_per_second": prompt_tokens / prefill_s,
        "first_output_seconds": first_output_s,
        "decode_tokens": decode_tokens,
        "decode_seconds": decode_s,
        "decode_tokens_per_second": decode_tokens / decode_s,
        "total_seconds": total_s,
        "end_to_end_tokens_per_second": generated / total_s,
        "forwards": forwards,
        "step_ms": 1e3 * step_s,
        "tokens_per_forward": generated / forwards,
        "peak_memory_bytes": peak,
        "answer_seconds": answer_seconds,
        **diffusion,
    }


def run_diffusion(model, tokenizer, prompt: List[int], options: dict, seed: int,
                  counter: Optional[ExpertCounter] = None) -> dict:
    """One generation with our engine (``options`` go to ``stream_blocks``).

    A step is timed from the previous event (step, block or encode) to its
    draft; commits are ``model.encode`` calls after the prefill. The engine
    skips the last block's commit (nothing reads it), so that commit is timed
    after the run, outside every other figure, to give each run a commit time.
    """
    L = model.args.canvas_length
    steps, blocks = [], []  # seconds of each step; (seconds since start, block) of each block
    with EncodeTimer(model) as timer:
        count = counter.counting(L, skip=lambda: timer.running) if counter else nullcontext()
        with count:
            start = last = time.perf_counter()
            for event in stream_blocks(model, tokenizer, prompt, seed=seed, **options):
                now = time.perf_counter()
                if isinstance(event, Draft):
                    steps.append(now - max(last, timer.last_end))
                else:
                    blocks.append((now - start, event))
                last = now
        peak = mx.get_peak_memory()
        total = last - start
        final = blocks[-1][1]
        model.encode(mx.array(final.tokens), timer.cache)
    (prefill_start, prefill_end), *commits = timer.spans
    generated = final.generation_tokens
    block_seconds = [t for t, _ in blocks]

    def token_seconds(n):
        return block_seconds[math.ceil(n / L) - 1] if n <= generated else None

    return _record(
        len(prompt), generated, prefill_end - prefill_start, block_seconds[0], generated,
        start + block_seconds[-1] - prefill_end, total, len(steps), sum(steps) / len(steps), peak,
        _answer_seconds(token_seconds),
        blocks=len(blocks),
        steps_per_block=len(steps) / len(blocks),
        commit_ms=1e3 * sum(end - begin for begin, end in commits) / len(commits),
        commits_timed=len(commits),
    )


def run_autoregressive(lm, prompt: List[int], gen_tokens: int, counter: Optional[ExpertCounter] = None) -> dict:
    """``gen_tokens`` greedy tokens from mlx-lm's ``generate_step`` (no end-of-sequence stop)."""
    times = []
    with counter.counting(1) if counter else nullcontext():
        mx.reset_peak_memory()
        start = time.perf_counter()
        for _ in generate_step(mx.array(prompt), lm, max_tokens=gen_tokens):
            times.append(time.perf_counter() - start)
    peak = mx.get_peak_memory()
    decode_tokens = len(times) - 1
    decode_s = times[-1] - times[0]
    return _record(
        len(prompt), len(times), times[0], times[0], decode_tokens, decode_s, times[-1], len(times),
        decode_s / decode_tokens, peak, _answer_seconds(lambda n: times[n - 1] if n <= len(times) else None),
    )
