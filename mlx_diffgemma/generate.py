"""Block-diffusion generation from text: prompts in, answers out.

The public layer over ``engine``, as mlx-lm's ``generate`` is over its
``generate_step``: it turns prompts into requests, sizes the batch with the
memory planner, runs the ``Denoiser`` and turns its committed tokens into
text and statistics. When more prompts wait than the batch holds
(``max_batch``; by default what the memory planner allows, at most
``memory.DEFAULT_MAX_BATCH``), a prompt that finishes frees its slot for the next
one at the next block boundary.
"""

import difflib
import time
from dataclasses import dataclass, field, fields, replace
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import numpy as np

from .engine import Committed, Denoiser, Draft, Request
from .memory import generation_plan
from .sampler import DEFAULT_SELF_CONDITIONING_TOP_K, MLXNoise, NoiseSource, SamplerConfig, constant_temperature

SAMPLER_OPTIONS = tuple(f.name for f in fields(SamplerConfig))


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
    """A committed round of blocks, with the running statistics of the whole call."""

    round: int
    rows: Tuple[int, ...]
    row_blocks: Tuple[int, ...]  # each row's own block index
    tokens: np.ndarray  # [len(rows), L]; pad after an end-of-sequence token when pad_token_id is set
    texts: List[str]  # new answer text of each row, within max_new_tokens
    generated: List[int]  # tokens of each row's block that are its answer's: to max_new_tokens and EOS
    thinking: List[str]  # new thinking-channel text of each row, starting with the channel's name
    steps: List[int]  # denoising steps each row ran in this block
    finish_reasons: List[Optional[str]]  # "stop" (end of sequence), "length", or None: more blocks follow
    tokens_per_forward: List[float]  # each row's so far: non-pad tokens per decoder pass, as the reference counts
    @property
    def text(self) -> str:
        return _only(self.texts)


@dataclass(frozen=True)
class GenerationResult(Statistics):
    """What ``batch_generate`` returns; every list has one entry per prompt."""

    texts: List[str]  # the answers: no thinking channel, no special tokens, nothing after EOS
    thinking: List[str]
    tokens: List[List[int]]  # committed tokens of the blocks each row generated
    finish_reasons: List[str]  # "stop" (end-of-sequence token) or "length"
    steps_per_block: List[List[int]]
    tokens_per_forward: List[float]  # non-pad tokens per decoder pass, as the reference counts them
    @property
    def text(self) -> str:
        return _only(self.texts)

    @property
    def stats(self) -> Statistics:
        """The statistics alone, where mlx-lm's ``BatchResponse`` keeps them."""
        return Statistics(**run_statistics(self))


def _only(texts: List[str]) -> str:
    if len(texts) != 1:
        raise ValueError(f"{len(texts)} rows were generated; use .texts")
    return texts[0]


def stream_blocks(
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
    exact: bool = True,
    top_k: Optional[int] = None,
    canvas: str = "full",
    **options,
) -> Iterator[Union[Draft, Block]]:
    """Generate from ``prompt`` and yield a ``Draft`` after every denoising
    step and a ``Block`` after every committed round of blocks.

    ``prompt`` is text, token ids, or a list of either (a batch; lengths may
    differ). The chat template is applied to ``messages``, or to text prompts
    with ``chat=True``; thinking stays off unless ``enable_thinking``.
    Sampler settings come from ``config``, else from the checkpoint's
    generation config, and each can be overridden by keyword (the fields of
    ``SamplerConfig``; ``max_tokens`` is ``max_new_tokens`` and may be a list,
    one per prompt; ``temp`` is a constant temperature, t_min = t_max).
    Answers hold at most ``max_new_tokens`` tokens each, exactly. Randomness
    comes from ``noise``, or from MLX seeded with ``seed``.

    ``cache`` (one prompt only) continues a conversation: the prompt is
    appended to it, and afterwards it holds the prompt and every committed
    block but the last, as the reference leaves it. ``max_batch`` caps the
    canvases denoised at once; by default the memory planner picks it for
    ``memory_limit`` (bytes or "16GB"; the device's budget when None), at
    most ``memory.DEFAULT_MAX_BATCH``, and a request that cannot fit at all fails
    before anything is allocated.

    ``exact`` (the default) keeps the reference path, token for token
    transformers' with the same draws; ``exact=False`` takes the fast path
    (one pass over the logits, self-conditioning from the ``top_k`` most
    likely tokens of each position, 32 by default). ``canvas="auto"`` denoises
    a shorter canvas when fewer tokens than a canvas remain (an eighth, a
    quarter, a half or the whole one), so a short answer costs less; "full"
    always denoises the model's whole canvas, as the reference does.
    """
    if canvas not in ("full", "auto"):
        raise ValueError(f"canvas must be 'full' or 'auto', not {canvas!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
    options = sampler_options(options)
    prompts = prompt_ids(tokenizer, prompt, messages=messages, chat=chat, enable_thinking=enable_thinking)
    if cache is not None and len(prompts) != 1:
        raise ValueError("cache= continues one conversation; give a single prompt")
    limits = options.get("max_new_tokens")
    if isinstance(limits, (list, tuple)):
        if len(limits) != len(prompts):
            raise ValueError(f"max_tokens has {len(limits)} entries for {len(prompts)} prompts")
        options["max_new_tokens"] = max(limits)
    else:
        limits = [None] * len(prompts)
    config = resolve_config(model, tokenizer, config, options)
    memory = generation_plan(model, map(len, prompts), config.max_new_tokens,
                             cached=0 if cache is None else cache[0].offset, memory_limit=memory_limit)
    max_batch, logits_rows = memory.batch(len(prompts), max_batch)
    denoiser = Denoiser(model, config, noise or MLXNoise(seed), logits_rows, exact=exact,
                        top_k=top_k or DEFAULT_SELF_CONDITIONING_TOP_K, auto_canvas=canvas == "auto")
    markers = _TextMarkers(tokenizer, config.eos_token_id)
    answers = [_AnswerText(tokenizer, markers) for _ in prompts]
    valid = np.zeros(len(prompts), dtype=np.int64)  # non-pad committed tokens, per row
    forwards = np.zeros(len(prompts), dtype=np.int64)  # decoder passes, per row
    prompt_tokens = sum(len(p) for p in prompts)
    requests = [Request(p, max_new_tokens=n, cache=cache) for p, n in zip(prompts, limits)]

    mx.reset_peak_memory()
    start = time.perf_counter()
    generated = 0
    for event in denoiser.run(requests, max_batch):
        if isinstance(event, Draft):
            yield event
            continue
        rows = list(event.rows)
        if config.pad_token_id is None:
            valid[rows] += event.tokens.shape[1]
        else:
            valid[rows] += (event.tokens != config.pad_token_id).sum(axis=1)
        forwards[rows] += event.steps
        kept = np.where(event.cancelled, 0, event.kept)  # a cancelled row's last block is no answer's
        texts, thinking = zip(*(answers[r].add(tokens[:n], last)
                                for r, tokens, n, last in zip(rows, event.tokens, kept, event.finished)))
        counts = [answers[r].generated for r in rows]
        generated += sum(counts)
        # Guards against a zero clock difference when a block costs next to nothing.
        prompt_time = max(event.prompt_time, 1e-9)
        generation_time = max(time.perf_counter() - start - prompt_time, 1e-9)
        yield Block(
            round=event.round,
            rows=event.rows,
            row_blocks=event.row_blocks,
            tokens=event.tokens,
            texts=list(texts),
            generated=counts,
            thinking=list(thinking),
            steps=event.steps.tolist(),
            finish_reasons=finish_reasons(event),
            tokens_per_forward=(valid[rows] / forwards[rows]).tolist(),
            prompt_tokens=prompt_tokens,
            prompt_tps=prompt_tokens / prompt_time,
            generation_tokens=generated,
            generation_tps=generated / generation_time,
            peak_memory=mx.get_peak_memory() / 1e9,
        )


def finish_reasons(event: Committed) -> List[Optional[str]]:
    """Each row's: "stop" (end of sequence), "length", "cancelled", or None while more blocks follow."""
    return [("cancelled" if cancelled else "stop" if eos else "length") if done else None
            for eos, done, cancelled in zip(event.eos, event.finished, event.cancelled)]


@dataclass(frozen=True)
class GenerationResponse(Statistics):
    """What ``stream_generate`` yields, once per committed block, with
    mlx-lm's fields: ``text`` is the block's new answer text, ``token`` its
    last token. A canvas is sampled as a whole, so there are no per-token
    ``logprobs`` (None) and nothing comes from a draft model."""

    text: str
    token: Optional[int]  # None when the block added no token (its answer had ended)
    finish_reason: Optional[str]  # "stop", "length", or None while more blocks follow
    tokens: List[int]  # the block's tokens within the answer
    thinking: str  # the block's new thinking-channel text
    steps: int  # denoising steps of the block
    tokens_per_forward: float  # so far
    logprobs: None = None
    from_draft: bool = False


def stream_generate(model, tokenizer, prompt=None, max_tokens: Optional[int] = None,
                    **kwargs) -> Iterator[GenerationResponse]:
    """mlx-lm's ``stream_generate`` for one prompt: a ``GenerationResponse``
    per committed block, the last with its ``finish_reason``. Keywords as
    ``stream_blocks``, which also yields every denoising step's draft."""
    prompt = _one_prompt(tokenizer, prompt, kwargs, "stream_blocks")
    for block in stream_blocks(model, tokenizer, prompt, max_tokens=max_tokens, **kwargs):
        if isinstance(block, Block):
            tokens = block.tokens[0][: block.generated[0]].tolist()
            yield GenerationResponse(
                text=block.texts[0], token=tokens[-1] if tokens else None, finish_reason=block.finish_reasons[0],
                tokens=tokens, thinking=block.thinking[0], steps=block.steps[0],
                tokens_per_forward=block.tokens_per_forward[0], **run_statistics(block))


def generate(model, tokenizer, prompt=None, max_tokens: Optional[int] = None, verbose: bool = False,
             **kwargs) -> str:
    """mlx-lm's ``generate``: the answer to one prompt, as text. ``verbose``
    streams it and prints mlx-lm's statistics lines. Keywords as
    ``stream_blocks``; ``batch_generate`` returns the tokens, thinking and
    statistics too, for one prompt or many."""
    prompt = _one_prompt(tokenizer, prompt, kwargs, "batch_generate")
    return batch_generate(model, tokenizer, prompt, max_tokens, verbose, **kwargs).text


def batch_generate(model, tokenizer, prompts=None, max_tokens=None, verbose: bool = False,
                   **kwargs) -> GenerationResult:
    """Answer every prompt (text, token ids, or a list of either), batched,
    and return the answers with their statistics, one entry per prompt in
    each list. ``max_tokens`` may be a list, one per prompt. ``verbose``
    prints mlx-lm's statistics lines (and streams a single prompt's answer).
    Keywords as ``stream_blocks``."""
    answers = Answers()
    if verbose:
        print("=" * 10)
    for event in stream_blocks(model, tokenizer, prompts, max_tokens=max_tokens, **kwargs):
        if isinstance(event, Block):
            answers.add(event)
            if verbose and len(answers.rows) == 1:
                print(event.texts[0], end="", flush=True)
    result = answers.result()
    if verbose:
        print_summary(result)
    return result


def _one_prompt(tokenizer, prompt, kwargs: dict, batched: str) -> np.ndarray:
    """The token ids of a call's single prompt; the chat options are taken out of ``kwargs``."""
    prompts = prompt_ids(tokenizer, prompt, messages=kwargs.pop("messages", None), chat=kwargs.pop("chat", False),
                         enable_thinking=kwargs.pop("enable_thinking", False))
    if len(prompts) != 1:
        raise TypeError(f"{len(prompts)} prompts given; this takes one (use {batched} for several)")
    return prompts[0]


# Keywords of mlx-lm's generate that mean nothing for a canvas denoised in parallel, and what to use instead.
NOT_FOR_DIFFUSION = {
    "sampler": "a per-token sampler; canvases are sampled by the checkpoint's entropy-bound sampler: "
               "set temp=, t_min=/t_max= or entropy_bound=",
    "logits_processors": "per-token logits processors do not apply to a canvas denoised in parallel",
    "draft_model": "speculative decoding does not apply: a block is already decoded in parallel",
    "prompt_cache": "use cache=, a model.make_cache() that the prompt is appended to",
    "max_kv_size": "sliding-window layers bound their caches themselves",
    "temperature": "a constant temperature is temp=; a schedule is t_max= (first step) to t_min= (last)",
}

API_KEYWORDS = ("max_tokens", "temp", "verbose", "messages", "chat", "enable_thinking", "config", "seed", "noise",
                "cache", "max_batch", "memory_limit", "exact", "top_k", "canvas")


def sampler_options(options: dict) -> dict:
    """``options`` as SamplerConfig overrides: ``max_tokens`` becomes
    ``max_new_tokens`` and ``temp`` both temperatures; anything else unknown
    raises TypeError with a hint."""
    options = dict(options)
    max_tokens = options.pop("max_tokens", None)
    if max_tokens is not None:
        if options.get("max_new_tokens") is not None:
            raise TypeError("give max_tokens or max_new_tokens, not both")
        options["max_new_tokens"] = max_tokens
    try:
        options.update(constant_temperature(options.pop("temp", None), options.get("t_min"), options.get("t_max"),
                                            name="temp="))
    except ValueError as e:
        raise TypeError(str(e)) from None
    unknown = sorted(set(options) - set(SAMPLER_OPTIONS))
    if unknown:
        raise TypeError(f"unexpected options: {'; '.join(map(_hint, unknown))}")
    return options


def _hint(name: str) -> str:
    if name in NOT_FOR_DIFFUSION:
        return f"{name} ({NOT_FOR_DIFFUSION[name]})"
    close = difflib.get_close_matches(name, SAMPLER_OPTIONS + API_KEYWORDS, n=1)
    return f"{name} (did you mean {close[0]}?)" if close else name


def run_statistics(block: Optional[Block]) -> dict:
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
        **run_statistics(last),
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


def prompt_ids(tokenizer, prompt, *, messages: Optional[List[dict]] = None, chat: bool = False,
               enable_thinking: bool = False) -> List[np.ndarray]:
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
                # As mlx-lm: no second BOS before a prompt that starts with one (a rendered chat template).
                bos = getattr(tokenizer, "bos_token", None)
                row = tokenizer.encode(row, add_special_tokens=bos is None or not row.startswith(bos))
        elif chat:
            raise TypeError("chat=True needs text prompts")
        out.append(_ids(row))
    return out


def _ids(row) -> np.ndarray:
    ids = np.array(row, dtype=np.int32).reshape(-1)
    if ids.size == 0:
        raise ValueError("empty prompt")
    return ids


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
        self.generated = 0
        for token in map(int, tokens):
            if self.ended:
                break
            self.generated += 1
            self._take(token)
        if last or self.ended:
            self.answer.finalize()
            self.thought.finalize()
        return self.answer.last_segment, self.thought.last_segment

    def _take(self, token: int) -> None:
        m = self.markers
        if token in m.eos:
            self.ended = True
        elif token == m.channel_open:
            self.in_channel = True
        elif token == m.channel_close:
            self.in_channel = False
        elif token not in m.special:
            (self.thought if self.in_channel else self.answer).add_token(token)
