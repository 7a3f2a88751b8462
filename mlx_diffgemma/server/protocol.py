"""The OpenAI API as the server speaks it: reading requests into what the
engine runs, and turning committed tokens into responses and stream chunks
(the shapes mlx-lm's server uses, with ``reasoning_content`` for thinking)."""

import copy
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
from mlx_lm.server import ToolCallFormatter, process_message_content

from ..generate import CHANNEL_NAME, _AnswerText, _TextMarkers
from ..memory import positions_needed
from ..model import ModelArgs
from ..sampler import SamplerConfig, constant_temperature

# Our sampler's settings, taken per request as extra body fields.
SAMPLER_FIELDS = {"max_denoising_steps": int, "entropy_bound": float, "t_min": float, "t_max": float,
                  "stability_threshold": int, "confidence_threshold": float}

# Parameters the sampler cannot honour, with the values that ask for nothing.
_NO_OP = {
    "top_p": (None, 1, 1.0), "top_k": (None, 0, -1), "min_p": (None, 0, 0.0),
    "logprobs": (None, False), "top_logprobs": (None, 0), "n": (None, 1), "best_of": (None, 1),
    "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "repetition_penalty": (None, 0, 1),
    "logit_bias": (None, {}), "echo": (None, False), "suffix": (None, ""),
    "response_format": (None, {"type": "text"}),
}
_WHY = {
    "response_format": "structured output is not supported by the diffusion sampler",
    **{name: "the sampler draws every position from the whole tempered distribution; entropy_bound sets how "
             "much of a canvas a step accepts" for name in ("top_p", "top_k", "min_p")},
    "n": "one choice per request (n=1); send several requests, they are batched",
    "best_of": "one choice per request",
}

# The model thinks or not; it has no degrees of effort.
_EFFORTS = {"none": False, "minimal": False, "low": True, "medium": True, "high": True}

# Stands for the model's answer when rendering a conversation, to find where the answer goes.
_ANSWER = "MLXDG-ANSWER-MARKER"


class ApiError(Exception):
    """A request answered with ``status`` and an OpenAI-style JSON error."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "not_found_error", 503: "server_error"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass
class Served:
    """The served model, as far as requests need it (nothing here needs the weights)."""

    id: str
    tokenizer: Any
    args: ModelArgs
    sampler: SamplerConfig  # the defaults, end-of-sequence ids resolved
    aliases: tuple = ()
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        self.markers = _TextMarkers(self.tokenizer, self.sampler.eos_token_id)
        parser = getattr(self.tokenizer, "tool_parser", None)
        start = getattr(self.tokenizer, "tool_call_start", None)
        end = getattr(self.tokenizer, "tool_call_end", None)
        if parser is None:  # DiffusionGemma speaks Gemma 4's tool format whatever its template names
            from mlx_lm.tool_parsers import gemma4

            parser, start, end = gemma4.parse_tool_call, gemma4.tool_call_start, gemma4.tool_call_end
        vocab = self.tokenizer.get_vocab()
        self.tool_parser = parser
        self.tool_start, self.tool_end = vocab.get(start), vocab.get(end)

    @property
    def names(self) -> set:
        return {self.id, *self.aliases}

    def model_card(self) -> dict:
        return {"id": self.id, "object": "model", "created": self.created, "owned_by": "mlx-diffgemma"}


@dataclass
class Request:
    """A request read and checked: what the engine runs and how to answer."""

    kind: str  # "chat" or "text"
    id: str
    model: str
    prompt: np.ndarray
    prefix: int  # prompt tokens a later request of the same conversation starts with
    config: SamplerConfig
    seed: int
    stream: bool = False
    drafts: bool = False
    tools: Optional[list] = None
    stop: tuple = ()


_KINDS = {bool: "a boolean", int: "an integer", float: "a number"}


def _typed(body: dict, name: str, kind, default=None, minimum=None):
    """``body[name]`` checked to be of ``kind`` (bool, int or float) and at least ``minimum``; ``default`` when absent."""
    value = body.get(name)
    if value is None:
        return default
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = {bool: isinstance(value, bool), int: numeric and isinstance(value, int), float: numeric}[kind]
    if not ok:
        raise ApiError(400, f"{name} must be {_KINDS[kind]}, got {value!r}", param=name)
    if minimum is not None and value < minimum:
        raise ApiError(400, f"{name} must be at least {minimum}, got {value!r}", param=name)
    return value


def parse(kind: str, body, served: Served) -> Request:
    """``body`` of ``/v1/chat/completions`` (``kind`` "chat") or ``/v1/completions`` ("text")."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model not in served.names:
        raise ApiError(404, f"the model {model!r} is not served here; this server serves {served.id!r}",
                       param="model", code="model_not_found")
    for name, allowed in _NO_OP.items():
        if name in body and body[name] not in allowed:
            why = _WHY.get(name, "the diffusion sampler cannot honour it")
            raise ApiError(400, f"{name}={body[name]!r} is not supported: {why}", param=name,
                           code="unsupported_parameter")
    stream = _typed(body, "stream", bool, False)
    drafts = _typed(body, "stream_drafts", bool, False)
    max_tokens = _typed(body, "max_completion_tokens", int, minimum=1)
    if max_tokens is None:
        max_tokens = _typed(body, "max_tokens", int, served.sampler.max_new_tokens, minimum=1)
    seed = _typed(body, "seed", int, minimum=0)
    if seed is not None and seed >= 1 << 64:
        raise ApiError(400, "seed must be below 2**64", param="seed")
    seed = secrets.randbits(63) if seed is None else seed
    options = {name: _typed(body, name, kind) for name, kind in SAMPLER_FIELDS.items()}
    try:  # a constant temperature, as `--temp` sets it
        options.update(constant_temperature(_typed(body, "temperature", float), options["t_min"], options["t_max"]))
    except ValueError as e:
        raise ApiError(400, str(e), param="temperature") from None
    if _typed(body, "ignore_eos", bool, False):  # as vLLM has it: every answer runs to max_tokens
        options["eos_token_id"] = ()
    try:
        config = served.sampler.override(max_new_tokens=max_tokens, **options)
    except ValueError as e:
        raise ApiError(400, str(e)) from None

    tools = None
    if kind == "chat":
        prompt, prefix, tools = _chat_prompt(body, served)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
    else:
        prompt = _text_prompt(body, served)
        prefix = len(prompt)
        request_id = f"cmpl-{uuid.uuid4().hex}"
    needed = positions_needed(len(prompt), max_tokens, served.args.canvas_length)
    if needed > served.args.max_position_embeddings:
        raise ApiError(400, f"the prompt is {len(prompt)} tokens; with up to {max_tokens} new tokens that needs "
                            f"{needed} positions, but the model has {served.args.max_position_embeddings}; "
                            "shorten the prompt or lower max_tokens", param="messages" if kind == "chat" else "prompt",
                       code="context_length_exceeded")
    return Request(kind, request_id, model or served.id, prompt, prefix, config, seed, stream, drafts, tools,
                   _stop_sequences(body))


def _stop_sequences(body: dict) -> tuple:
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is None:
        return ()
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise ApiError(400, "stop must be a string or a list of up to 4 strings", param="stop")
    return tuple(s for s in stop if s)


def _chat_prompt(body: dict, served: Served):
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects", param="messages")
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        raise ApiError(400, "every message must be an object with a role", param="messages")
    tools = body.get("tools") or None
    if tools is not None and not isinstance(tools, list):
        raise ApiError(400, "tools must be a list", param="tools")
    choice = body.get("tool_choice")
    if choice == "none":
        tools = None
    elif choice not in (None, "auto"):
        raise ApiError(400, f"tool_choice={choice!r} is not supported: the model decides (auto) or tools are "
                            "left out (none)", param="tool_choice", code="unsupported_parameter")
    extra = body.get("chat_template_kwargs") or {}
    if not isinstance(extra, dict):
        raise ApiError(400, "chat_template_kwargs must be an object", param="chat_template_kwargs")
    extra = dict(extra)
    think = bool(extra.pop("enable_thinking", False))
    effort = body.get("reasoning_effort")  # OpenAI's name for it: any effort turns thinking on
    if effort is not None:
        if effort not in _EFFORTS:
            raise ApiError(400, f"reasoning_effort must be one of {', '.join(_EFFORTS)}", param="reasoning_effort")
        think = _EFFORTS[effort]
    try:
        process_message_content(messages)
    except (ValueError, KeyError, TypeError) as e:
        raise ApiError(400, f"messages: {e}", param="messages") from None
    tokenizer = served.tokenizer
    kwargs = dict(tools=tools, enable_thinking=think, **extra)
    try:
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, **kwargs)
    except Exception as e:  # the template's own checks (roles, alternation) raise jinja errors
        raise ApiError(400, f"the chat template refused the messages: {e}", param="messages") from None
    prompt = np.array(prompt, dtype=np.int32).reshape(-1)
    try:
        history = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": _ANSWER}],
                                                add_generation_prompt=False, **kwargs)
        prefix = _common_prefix(prompt, history)
    except Exception:
        prefix = len(prompt)
    return prompt, prefix, tools


def _common_prefix(a, b) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differ[0]) if len(differ) else n


def _text_prompt(body: dict, served: Served) -> np.ndarray:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = served.tokenizer.encode(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if not all(0 <= t < served.args.vocab_size for t in prompt):
            raise ApiError(400, f"prompt token ids must be in [0, {served.args.vocab_size})", param="prompt")
        ids = prompt
    else:
        raise ApiError(400, "prompt must be a string or a list of token ids (one prompt per request)", param="prompt")
    if len(ids) == 0:
        raise ApiError(400, "the prompt is empty", param="prompt")
    return np.array(ids, dtype=np.int32)


@dataclass
class Delta:
    content: str = ""
    reasoning: str = ""
    tool_texts: List[str] = field(default_factory=list)

    def __bool__(self):
        return bool(self.content or self.reasoning or self.tool_texts)


class Reply(_AnswerText):
    """One answer's committed tokens as text, as ``generate`` makes it
    (nothing after the first end-of-sequence token, the thinking channel
    apart, special tokens dropped), with the tool calls apart too: their raw
    text, for the tool parser."""

    def __init__(self, served: Served, eos_token_id=None):
        markers = served.markers
        if eos_token_id is not None:
            markers = copy.copy(markers)
            markers.eos = set(eos_token_id)
        super().__init__(served.tokenizer, markers)
        self.served = served
        self.channel = ""  # as generated: it opens with CHANNEL_NAME
        self.tool: Optional[List[int]] = None  # the tokens of an open tool call
        self.tools: List[str] = []
        self.made_tool_call = False

    @property
    def thinking(self) -> str:
        return "" if CHANNEL_NAME.startswith(self.channel) else self.channel.removeprefix(CHANNEL_NAME)

    def _take(self, token: int) -> None:
        s = self.served
        if token in self.markers.eos or (self.tool is None and token != s.tool_start):
            super()._take(token)
        elif self.tool is None:
            self.tool = []
        elif token == s.tool_end:
            self._close_tool_call()
        else:
            self.tool.append(token)

    def _close_tool_call(self) -> None:
        self.tools.append(self.served.tokenizer.decode(self.tool))
        self.tool = None
        self.made_tool_call = True

    def add(self, tokens, last: bool) -> Delta:
        shown = self.thinking
        content, thought = super().add(tokens, last)
        if (last or self.ended) and self.tool:  # cut off by max_tokens: the parser may still read it
            self._close_tool_call()
        self.channel += thought
        tools, self.tools = self.tools, []
        return Delta(content, self.thinking[len(shown):], tools)


class StopWatch:
    """Cuts the answer text before the first of the ``stop`` strings. Text
    that may be the start of one is held back until the next block shows."""

    def __init__(self, stop: tuple):
        self.stop = stop
        self.held = ""
        self.hit = False

    def feed(self, text: str, last: bool) -> str:
        """What of the text so far can be sent; ``hit`` once a stop string showed."""
        if not self.stop:
            return text
        self.held += text
        found = [i for i in (self.held.find(s) for s in self.stop) if i >= 0]
        if found:
            self.hit, out, self.held = True, self.held[: min(found)], ""
            return out
        keep = 0 if last else max(len(s) for s in self.stop) - 1
        cut = len(self.held) - keep
        out, self.held = self.held[:cut], self.held[cut:]
        return out


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


class Responder:
    """Builds the response objects of one request."""

    def __init__(self, request: Request, served: Served):
        self.request = request
        self.served = served
        self.created = int(time.time())
        self.tools = ToolCallFormatter(served.tool_parser, request.tools, streaming=request.stream)

    def _base(self, obj: str) -> dict:
        return {"id": self.request.id, "object": obj, "created": self.created, "model": self.request.model,
                "system_fingerprint": "mlx-diffgemma"}

    def finish_reason(self, finish: str, reply: Reply) -> str:
        return "tool_calls" if finish == "stop" and reply.made_tool_call else finish

    def response(self, delta: Delta, finish: str, usage_: dict) -> dict:
        """The whole answer, not streamed."""
        if self.request.kind == "text":
            choice = {"index": 0, "text": delta.content, "finish_reason": finish, "logprobs": None}
            return {**self._base("text_completion"), "choices": [choice], "usage": usage_}
        message = {"role": "assistant", "content": delta.content or None}
        if delta.reasoning:
            message["reasoning_content"] = delta.reasoning
        calls = self.tools(delta.tool_texts)
        if calls:
            message["tool_calls"] = calls
        choice = {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
        return {**self._base("chat.completion"), "choices": [choice], "usage": usage_}

    def chunk(self, delta: Optional[Delta], finish: Optional[str] = None, usage_: Optional[dict] = None,
              role: bool = False) -> dict:
        """One stream chunk: new text, or the end (``finish`` and ``usage``)."""
        delta = delta or Delta()
        if self.request.kind == "text":
            choice = {"index": 0, "text": delta.content, "finish_reason": finish, "logprobs": None}
            out = {**self._base("text_completion"), "choices": [choice]}
        else:
            fields_ = {"role": "assistant"} if role else {}
            if delta.content or role:
                fields_["content"] = delta.content
            if delta.reasoning:
                fields_["reasoning_content"] = delta.reasoning
            calls = self.tools(delta.tool_texts)
            if calls:
                fields_["tool_calls"] = calls
            out = {**self._base("chat.completion.chunk"),
                   "choices": [{"index": 0, "delta": fields_, "finish_reason": finish, "logprobs": None}]}
        if usage_ is not None:
            out["usage"] = usage_
        return out

    def draft(self, block: int, step: int, text: str) -> dict:
        """A per-step draft (``stream_drafts``): no choices, so OpenAI clients pass over it."""
        obj = "text_completion" if self.request.kind == "text" else "chat.completion.chunk"
        return {**self._base(obj), "choices": [], "draft": {"block": block, "step": step, "text": text}}
