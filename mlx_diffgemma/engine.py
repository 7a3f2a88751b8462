"""The token-level denoiser: what mlx-lm's ``generate_step`` is to its ``generate``.

A request's prompt is encoded into its cache once, when it is admitted. Each
of its blocks then starts from a random canvas and is denoised for up to
``max_denoising_steps`` steps (see ``sampler``); the argmax is committed and
encoded into the cache before the next block, except for the request's last
block, which nothing reads. A step evaluates three graphs in turn: the
decoder over the canvases, then the vocabulary projection with the sampler,
then the next step's self-conditioning input, so that no logits outlive their
rows' sampling.

Requests are batched: each keeps its own cache, and each round the rows are
denoised together through a ``BatchedCache`` (left-padded, with per-row
positions, so a row's result does not depend on its neighbours). A row whose
block has stopped keeps its result and leaves the computation for the rest of
the round, as does a cancelled one. A request that produced an
end-of-sequence token, reached its ``max_new_tokens`` or was cancelled gets
no further blocks, and its slot goes to a waiting request at the round's end.
The logits ([canvas, vocab] float32, far larger than anything else a canvas
needs) exist only for ``logits_rows`` rows at a time.
"""

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import mlx.core as mx
import numpy as np

from .cache import BatchedCache
from .cpu import on_cpu
from .sampler import (DEFAULT_SELF_CONDITIONING_TOP_K, NoiseSource, SamplerConfig, decide, empty_history, one_pass,
                      temper, temperatures)


@dataclass(eq=False)
class Request:
    """One prompt to answer.

    ``cache``, when given, already holds what comes before ``prompt`` (a
    shared prefix, the earlier turns); only ``prompt`` is encoded, and
    afterwards the cache holds it and every committed block but the last.
    ``noise`` gives the request draws of its own: the source sees it as row 0
    of a batch of one, at the request's own blocks, so a seeded request gets
    the same tokens whatever shares its batch. Without one, the run's source
    draws for it by its row. ``cancel()`` may be called from any thread.
    """

    prompt: Any  # token ids
    max_new_tokens: Optional[int] = None  # the run's config's when None
    noise: Optional[NoiseSource] = None
    cache: Optional[list] = None
    cancelled: bool = False

    def __post_init__(self):
        self.prompt = np.asarray(self.prompt, dtype=np.int32).reshape(-1)
        if self.prompt.size == 0:
            raise ValueError("empty prompt")
        if self.max_new_tokens is not None and not self.max_new_tokens > 0:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")

    def cancel(self) -> None:
        self.cancelled = True


class RequestQueue:
    """Requests waiting for a slot, fed from any thread; the engine takes
    them at round boundaries, skipping those cancelled while they waited."""

    def __init__(self, requests: Iterable[Request] = ()):
        self._waiting = deque(requests)
        self._lock = threading.Lock()

    def put(self, request: Request) -> None:
        with self._lock:
            self._waiting.append(request)

    def take(self, n: int) -> List[Request]:
        """Up to ``n`` waiting requests, oldest first."""
        taken = []
        with self._lock:
            while self._waiting and len(taken) < n:
                request = self._waiting.popleft()
                if not request.cancelled:
                    taken.append(request)
        return taken

    def __len__(self) -> int:
        return len(self._waiting)


@dataclass(frozen=True)
class Draft:
    """One denoising step of a round, for the batch ``rows`` in it. ``round``
    counts the run's rounds; with continuous batching a row that joined later
    is at an earlier block of its own (``row_blocks``)."""

    round: int
    step: int
    rows: Tuple[int, ...]
    row_blocks: Tuple[int, ...]
    canvas: np.ndarray  # [len(rows), L] argmax; rows that stopped keep their result
    accepted: np.ndarray  # [len(rows)] positions accepted this step, 0 for rows that stopped earlier
    stopped: np.ndarray  # [len(rows)] whether the row's block is done (or the row cancelled)
    requests: Tuple[Request, ...] = field(default=(), repr=False)


@dataclass(frozen=True)
class Committed:
    """A round's blocks, committed. Rows are numbered in the order their
    requests were admitted."""

    round: int
    rows: Tuple[int, ...]
    row_blocks: Tuple[int, ...]
    tokens: np.ndarray  # [len(rows), L]; pad after an end-of-sequence token when pad_token_id is set
    kept: np.ndarray  # [len(rows)] tokens of the block within the request's max_new_tokens
    steps: np.ndarray  # [len(rows)] denoising steps each row ran
    eos: np.ndarray  # [len(rows)] an end-of-sequence token among the kept ones
    finished: np.ndarray  # [len(rows)] no further blocks: end of sequence, max_new_tokens or cancelled
    cancelled: np.ndarray  # [len(rows)] cancelled: its last block is not an answer's
    prompt_time: float  # seconds spent encoding prompts so far
    requests: Tuple[Request, ...] = field(default=(), repr=False)


class Row(NamedTuple):
    """Who a row of a step is, for its draws: its index in the run's batch,
    its own block, and its own noise source (None: the run's)."""

    row: int
    block: int = 0
    noise: Optional[NoiseSource] = None


@dataclass
class _Slot:
    """An admitted request: its row in the run, its cache, its block."""

    row: int
    request: Request
    cache: list
    max_new_tokens: int
    block: int = 0
    generated: int = 0  # tokens of its committed blocks (shorter than canvases with auto_canvas)

    @property
    def draws(self) -> Row:
        return Row(self.row, self.block, self.request.noise)


@dataclass
class Step:
    """One denoising step of a batch, evaluated."""

    canvas: mx.array  # [B, L] the next step's input
    argmax: mx.array  # [B, L] what would be committed now
    accepted: mx.array  # [B] positions whose proposals were kept
    stop: np.ndarray  # [B] whether the row's block is done
    history: mx.array  # [stability_threshold, B, L]
    # The next step's self-conditioning, for the rows that go on (stop false),
    # in their order; None after the schedule's last step or when all stop.
    soft_embeddings: Optional[mx.array]


def canvas_sizes(canvas_length: int) -> Tuple[int, ...]:
    """The canvas lengths ``auto_canvas`` denoises: an eighth of the model's
    canvas doubled up to it (32, 64, 128, 256 for the real model), so that
    few shapes are ever compiled. Below an eighth a step saves little more:
    it is bound by reading the experts' and the vocabulary's weights."""
    size, sizes = max(1, canvas_length // 8), []
    while size < canvas_length:
        sizes.append(size)
        size *= 2
    return (*sizes, canvas_length)


def canvas_for(remaining: int, canvas_length: int) -> int:
    """The smallest of ``canvas_sizes`` that holds ``remaining`` tokens (the whole canvas at most)."""
    return next(size for size in canvas_sizes(canvas_length) if size >= min(remaining, canvas_length))


@dataclass(frozen=True)
class Denoiser:
    """What stays fixed through a run: the model, the sampler's settings, the
    noise of requests that bring none, how many rows may have their logits at
    once (all when None), and the path.

    ``exact`` (the default) is the reference path: token for token what
    transformers' ``generate`` gives with the same draws. ``exact=False`` is
    the fast path: ``sampler.one_pass`` over the logits, the next step's
    self-conditioning from the ``top_k`` most likely tokens of each position
    instead of the whole vocabulary, and one evaluation per step (two on
    the CPU, where the logits go through NumPy: ``Model.host_logits``); its
    proposals come from the noise source's ``uniform`` draws.
    ``auto_canvas`` denoises a shorter canvas (``canvas_for``) when fewer
    tokens than a canvas remain under every row's ``max_new_tokens``: a
    different computation from the reference's, so never on by default.
    """

    model: Any
    config: SamplerConfig
    noise: NoiseSource
    logits_rows: Optional[int] = None
    exact: bool = True
    top_k: int = DEFAULT_SELF_CONDITIONING_TOP_K
    auto_canvas: bool = False

    def canvas_length(self, slots: Sequence["_Slot"]) -> int:
        """The canvas a round of ``slots`` denoises."""
        L = self.model.args.canvas_length
        if not self.auto_canvas:
            return L
        return max(canvas_for(slot.max_new_tokens - slot.generated, L) for slot in slots)

    def run(self, requests: Union[RequestQueue, Sequence[Request]], max_batch: int
            ) -> Iterator[Union[Draft, Committed]]:
        """Denoise ``requests`` (a ``RequestQueue`` fed while this runs, or a
        sequence), at most ``max_batch`` at once, admitting waiting ones at
        round boundaries; yields a ``Draft`` per step and a ``Committed`` per
        round, and ends when nothing is active and nothing waits."""
        model = self.model
        source = requests if isinstance(requests, RequestQueue) else RequestQueue(requests)
        eos = np.array(self.config.eos_token_id or (), dtype=np.int64)
        active: List[_Slot] = []
        admitted = 0
        prompt_time = 0.0

        def admit():
            nonlocal admitted, prompt_time
            for request in source.take(max_batch - len(active)):
                start = time.perf_counter()
                cache = request.cache if request.cache is not None else model.make_cache()
                model.encode(mx.array(request.prompt[None]), cache)
                prompt_time += time.perf_counter() - start
                limit = request.max_new_tokens or self.config.max_new_tokens
                active.append(_Slot(admitted, request, cache, limit))
                admitted += 1

        admit()
        for round_ in itertools.count():
            if not active:
                return
            caches = BatchedCache([slot.cache for slot in active])
            L = self.canvas_length(active)
            tokens, steps, cancelled = yield from self._denoise_block(caches, active, round_, L)
            kept = np.array([min(L, slot.max_new_tokens - slot.generated) for slot in active])
            is_eos = np.isin(tokens, eos)
            within = np.arange(L)[None] < kept[:, None]
            last = np.array([slot.generated + L >= slot.max_new_tokens for slot in active])
            finished = (is_eos & within).any(axis=1) | last | cancelled
            if self.config.pad_token_id is not None:
                after_eos = np.cumsum(is_eos, axis=1) - is_eos > 0
                tokens[after_eos] = self.config.pad_token_id
            yield Committed(round_, tuple(slot.row for slot in active), tuple(slot.block for slot in active),
                            tokens, kept, steps, (is_eos & within).any(axis=1), finished, cancelled, prompt_time,
                            tuple(slot.request for slot in active))
            keep = np.flatnonzero(~finished)
            if len(keep):
                model.encode(mx.array(tokens[keep]), caches.take(keep.tolist()))
            active = [active[i] for i in keep]
            for slot in active:
                slot.block += 1
                slot.generated += L
            admit()

    def _denoise_block(self, caches: BatchedCache, slots: List[_Slot], round_: int, L: int):
        """Denoise one block of ``L`` tokens for ``slots``; returns the argmax
        [len(slots), L], the steps each row ran and which rows were cancelled."""
        result = np.zeros((len(slots), L), dtype=np.int64)
        steps = np.zeros(len(slots), dtype=np.int64)
        rows, blocks = tuple(s.row for s in slots), tuple(s.block for s in slots)
        requests = tuple(s.request for s in slots)
        active = np.array([i for i, s in enumerate(slots) if not s.request.cancelled], dtype=np.int64)
        if len(active):
            view = caches if len(active) == len(slots) else caches.take(active.tolist())
            canvas = self._draw([slots[i].draws for i in active], step=0, length=L)
            soft_embeddings = None
            history = empty_history(self.config, len(active), L)
        schedule = temperatures(self.config)

        for step, temperature in enumerate(schedule, start=1):
            if not len(active):
                break
            out = self.step(view, canvas, soft_embeddings, history, [slots[i].draws for i in active],
                            step=step, temperature=temperature, last=step == len(schedule))
            result[active] = np.array(out.argmax)
            steps[active] += 1
            counts = np.zeros(len(slots), dtype=np.int64)
            counts[active] = np.array(out.accepted)
            stopped = np.ones(len(slots), dtype=bool)
            stopped[active] = out.stop
            yield Draft(round_, step, rows, blocks, result.copy(), counts, stopped, requests)

            # Rows cancelled meanwhile leave now, with those whose block stopped.
            gone = np.array([slots[i].request.cancelled for i in active]) & ~out.stop
            leaving = out.stop | gone
            if leaving.all():
                break
            canvas, history, soft_embeddings = out.canvas, out.history, out.soft_embeddings
            if leaving.any():
                keep = np.flatnonzero(~leaving)
                index = mx.array(keep)
                canvas, history = canvas[index], history[:, index]
                if gone.any() and soft_embeddings is not None:  # it holds the rows that did not stop
                    soft_embeddings = soft_embeddings[mx.array(np.flatnonzero(~gone[~out.stop]))]
                active = active[keep]
                view = caches.take(active.tolist())
        return result, steps, np.array([s.request.cancelled for s in slots], dtype=bool)

    def step(self, caches, canvas: mx.array, soft_embeddings: Optional[mx.array], history: mx.array,
             rows: Sequence[Row], *, step: int, temperature: float, last: bool = False) -> Step:
        """One denoising step of ``canvas`` [len(rows), L]. The body runs on
        every row at once; the logits and everything computed from them
        (tempering, entropy, sampling, the next step's self-conditioning)
        exist for ``logits_rows`` rows at a time. ``last`` skips the
        self-conditioning that no step would read. On the fast path, with the
        logits of every row at once, the whole step is one graph, evaluated once
        (on the CPU the logits are evaluated first, for NumPy)."""
        hidden = self.model.hidden_states(canvas, caches, soft_embeddings)
        size = self.logits_rows or len(rows)
        if self.exact or size < len(rows):
            mx.eval(hidden)
        sample = self._sample if self.exact else self._sample_fast
        parts = [sample(hidden[start : start + size], history[:, start : start + size], rows[start : start + size],
                        step=step, temperature=temperature, last=last)
                 for start in range(0, len(rows), size)]
        if len(parts) == 1:
            return parts[0]
        softs = [p.soft_embeddings for p in parts if p.soft_embeddings is not None]
        return Step(
            canvas=mx.concatenate([p.canvas for p in parts]),
            argmax=mx.concatenate([p.argmax for p in parts]),
            accepted=mx.concatenate([p.accepted for p in parts]),
            stop=np.concatenate([p.stop for p in parts]),
            history=mx.concatenate([p.history for p in parts], axis=1),
            soft_embeddings=mx.concatenate(softs) if softs else None,
        )

    def _sample(self, hidden: mx.array, history: mx.array, rows: Sequence[Row], *, step: int, temperature: float,
                last: bool) -> Step:
        """The sampler's part of a step for some rows, from their hidden
        states; their logits are freed when it returns."""
        config, L = self.config, hidden.shape[1]
        processed, entropy, argmax = temper(self._logits(hidden, host=False), mx.array(temperature))
        proposal = self._draw(rows, step=step, length=L, logits=processed)
        renoise = self._draw(rows, step=step, length=L)
        canvas, accepted, stop, history = decide(
            entropy, argmax, proposal.astype(renoise.dtype), renoise, history,
            mx.array(config.entropy_bound, dtype=mx.float32), mx.array(config.confidence_threshold, dtype=mx.float32))
        mx.eval(canvas, argmax, accepted, stop, history)
        stop = np.array(stop)
        soft = None
        if not last and not stop.all():
            going = processed if not stop.any() else processed[mx.array(np.flatnonzero(~stop))]
            soft = self.model.soft_embeddings(going)
            mx.eval(soft)
        return Step(canvas, argmax, accepted, stop, history, soft)

    def _sample_fast(self, hidden: mx.array, history: mx.array, rows: Sequence[Row], *, step: int,
                     temperature: float, last: bool) -> Step:
        """``_sample`` on the fast path: one pass over the logits, the next
        step's self-conditioning from the top ``top_k`` tokens, one evaluation
        (after the logits' on the CPU)."""
        config, L = self.config, hidden.shape[1]
        logits = self._logits(hidden, host=True)
        # The top K of the whole vocabulary (a small one, e.g. the Sudoku model's 23) is the
        # reference's self-conditioning: computed as the reference computes it, so it is its bits.
        whole = self.top_k >= self.model.args.vocab_size
        top_k = 0 if whole or last else self.top_k
        if all(hasattr(self._source(r), "uniform") for r in rows):
            drawn = one_pass(logits, temperature, self._draw(rows, step=step, length=L, uniform=True), top_k,
                             self.model.dtype)
            proposal = drawn.proposal
        else:  # a source of the reference's draws only: its proposals from the processed logits
            drawn = one_pass(logits, temperature, mx.zeros((len(rows), L)), top_k, self.model.dtype)
            proposal = self._draw(rows, step=step, length=L, logits=mx.array(logits) / temperature)
        renoise = self._draw(rows, step=step, length=L)
        canvas, accepted, stop, history = decide(
            drawn.entropy, drawn.argmax, proposal.astype(renoise.dtype), renoise, history,
            mx.array(config.entropy_bound, dtype=mx.float32), mx.array(config.confidence_threshold, dtype=mx.float32))
        if last:
            soft = None
        elif whole:
            soft = self.model.soft_embeddings(mx.array(logits) / mx.array(temperature))
        else:
            soft = self.model.top_k_soft_embeddings(drawn.top_ids, drawn.top_weights)
        mx.eval(canvas, drawn.argmax, accepted, stop, history, soft)
        stop = np.array(stop)
        if soft is not None and stop.any():
            soft = None if stop.all() else soft[mx.array(np.flatnonzero(~stop))]
        return Step(canvas, drawn.argmax, accepted, stop, history, soft)

    def _logits(self, hidden: mx.array, *, host: bool) -> Union[mx.array, np.ndarray]:
        """The step's logits; on the CPU softcapped by NumPy (``Model.host_logits``),
        and with ``host`` left there, for ``one_pass``'s NumPy path."""
        if not on_cpu():
            return self.model.logits(hidden)
        logits = self.model.host_logits(hidden)
        return logits if host else mx.array(logits)

    def _draw(self, rows: Sequence[Row], *, step: int, length: int, logits: Optional[mx.array] = None,
              uniform: bool = False) -> mx.array:
        """Proposals drawn from ``logits``, the fast path's ``uniform`` draws,
        or else a uniform canvas of ``length``, for ``rows``: one call per run
        of neighbouring rows with the same source at the same block, so that
        no call mixes sources or blocks (sources key their draws by block),
        the logits passed as views."""
        V = self.model.args.vocab_size
        parts, start = [], 0
        for (source, block), run in itertools.groupby(rows, key=lambda r: (self._source(r), r.block)):
            part = slice(start, start + len(list(run)))
            start = part.stop
            # A request's own source sees it as row 0 of a batch of its own.
            keys = [r.row if r.noise is None else 0 for r in rows[part]]
            if uniform:
                parts.append(source.uniform(keys, length, block=block, step=step))
            elif logits is None:
                parts.append(source.canvas(keys, length, V, block=block, step=step))
            else:
                parts.append(source.proposal(logits[part], keys, block=block, step=step))
        return parts[0] if len(parts) == 1 else mx.concatenate(parts)

    def _source(self, row: Row) -> NoiseSource:
        return self.noise if row.noise is None else row.noise
