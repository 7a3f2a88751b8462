"""Block-diffusion generation.

The prompt is encoded once. Each block then starts from a random canvas and
is denoised for up to ``max_denoising_steps`` steps (see ``sampler``); its
argmax is committed and encoded into the cache before the next block, except
for the last block, which nothing reads. A step evaluates three graphs in
turn: the decoder over the canvases, then the vocabulary projection with the
sampler, then the next step's self-conditioning input, so that no logits
outlive their rows' sampling.

Prompts are batched: every prompt keeps its own cache, and each block the
rows are denoised together through a ``BatchedContext`` (left-padded, with
per-row positions, so a row's result does not depend on its neighbours).
Rows finish on their own: a row whose block has stopped keeps its result and
leaves the computation for the rest of that block, and a row that produced an
end-of-sequence token gets no further blocks. When more prompts wait than the
batch holds (``max_batch``; by default what the memory planner allows, at
most ``DEFAULT_MAX_BATCH``), a row
that finishes frees its slot for the next prompt at the next block boundary.
The logits ([canvas, vocab] float32, far larger than anything else a canvas
needs) exist only for as many rows at a time as the planner fits, so the
batch is not limited by them.
"""

import itertools
import math
import time
from collections import deque
from dataclasses import dataclass, field, fields, replace
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import numpy as np

from .cache import BatchedContext
from .memory import largest_context, parse_size, plan, weight_bytes
from .sampler import MLXNoise, NoiseSource, SamplerConfig, decide, empty_history, temper, temperatures

# The default cap on canvases denoised at once. A 256-token canvas already
# keeps an Apple GPU's (and this CPU's) arithmetic busy, so more canvases add
# latency and no throughput there (performance.md's roofline); where a step is
# bandwidth-bound (datacenter GPUs) the gain levels off within a few canvases.
DEFAULT_MAX_BATCH = 8

SAMPLER_OPTIONS = ("max_new_tokens", "max_denoising_steps", "entropy_bound", "t_min", "t_max",
                   "stability_threshold", "confidence_threshold", "eos_token_id", "pad_token_id")


@dataclass(frozen=True)
class Draft:
    """One denoising step of a block, for the batch ``rows`` still generating.
    ``block`` counts the batch's blocks; with continuous batching a row that
    joined later is at an earlier block of its own (``row_blocks``)."""

    block: int
    step: int
    rows: Tuple[int, ...]
    row_blocks: Tuple[int, ...]
    canvas: np.ndarray  # [len(rows), L] argmax; rows that stopped keep their result
    accepted: np.ndarray  # [len(rows)] positions accepted this step, 0 for rows that stopped earlier
    stopped: np.ndarray  # [len(rows)] whether the row's block is done


@dataclass(frozen=True)
class Statistics:
    """The running statistics of a whole call, named as mlx-lm names them."""

    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB


@dataclass(frozen=True)
class Block(Statistics):
    """A committed block, with the running statistics of the whole call."""

    block: int
    rows: Tuple[int, ...]
    row_blocks: Tuple[int, ...]  # each row's own block index
    tokens: np.ndarray  # [len(rows), L]; pad after an end-of-sequence token when pad_token_id is set
    texts: List[str]  # new answer text of each row
    thinking: List[str]  # new thinking-channel text of each row, starting with the channel's name
    steps: List[int]  # denoising steps each row ran in this block
    finish_reasons: List[Optional[str]]  # "stop" (end of sequence), "length", or None: more blocks follow
    tokens_per_forward: List[float]  # each row's so far: non-pad tokens per decoder pass, as the reference counts
    @property
    def text(self) -> str:
        return _only(self.texts)


@dataclass(frozen=True)
class GenerationResult(Statistics):
    """What ``generate`` returns; every list has one entry per batch row."""

    texts: List[str]  # the answers: no thinking channel, no special tokens, nothing after EOS
    thinking: List[str]
    tokens: List[List[int]]  # committed tokens of the blocks each row generated
    finish_reasons: List[str]  # "stop" (end-of-sequence token) or "length"
    steps_per_block: List[List[int]]
    tokens_per_forward: List[float]  # non-pad tokens per decoder pass, as the reference counts them
    @property
    def text(self) -> str:
        return _only(self.texts)


def _only(texts: List[str]) -> str:
    if len(texts) != 1:
        raise ValueError(f"{len(texts)} rows were generated; use .texts")
    return texts[0]


@dataclass
class _Committed:
    block: int
    rows: Tuple[int, ...]
    row_blocks: Tuple[int, ...]
    tokens: np.ndarray
    steps: np.ndarray
    eos: np.ndarray  # rows that produced an end-of-sequence token
    finished: np.ndarray
    prompt_time: float


def stream_generate(
    model,
    tokenizer,
    prompt: Union[str, Sequence[int], Sequence[Union[str, Sequence[int]]], None] = None,
    *,
    messages: Optional[List[dict]] = None,
    chat: bool = False,
    enable_thinking: bool = False,
    config: Optional[SamplerConfig] = None,
    seed: Optional[int] = None,
    noise: Optional[NoiseSource] = None,
    cache: Optional[list] = None,
    max_batch: Optional[int] = None,
    memory_limit=None,
    **options,
) -> Iterator[Union[Draft, Block]]:
    """Generate from ``prompt`` and yield a ``Draft`` after every denoising
    step and a ``Block`` after every committed block.

    ``prompt`` is text, token ids, or a list of either (a batch; lengths may
    differ). The chat template is applied to ``messages``, or to text prompts
    with ``chat=True``; thinking stays off unless ``enable_thinking``.
    Sampler settings come from ``config``, else from the checkpoint's
    generation config, and each can be overridden by keyword
    (``max_new_tokens``, ``max_denoising_steps``, ``entropy_bound``, ``t_min``,
    ``t_max``, ``stability_threshold``, ``confidence_threshold``,
    ``eos_token_id``, ``pad_token_id``). Randomness comes from ``noise``, or
    from MLX seeded with ``seed``.

    ``cache`` (one prompt only) continues a conversation: the prompt is
    appended to it, and afterwards it holds the prompt and every committed
    block but the last, as the reference leaves it. ``max_batch`` caps the
    canvases denoised at once; by default the memory planner picks it for
    ``memory_limit`` (bytes or "16GB"; the device's budget when None), at
    most ``DEFAULT_MAX_BATCH``, and a request that cannot fit at all fails
    before anything is allocated.
    """
    unknown = set(options) - set(SAMPLER_OPTIONS)
    if unknown:
        raise TypeError(f"unexpected options: {', '.join(sorted(unknown))}")
    prompts = prompt_ids(tokenizer, prompt, messages, chat, enable_thinking)
    if cache is not None and len(prompts) != 1:
        raise ValueError("cache= continues one conversation; give a single prompt")
    config = resolve_config(model, tokenizer, config, options)
    max_batch, logits_rows = batch_size(model, prompts, config, max_batch, memory_limit, cache)
    noise = noise or MLXNoise(seed)
    markers = _TextMarkers(tokenizer, config.eos_token_id)
    answers = [_AnswerText(tokenizer, markers) for _ in prompts]
    valid = np.zeros(len(prompts), dtype=np.int64)  # non-pad committed tokens, per row
    forwards = np.zeros(len(prompts), dtype=np.int64)  # decoder passes, per row
    prompt_tokens = sum(len(p) for p in prompts)

    mx.reset_peak_memory()
    start = time.perf_counter()
    generated = 0
    for event in _generate(model, prompts, config, noise, max_batch, logits_rows, cache):
        if isinstance(event, Draft):
            yield event
            continue
        rows = list(event.rows)
        if config.pad_token_id is None:
            valid[rows] += event.tokens.shape[1]
        else:
            valid[rows] += (event.tokens != config.pad_token_id).sum(axis=1)
        forwards[rows] += event.steps
        texts, thinking = zip(*(answers[r].add(tokens, last)
                                for r, tokens, last in zip(rows, event.tokens, event.finished)))
        generated += sum(answers[r].generated for r in rows)
        # Guards against a zero clock difference when a block costs next to nothing.
        prompt_time = max(event.prompt_time, 1e-9)
        generation_time = max(time.perf_counter() - start - prompt_time, 1e-9)
        yield Block(
            block=event.block,
            rows=event.rows,
            row_blocks=event.row_blocks,
            tokens=event.tokens,
            texts=list(texts),
            thinking=list(thinking),
            steps=event.steps.tolist(),
            finish_reasons=[("stop" if eos else "length") if done else None
                            for eos, done in zip(event.eos, event.finished)],
            tokens_per_forward=(valid[rows] / forwards[rows]).tolist(),
            prompt_tokens=prompt_tokens,
            prompt_tps=prompt_tokens / prompt_time,
            generation_tokens=generated,
            generation_tps=generated / generation_time,
            peak_memory=mx.get_peak_memory() / 1e9,
        )


def batch_size(model, prompts, config: SamplerConfig, max_batch, memory_limit, cache) -> Tuple[int, int]:
    """Canvases to denoise at once (``max_batch``, else as many as the memory
    planner fits, at most ``DEFAULT_MAX_BATCH``) and how many of them may
    have their logits at once; raises ``InsufficientMemory`` when not even
    one canvas fits."""
    context = largest_context([len(p) for p in prompts], config.max_new_tokens, model.args.canvas_length)
    if cache is not None:
        context += cache[0].offset
    dtype_bytes = model.dtype.size
    budget = None if memory_limit is None else parse_size(memory_limit)
    memory = plan(model.args, weight_bytes(model), context, dtype_bytes, budget)
    memory.require(1 if max_batch is None else min(max_batch, len(prompts)))
    canvases = max(1, min(max_batch or min(memory.max_canvases, DEFAULT_MAX_BATCH), len(prompts)))
    return canvases, memory.logits_rows(canvases)


def generate(model, tokenizer, prompt=None, *, verbose: bool = False, **kwargs) -> GenerationResult:
    """Run ``stream_generate`` to the end (same arguments) and return the
    answers with their statistics. ``verbose`` prints like ``mlx_lm.generate``."""
    answers = Answers()
    if verbose:
        print("=" * 10)
    for event in stream_generate(model, tokenizer, prompt, **kwargs):
        if isinstance(event, Block):
            answers.add(event)
            if verbose and len(answers.rows) == 1:
                print(event.texts[0], end="", flush=True)
    result = answers.result()
    if verbose:
        print_summary(result)
    return result


def statistics(block: Optional[Block]) -> dict:
    """The running statistics a block carries; None each before the first block."""
    return {f.name: getattr(block, f.name, None) for f in fields(Statistics)}


# What the thinking channel opens with; ``Answer.thinking`` is what follows it.
CHANNEL_NAME = "thought\n"


@dataclass
class Answer:
    """One prompt's answer as far as its blocks were committed."""

    text: str = ""
    channel: str = ""  # the thinking channel as generated: it opens with CHANNEL_NAME
    tokens: List[int] = field(default_factory=list)
    steps: List[int] = field(default_factory=list)
    finish_reason: Optional[str] = None  # "stop" or "length"; None while more blocks follow
    tokens_per_forward: float = 0.0

    @property
    def thinking(self) -> str:
        """The thinking so far, without the channel's name."""
        if CHANNEL_NAME.startswith(self.channel):
            return ""
        return self.channel.removeprefix(CHANNEL_NAME)

    def add(self, block: Block, i: int) -> None:
        """Take row ``i`` of ``block``."""
        self.text += block.texts[i]
        self.channel += block.thinking[i]
        self.tokens.extend(block.tokens[i].tolist())
        self.steps.append(block.steps[i])
        self.finish_reason = block.finish_reasons[i]
        self.tokens_per_forward = block.tokens_per_forward[i]


class Answers:
    """Gathers the ``Block``s of ``stream_generate`` into one ``Answer`` per
    prompt (``rows``, by prompt index), and into the ``GenerationResult``
    that ``generate`` returns."""

    def __init__(self):
        self.rows: Dict[int, Answer] = {}
        self.last: Optional[Block] = None

    def add(self, block: Block) -> List[int]:
        """Take a block; returns the prompts it finished."""
        self.last = block
        for i, r in enumerate(block.rows):
            self.rows.setdefault(r, Answer()).add(block, i)
        return [r for r, reason in zip(block.rows, block.finish_reasons) if reason is not None]

    def result(self) -> GenerationResult:
        return generation_result([self.rows[r] for r in sorted(self.rows)], self.last)


def generation_result(answers: List[Answer], last: Block) -> GenerationResult:
    """``answers`` (one per batch row, in order) with the running statistics of ``last``."""
    return GenerationResult(
        texts=[a.text for a in answers],
        thinking=[a.thinking for a in answers],
        tokens=[a.tokens for a in answers],
        finish_reasons=[a.finish_reason for a in answers],
        steps_per_block=[a.steps for a in answers],
        tokens_per_forward=[a.tokens_per_forward for a in answers],
        **statistics(last),
    )


def print_summary(result: GenerationResult, texts: bool = True):
    """mlx-lm's statistics lines, after each row's text for a batch or the end
    of the streamed line for one prompt (unless ``texts`` is false: the
    caller has shown them)."""
    if texts and len(result.texts) > 1:
        for i, text in enumerate(result.texts):
            print(f"[{i}] {text}")
    elif texts:
        print()
    blocks = sum(len(s) for s in result.steps_per_block)
    steps = sum(sum(s) for s in result.steps_per_block)
    tpf = sum(result.tokens_per_forward) / len(result.tokens_per_forward)
    print("=" * 10)
    print(f"Prompt: {result.prompt_tokens} tokens, {result.prompt_tps:.3f} tokens-per-sec")
    print(f"Generation: {result.generation_tokens} tokens, {result.generation_tps:.3f} tokens-per-sec")
    print(f"Diffusion: {blocks} blocks, {steps} steps, {tpf:.2f} tokens per forward")
    print(f"Peak memory: {result.peak_memory:.3f} GB")


def resolve_config(model, tokenizer, config: Optional[SamplerConfig], options: dict) -> SamplerConfig:
    """``config`` (else the checkpoint's, else the defaults) with ``options``
    applied. Unless ``eos_token_id`` is given, the tokenizer's end-of-sequence
    ids are added to the generation config's, as mlx-lm stops on both."""
    base = config or getattr(model, "generation_config", None) or SamplerConfig()
    config = base.override(**options)
    if options.get("eos_token_id") is None and tokenizer is not None:
        eos = set(config.eos_token_id or ()) | set(getattr(tokenizer, "eos_token_ids", None) or ())
        config = replace(config, eos_token_id=tuple(sorted(eos)) or None)
    return config


def prompt_ids(tokenizer, prompt, messages, chat: bool, enable_thinking: bool) -> List[np.ndarray]:
    """The prompts as token-id arrays, one per batch row."""
    if messages is not None:
        return [_ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                   enable_thinking=enable_thinking))]
    if prompt is None:
        raise TypeError("give a prompt or messages")
    if hasattr(prompt, "tolist"):
        prompt = prompt.tolist()
    single = isinstance(prompt, str) or (len(prompt) > 0 and isinstance(prompt[0], (int, np.integer)))
    rows = [prompt] if single else list(prompt)
    if not rows:
        raise ValueError("empty prompt")
    out = []
    for row in rows:
        if isinstance(row, str):
            if chat:
                row = tokenizer.apply_chat_template([{"role": "user", "content": row}],
                                                    add_generation_prompt=True, enable_thinking=enable_thinking)
            else:
                row = tokenizer.encode(row)
        elif chat:
            raise TypeError("chat=True needs text prompts")
        out.append(_ids(row))
    return out


def _ids(row) -> np.ndarray:
    ids = np.array(row, dtype=np.int32).reshape(-1)
    if ids.size == 0:
        raise ValueError("empty prompt")
    return ids


@dataclass
class _Slot:
    """A prompt being generated: its row in the batch, its cache, its block."""

    row: int
    cache: list
    block: int = 0


def _generate(model, prompts: List[np.ndarray], config: SamplerConfig, noise: NoiseSource, max_batch: int,
              logits_rows: int, cache: Optional[list]):
    """Token-level generation: yields ``Draft``s and ``_Committed`` blocks."""
    L = model.args.canvas_length
    n_blocks = math.ceil(config.max_new_tokens / L)
    eos = np.array(config.eos_token_id or (), dtype=np.int64)
    waiting = deque(range(len(prompts)))
    active: List[_Slot] = []
    prompt_time = 0.0

    def admit():
        nonlocal prompt_time
        while waiting and len(active) < max_batch:
            row = waiting.popleft()
            start = time.perf_counter()
            slot = _Slot(row, cache if cache is not None else model.make_cache())
            model.encode(mx.array(prompts[row][None]), slot.cache)
            prompt_time += time.perf_counter() - start
            active.append(slot)

    admit()
    round_ = 0
    while active:
        context = BatchedContext([slot.cache for slot in active])
        rows = np.array([slot.row for slot in active])
        blocks = np.array([slot.block for slot in active])
        tokens, steps = yield from _denoise_block(model, context, rows, blocks, round_, config, noise, logits_rows)
        is_eos = np.isin(tokens, eos)
        finished = is_eos.any(axis=1) | (blocks == n_blocks - 1)
        if config.pad_token_id is not None:
            after_eos = np.cumsum(is_eos, axis=1) - is_eos > 0
            tokens[after_eos] = config.pad_token_id
        yield _Committed(round_, tuple(rows.tolist()), tuple(blocks.tolist()), tokens, steps,
                         is_eos.any(axis=1), finished, prompt_time)
        keep = np.flatnonzero(~finished)
        if len(keep):
            model.encode(mx.array(tokens[keep]), context.take(keep.tolist()))
        active = [active[i] for i in keep]
        for slot in active:
            slot.block += 1
        admit()
        round_ += 1


def _by_block(draw, rows: Sequence[int], blocks: Sequence[int], *args, step: int) -> mx.array:
    """One noise draw for rows that may be at different blocks: one call per
    run of neighbouring rows at the same block, so no call mixes blocks (noise
    sources key their draws by block), and ``args`` (the logits) are passed as
    views, never copied."""
    parts = []
    for block, run in itertools.groupby(range(len(rows)), key=lambda i: blocks[i]):
        run = list(run)
        part = slice(run[0], run[-1] + 1)
        parts.append(draw(*(a[part] for a in args), list(rows[part]), block=block, step=step))
    return parts[0] if len(parts) == 1 else mx.concatenate(parts)


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


def denoise_step(model, context, canvas, soft_embeddings, history, config: SamplerConfig, temperature: float,
                 noise: NoiseSource, rows: Sequence[int], blocks: Sequence[int], step: int, *,
                 logits_rows: Optional[int] = None, last: bool = False) -> Step:
    """One denoising step of ``canvas`` [len(rows), L] for batch ``rows`` (at
    ``blocks``). The body runs on every row at once; the logits and everything
    computed from them (tempering, entropy, sampling, the next step's
    self-conditioning) exist for ``logits_rows`` rows at a time, all rows when
    None. ``last`` skips the self-conditioning that no step would read."""
    hidden = model.hidden_states(canvas, context, soft_embeddings)
    mx.eval(hidden)
    size = logits_rows or len(rows)
    parts = [_sample(model, hidden[start : start + size], history[:, start : start + size], config, temperature,
                     noise, rows[start : start + size], blocks[start : start + size], step, last)
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


def _sample(model, hidden, history, config: SamplerConfig, temperature: float, noise: NoiseSource,
            rows: Sequence[int], blocks: Sequence[int], step: int, last: bool) -> Step:
    """The sampler's part of a step for some rows, from their hidden states;
    their logits are freed when it returns."""
    L, V = model.args.canvas_length, model.args.vocab_size
    processed, entropy, argmax = temper(model.logits(hidden), mx.array(temperature))
    proposal = _by_block(noise.proposal, rows, blocks, processed, step=step)
    renoise = _by_block(lambda rows, **kw: noise.canvas(rows, L, V, **kw), rows, blocks, step=step)
    canvas, accepted, stop, history = decide(
        entropy, argmax, proposal.astype(renoise.dtype), renoise, history,
        mx.array(config.entropy_bound, dtype=mx.float32), mx.array(config.confidence_threshold, dtype=mx.float32))
    mx.eval(canvas, argmax, accepted, stop, history)
    stop = np.array(stop)
    soft = None
    if not last and not stop.all():
        going = processed if not stop.any() else processed[mx.array(np.flatnonzero(~stop))]
        soft = model.soft_embeddings(going)
        mx.eval(soft)
    return Step(canvas, argmax, accepted, stop, history, soft)


def _denoise_block(model, context: BatchedContext, rows: np.ndarray, blocks: np.ndarray, round_: int,
                   config: SamplerConfig, noise: NoiseSource, logits_rows: Optional[int]):
    """Denoise one block for batch ``rows``; returns its argmax [len(rows), L]
    and the steps each row ran."""
    L, V = model.args.canvas_length, model.args.vocab_size
    result = np.zeros((len(rows), L), dtype=np.int64)
    steps = np.zeros(len(rows), dtype=np.int64)
    active = np.arange(len(rows))  # positions in ``rows`` still denoising
    view = context
    canvas = _by_block(lambda rows, **kw: noise.canvas(rows, L, V, **kw), rows.tolist(), blocks.tolist(), step=0)
    soft_embeddings = None
    history = empty_history(config, len(rows), L)
    schedule = temperatures(config)

    for step, temperature in enumerate(schedule, start=1):
        out = denoise_step(model, view, canvas, soft_embeddings, history, config, temperature, noise,
                           rows[active].tolist(), blocks[active].tolist(), step,
                           logits_rows=logits_rows, last=step == len(schedule))
        result[active] = np.array(out.argmax)
        steps[active] += 1
        counts = np.zeros(len(rows), dtype=np.int64)
        counts[active] = np.array(out.accepted)
        stopped = np.ones(len(rows), dtype=bool)
        stopped[active] = out.stop
        yield Draft(round_, step, tuple(rows.tolist()), tuple(blocks.tolist()), result.copy(), counts, stopped)

        if out.stop.all():
            break
        canvas, history, soft_embeddings = out.canvas, out.history, out.soft_embeddings
        if out.stop.any():
            keep = np.flatnonzero(~out.stop)
            active = active[keep]
            index = mx.array(keep)
            canvas, history = canvas[index], history[:, index]
            view = context.take(active.tolist())
    return result, steps


class _TextMarkers:
    """What decides how a tokenizer's output becomes answer text."""

    def __init__(self, tokenizer, eos_token_id):
        vocab = tokenizer.get_vocab()
        self.channel_open = vocab.get("<|channel>")
        self.channel_close = vocab.get("<channel|>")
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        self.special = set(tokenizer.all_special_ids) | {i for i, t in added.items() if t.special}
        self.eos = set(eos_token_id or ())


class _AnswerText:
    """Turns one row's committed tokens into text: stops after the first
    end-of-sequence token, sends the thinking channel to its own stream and
    drops special tokens; mlx-lm's streaming detokenizers do the decoding."""

    def __init__(self, tokenizer, markers: _TextMarkers):
        self.markers = markers
        self.answer = tokenizer.detokenizer
        self.thought = tokenizer.detokenizer
        self.in_channel = False
        self.ended = False
        self.generated = 0  # tokens taken by the last ``add``, end-of-sequence included

    def add(self, tokens, last: bool) -> Tuple[str, str]:
        """The new (answer, thinking) text of a committed block."""
        m = self.markers
        self.generated = 0
        for token in map(int, tokens):
            if self.ended:
                break
            self.generated += 1
            if token in m.eos:
                self.ended = True
            elif token == m.channel_open:
                self.in_channel = True
            elif token == m.channel_close:
                self.in_channel = False
            elif token not in m.special:
                (self.thought if self.in_channel else self.answer).add_token(token)
        if last or self.ended:
            self.answer.finalize()
            self.thought.finalize()
        return self.answer.last_segment, self.thought.last_segment
