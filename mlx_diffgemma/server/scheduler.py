"""Continuous batching for the server: one thread owns the model and runs
the engine (``engine.Denoiser``) over every admitted request, so their
canvases share each denoising pass.

Requests wait in a bounded queue (``QueueFull`` past it) and join the running
batch at the next block boundary, up to ``max_batch`` and what the memory
planner fits next to the prefix cache. Rows in one pass share the sampler's
settings (the engine's run has one), so a request whose settings differ from
the running batch's waits until that batch drains, and nothing behind it
overtakes it (FIFO). Each request draws from its own seeded noise, so its
answer does not depend on what else is in the batch; a cancelled request
leaves the batch at the next denoising step.
"""

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field, fields
from typing import Callable, Dict, List, Optional

import mlx.core as mx
import numpy as np

from ..engine import Committed as Round
from ..engine import Denoiser, Draft, Request, RequestQueue
from ..memory import device_budget, inference_plan, kv_tokens_at_last_block, weight_bytes
from ..sampler import MLXNoise, SamplerConfig
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
    request: Optional[Request] = None  # the engine's, once admitted

    def cancel(self) -> None:
        self.cancelled.set()
        if self.request is not None:
            self.request.cancel()

    @property
    def sampler_key(self) -> tuple:
        """What requests denoised in one pass must share: all their settings but the length."""
        return tuple(getattr(self.config, f.name) for f in fields(SamplerConfig) if f.name != "max_new_tokens")

    def log_line(self) -> str:
        seconds = time.perf_counter() - self.submitted
        batch = self.shared / self.passes if self.passes else 0.0
        return (f"{self.id} prompt={len(self.prompt)} cached={self.cached_tokens} "
                f"completion={self.completion_tokens} blocks={self.blocks} steps={self.steps} "
                f"batch={batch:.1f}/{self.most_shared} seconds={seconds:.2f} finish={self.finish}")


class _Admission(RequestQueue):
    """The engine's view of the waiting jobs during a run with sampler settings ``key``."""

    def __init__(self, scheduler: "Scheduler", key: tuple):
        super().__init__()
        self.scheduler, self.key = scheduler, key

    def take(self, n: int) -> List[Request]:
        return self.scheduler._take(n, self.key)

    def __len__(self) -> int:
        return len(self.scheduler.waiting)


class Scheduler:
    """Owns the model on its own thread (``start``/``stop``); ``submit``
    queues a ``Job``. ``load`` builds the model on that thread: MLX streams
    belong to a thread, and a model loaded on another fails there."""

    def __init__(self, load: Callable[[], object], *, max_batch: int, max_queue: int = 64,
                 memory_limit=None, prefix_cache: bool = True, path: Optional[dict] = None):
        self._load = load
        self.path = path or {}  # the engine's path: Denoiser's exact, top_k and auto_canvas
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.budget = device_budget(memory_limit)
        self.use_prefix_cache = prefix_cache
        self.model = None
        self.prefix_cache: Optional[PrefixCache] = None
        self.waiting: deque = deque()
        self.active: Dict[Request, Job] = {}  # admitted, not finished
        self._logits_rows = 1
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
                for job in list(self.active.values()):
                    job.cancel()
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
            with self._wake:
                while not self.waiting and not self._stopping:
                    self._wake.wait(timeout=0.5)
                if not self.waiting:
                    return
                head = self.waiting[0]
            # One engine run per sampler setting: it ends when no request with that setting is left.
            memory = self._plan([self._context(head)], self._cached_bytes())
            self._logits_rows = memory.logits_rows(self.max_batch)
            denoiser = Denoiser(self.model, head.config, MLXNoise(), self._logits_rows, **self.path)
            try:
                for event in denoiser.run(_Admission(self, head.sampler_key), self.max_batch):
                    (self._draft if isinstance(event, Draft) else self._commit)(event)
            except Exception as e:  # a fault fails the requests it hit, not the server
                log.exception("generation failed")
                for job in list(self.active.values()):
                    self._finish(job, Failed(e))
                self.active.clear()

    def _generated_context(self, max_new_tokens: int) -> int:
        return kv_tokens_at_last_block([0], max_new_tokens, self.model.args.canvas_length)

    def _plan(self, contexts: List[int], cached_bytes: int):
        """The planner's view of rows with these contexts, beside ``cached_bytes`` of prefix cache."""
        return inference_plan(self.model.args, self.weights, max(contexts), self.dtype_bytes, self.budget - cached_bytes)

    def _cached_bytes(self) -> int:
        return self.prefix_cache.bytes if self.prefix_cache else 0

    def _prefix_capacity(self) -> int:
        """What the planner leaves beside a full batch of 4096-token requests."""
        memory = self._plan([4096], 0)
        return max(memory.budget - memory.peak(self.max_batch, memory.logits_rows(self.max_batch)), 0)

    def _context(self, job: Job) -> int:
        return len(job.prompt) + self._generated_context(job.config.max_new_tokens)

    def _take(self, n: int, key: tuple) -> List[Request]:
        """At a block boundary: up to ``n`` waiting requests (oldest first, sampler settings ``key``) that fit."""
        taken = []
        while len(taken) < n:
            with self._wake:
                if not self.waiting:
                    break
                job = self.waiting[0]
                if job.cancelled.is_set():
                    self.waiting.popleft()
                    job.finish = "cancelled"
                    log.info(job.log_line())
                    continue
                if job.sampler_key != key or not self._fits([self._context(j) for j in self.active.values()]
                                                            + [self._context(job)]):
                    break
                self.waiting.popleft()
            try:
                request = self._prefill(job)
            except Exception as e:
                log.exception("prefill failed")
                self._finish(job, Failed(e))
                continue
            self.active[request] = job
            taken.append(request)
        return taken

    def _fits(self, contexts: List[int]) -> bool:
        """Whether these rows fit with the run's logits rows, evicting prefix-cache entries for them if need be."""
        while True:
            memory = self._plan(contexts, self._cached_bytes())
            if memory.peak(len(contexts), min(len(contexts), self._logits_rows)) <= memory.budget:
                return True
            if not self._cached_bytes():
                return len(contexts) == 1  # alone it was checked at submission; run it anyway
            self.prefix_cache.evict_one()

    def _prefill(self, job: Job) -> Request:
        """The engine's request: the longest cached prefix of the prompt, the
        prompt encoded up to ``job.prefix`` and kept for later requests, and
        the rest (at least one token) left to the engine."""
        model, prompt = self.model, job.prompt
        last = len(prompt) - 1
        hit = self.prefix_cache.lookup(prompt[:last]) if self.prefix_cache else None
        cache = hit if hit is not None else model.make_cache()
        job.cached_tokens = position = cache[0].offset
        prefix = min(job.prefix, last)
        if self.prefix_cache is not None and position < prefix:
            model.encode(mx.array(prompt[None, position:prefix]), cache)
            self.prefix_cache.store(prompt[:prefix], cache)
            position = prefix
        job.request = Request(prompt[position:], max_new_tokens=job.config.max_new_tokens, noise=MLXNoise(job.seed),
                              cache=cache)
        if job.cancelled.is_set():
            job.request.cancel()
        job.events.put(Started(job.cached_tokens))
        return job.request

    def _finish(self, job: Job, event) -> None:
        if isinstance(event, Failed):
            job.finish = f"error ({type(event.error).__name__})"
        job.events.put(event)
        log.info(job.log_line())

    def _draft(self, draft: Draft) -> None:
        """A denoising step: count the canvases it shared, and pass the drafts on."""
        going = np.flatnonzero(draft.accepted > 0)  # rows in this step's pass (a row accepts at least one)
        for i in going:
            job = self.active[draft.requests[i]]
            job.passes += 1
            job.shared += len(going)
            job.most_shared = max(job.most_shared, len(going))
            if job.drafts:
                job.events.put(DraftStep(draft.row_blocks[i], draft.step, draft.canvas[i].copy()))

    def _commit(self, event: Round) -> None:
        """A committed block of each row: pass it on; a finished request leaves."""
        for i, request in enumerate(event.requests):
            job = self.active[request]
            job.steps += int(event.steps[i])
            tokens = event.tokens[i, : event.kept[i]]
            if event.cancelled[i]:
                finish, tokens = "cancelled", tokens[:0]
            else:
                job.blocks += 1
                eos = np.flatnonzero(np.isin(tokens, job.config.eos_token_id or ()))
                job.completion_tokens += int(eos[0]) + 1 if len(eos) else len(tokens)
                finish = ("stop" if event.eos[i] else "length") if event.finished[i] else None
            if finish is None:
                job.events.put(Committed(tokens, int(event.steps[i]), None))
                continue
            del self.active[request]
            job.finish = finish
            self._finish(job, Committed(tokens, int(event.steps[i]), finish))
