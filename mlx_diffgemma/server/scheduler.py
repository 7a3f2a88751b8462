"""Continuous batching for the server: one thread owns the model and denoises
every admitted request's canvas in the same passes.

Requests wait in a bounded queue (``QueueFull`` past it) and join the running
batch at the next block boundary, up to ``max_batch`` and what the memory
planner fits next to the prefix cache. Rows in one pass share the sampler's
schedule, so a request whose sampler settings differ from the running batch's
waits until that batch drains, and nothing behind it overtakes it (FIFO).

A request's randomness is keyed by (seed, block, step), so its answer does
not depend on what else is in the batch, and a cancelled request leaves the
batch at the next denoising step.
"""

import logging
import math
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field, fields
from typing import Callable, List, Optional, Sequence

import mlx.core as mx
import numpy as np

from ..cache import BatchedContext
from ..generate import denoise_step
from ..memory import device_budget, largest_context, plan, weight_bytes
from ..sampler import SamplerConfig, empty_history, temperatures
from .prefix import PrefixCache

log = logging.getLogger("mlxdg.server")


class QueueFull(RuntimeError):
    """More requests wait than the queue holds."""


class ShuttingDown(RuntimeError):
    """The server stopped before the request was admitted."""


@dataclass(frozen=True)
class Started:
    """The request was admitted: ``cached_tokens`` of its prompt came from the prefix cache."""

    cached_tokens: int


@dataclass(frozen=True)
class Committed:
    """A committed block: ``tokens`` are the request's (trimmed to its
    ``max_new_tokens``); ``finish`` is "stop", "length", or None while more follow."""

    tokens: np.ndarray
    steps: int
    finish: Optional[str]


@dataclass(frozen=True)
class DraftStep:
    """The argmax of the request's canvas after one denoising step."""

    block: int
    step: int
    canvas: np.ndarray


@dataclass(frozen=True)
class Failed:
    error: Exception


@dataclass
class Job:
    """One request as the engine sees it. Events (``Started``, then
    ``DraftStep``s and ``Committed`` blocks, or ``Failed``) arrive on ``events``;
    ``cancel()`` takes it out of the batch at the next step."""

    id: str
    prompt: np.ndarray  # token ids
    config: SamplerConfig  # this request's, max_new_tokens included
    seed: int
    prefix: int = 0  # the prompt tokens after which the cache is kept for later requests
    drafts: bool = False
    events: "queue.SimpleQueue" = field(default_factory=queue.SimpleQueue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    # Filled in by the engine, for the log line.
    cached_tokens: int = 0
    completion_tokens: int = 0
    blocks: int = 0
    steps: int = 0
    passes: int = 0
    shared: int = 0  # canvases in all the passes this request took part in, its own included
    most_shared: int = 0
    submitted: float = field(default_factory=time.perf_counter)
    finish: Optional[str] = None

    def cancel(self) -> None:
        self.cancelled.set()

    @property
    def sampler_key(self) -> tuple:
        """What rows denoised in one pass must share: everything but the length and stop tokens."""
        return tuple(getattr(self.config, f.name) for f in fields(SamplerConfig)
                     if f.name not in ("max_new_tokens", "eos_token_id", "pad_token_id"))

    def log_line(self) -> str:
        seconds = time.perf_counter() - self.submitted
        batch = self.shared / self.passes if self.passes else 0.0
        return (f"{self.id} prompt={len(self.prompt)} cached={self.cached_tokens} "
                f"completion={self.completion_tokens} blocks={self.blocks} steps={self.steps} "
                f"batch={batch:.1f}/{self.most_shared} seconds={seconds:.2f} finish={self.finish}")


def _key(seed: int, block: int, step: int, kind: int) -> mx.array:
    """The random key of one draw of one request."""
    state = np.random.SeedSequence([seed, block, step, kind]).generate_state(2, np.uint32)
    return mx.random.key(int(state[0]) << 32 | int(state[1]))


class KeyedNoise:
    """A ``NoiseSource`` whose draws are keyed by (request seed, block, step):
    ``seeds[row]`` is the seed of batch row ``row``."""

    def __init__(self, seeds: Sequence[int]):
        self.seeds = list(seeds)

    def canvas(self, rows, length, vocab_size, *, block, step):
        return mx.concatenate([mx.random.randint(0, vocab_size, (1, length), key=_key(self.seeds[r], block, step, 0))
                               for r in rows])

    def proposal(self, logits, rows, *, block, step):
        return mx.concatenate([mx.random.categorical(logits[i : i + 1], key=_key(self.seeds[r], block, step, 1))
                               for i, r in enumerate(rows)])


@dataclass
class _Row:
    job: Job
    cache: list
    block: int = 0  # the request's own block index


class Scheduler:
    """Owns the model on its own thread (``start``/``stop``); ``submit``
    queues a ``Job``. ``load`` builds the model in that thread, as MLX
    arrays are best created and used on one."""

    def __init__(self, load: Callable[[], object], *, max_batch: int, max_queue: int = 64,
                 memory_limit=None, prefix_cache: bool = True):
        self._load = load
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.budget = device_budget(memory_limit)
        self.use_prefix_cache = prefix_cache
        self.model = None
        self.prefix_cache: Optional[PrefixCache] = None
        self.waiting: deque = deque()
        self.active: List[_Row] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._ready = threading.Event()
        self._load_error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name="mlxdg-engine", daemon=True)

    # -- the interface the HTTP side uses ------------------------------------------------

    def start(self) -> None:
        """Load the model on the engine thread; raises what loading raised."""
        self._thread.start()
        self._ready.wait()
        if self._load_error is not None:
            raise self._load_error

    def submit(self, job: Job) -> None:
        with self._wake:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting")
            self.waiting.append(job)
            self._wake.notify()

    def stop(self, cancel_active: bool = False, timeout: Optional[float] = None) -> None:
        """Refuse new requests, fail the waiting ones, and let the running ones
        finish (or cancel them at their next step)."""
        with self._wake:
            self._stopping = True
            if cancel_active:
                for row in list(self.active):
                    row.job.cancel()
            while self.waiting:
                self.waiting.popleft().events.put(Failed(ShuttingDown("the server is shutting down")))
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def join(self, timeout: Optional[float] = None) -> bool:
        """Wait for the engine thread to end; whether it has."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def healthy(self) -> bool:
        return self._thread.is_alive() and self.model is not None

    def stats(self) -> dict:
        return {"active": len(self.active), "waiting": len(self.waiting),
                "prefix_cache": self.prefix_cache.stats() if self.prefix_cache else None}

    def fits_alone(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """Raises ``InsufficientMemory`` when a request could never run, even alone."""
        self._plan([prompt_tokens + self._generated_context(max_new_tokens)], 0).require(1)

    # -- the engine thread ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            self.model = self._load()
            self.L = self.model.args.canvas_length
            self.weights = weight_bytes(self.model)
            self.dtype_bytes = self.model.dtype.size
            if self.use_prefix_cache:
                self.prefix_cache = PrefixCache(self._prefix_capacity())
        except BaseException as e:  # reported by start()
            self._load_error = e
            self._ready.set()
            return
        self._ready.set()
        while True:
            self._admit()
            if not self.active:
                with self._wake:
                    if self._stopping and not self.waiting:
                        return
                    if not self.waiting:
                        self._wake.wait(timeout=0.5)
                continue
            try:
                self._block()
            except Exception as e:  # a fault in one block fails its requests, not the server
                log.exception("block failed")
                for row in self.active:
                    self._finish(row.job, Failed(e))
                self.active = []

    def _generated_context(self, max_new_tokens: int) -> int:
        return largest_context([0], max_new_tokens, self.model.args.canvas_length)

    def _plan(self, contexts: List[int], cached_bytes: int):
        """The planner's view of rows with these contexts, beside ``cached_bytes`` of prefix cache."""
        return plan(self.model.args, self.weights, max(contexts), self.dtype_bytes, self.budget - cached_bytes)

    def _prefix_capacity(self) -> int:
        """What the planner leaves beside a full batch of 4096-token requests."""
        memory = self._plan([4096], 0)
        free = memory.budget - memory.peak(self.max_batch, memory.logits_rows(self.max_batch))
        return max(free, 0)

    def _context(self, job: Job) -> int:
        return len(job.prompt) + self._generated_context(job.config.max_new_tokens)

    def _admit(self) -> None:
        """At a block boundary: take waiting requests (oldest first, same sampler settings) while they fit."""
        while True:
            with self._wake:
                if not self.waiting or len(self.active) >= self.max_batch:
                    return
                job = self.waiting[0]
                if job.cancelled.is_set():
                    self.waiting.popleft()
                    job.finish = "cancelled"
                    log.info(job.log_line())
                    continue
                if self.active and job.sampler_key != self.active[0].job.sampler_key:
                    return
                contexts = [self._context(r.job) for r in self.active] + [self._context(job)]
                if not self._fits(contexts):
                    return
                self.waiting.popleft()
            try:
                self.active.append(self._prefill(job))
            except Exception as e:
                log.exception("prefill failed")
                self._finish(job, Failed(e))

    def _fits(self, contexts: List[int]) -> bool:
        """Whether these rows fit, evicting prefix-cache entries for them if need be."""
        while True:
            cached = self.prefix_cache.bytes if self.prefix_cache else 0
            if self._plan(contexts, cached).max_canvases >= len(contexts):
                return True
            if not cached:
                return len(contexts) == 1  # alone it was checked at submission; run it anyway
            self.prefix_cache.evict_one()

    def _prefill(self, job: Job) -> _Row:
        """The request's cache: the longest cached prefix of its prompt, then the rest encoded."""
        model, prompt = self.model, job.prompt
        hit = self.prefix_cache.lookup(prompt) if self.prefix_cache else None
        cache = hit if hit is not None else model.make_cache()
        job.cached_tokens = cache[0].offset
        position = job.cached_tokens
        if self.prefix_cache is not None and position < job.prefix:
            model.encode(mx.array(prompt[None, position : job.prefix]), cache)
            self.prefix_cache.store(prompt[: job.prefix], cache)
            position = job.prefix
        if position < len(prompt):
            model.encode(mx.array(prompt[None, position:]), cache)
        job.events.put(Started(job.cached_tokens))
        return _Row(job, cache)

    def _finish(self, job: Job, event) -> None:
        if isinstance(event, Failed):
            job.finish = f"error ({type(event.error).__name__})"
        job.events.put(event)
        log.info(job.log_line())

    def _block(self) -> None:
        """Denoise one block of every active row, commit it and encode it for the rows that go on."""
        model, rows = self.model, self.active
        L, V = self.L, model.args.vocab_size
        config = rows[0].job.config
        n = len(rows)
        memory = self._plan([self._context(r.job) for r in rows], self.prefix_cache.bytes if self.prefix_cache else 0)
        logits_rows = memory.logits_rows(n)
        noise = KeyedNoise([r.job.seed for r in rows])
        blocks = np.array([r.block for r in rows])
        context = BatchedContext([r.cache for r in rows])
        result = np.zeros((n, L), dtype=np.int64)
        steps = np.zeros(n, dtype=np.int64)
        going = np.arange(n)  # rows still denoising, by position in ``rows``
        view = context
        canvas = mx.concatenate([noise.canvas([r], L, V, block=int(blocks[r]), step=0) for r in going])
        soft, history = None, empty_history(config, n, L)
        schedule = temperatures(config)
        cancelled = np.zeros(n, dtype=bool)
        for step, temperature in enumerate(schedule, start=1):
            out = denoise_step(model, view, canvas, soft, history, config, temperature, noise,
                               going.tolist(), blocks[going].tolist(), step, logits_rows=logits_rows,
                               last=step == len(schedule))
            argmax = np.array(out.argmax)
            result[going] = argmax
            steps[going] += 1
            for i, r in enumerate(going):
                job = rows[r].job
                job.passes += 1
                job.shared += len(going)
                job.most_shared = max(job.most_shared, len(going))
                if job.drafts:
                    job.events.put(DraftStep(rows[r].block, step, argmax[i].copy()))
            cancelled[going] = [rows[r].job.cancelled.is_set() for r in going]
            leave = out.stop | cancelled[going]
            if leave.all():
                break
            canvas, history, soft = out.canvas, out.history, out.soft_embeddings
            if leave.any():
                keep = np.flatnonzero(~leave)
                index = mx.array(keep)
                canvas, history = canvas[index], history[:, index]
                if soft is not None:
                    # ``soft`` holds the rows that did not stop, in order; keep the uncancelled ones.
                    soft = soft[mx.array(np.flatnonzero(~cancelled[going][~out.stop]))]
                going = going[keep]
                view = context.take(going.tolist())

        go_on = []
        for r, row in enumerate(rows):
            job = row.job
            job.steps += int(steps[r])
            if cancelled[r] or job.cancelled.is_set():
                job.finish = "cancelled"
                self._finish(job, Committed(np.zeros(0, dtype=np.int64), int(steps[r]), "cancelled"))
                continue
            job.blocks += 1
            tokens = result[r, : job.config.max_new_tokens - row.block * L]
            eos = np.flatnonzero(np.isin(tokens, job.config.eos_token_id or ()))
            job.completion_tokens += int(eos[0]) + 1 if len(eos) else len(tokens)
            finish = "stop" if len(eos) else ("length" if row.block == _blocks(job, L) - 1 else None)
            if finish is None:
                job.events.put(Committed(tokens, int(steps[r]), None))
                go_on.append(r)
            else:
                job.finish = finish
                self._finish(job, Committed(tokens, int(steps[r]), finish))
        if go_on:
            model.encode(mx.array(result[go_on]), context.take(go_on))
        self.active = [rows[r] for r in go_on]
        for row in self.active:
            row.block += 1


def _blocks(job: Job, canvas_length: int) -> int:
    return math.ceil(job.config.max_new_tokens / canvas_length)
