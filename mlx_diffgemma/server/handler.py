"""The HTTP side: one thread per connection (the standard library's
``ThreadingHTTPServer``, as mlx-lm's server uses) reads a request, hands a
``Job`` to the scheduler and writes what comes back, as one JSON response or
as Server-Sent Events, one chunk per committed block."""

import hmac
import json
import logging
import queue
import select
import socket
from http.server import BaseHTTPRequestHandler
from typing import Iterator

from ..memory import InsufficientMemory
from .protocol import ApiError, Delta, Reply, Responder, StopWatch, parse, usage
from .scheduler import Committed, DraftStep, Failed, Job, QueueFull, ShuttingDown, Started

log = logging.getLogger("mlxdg.server")

ROUTES = {"/v1/chat/completions": "chat", "/chat/completions": "chat", "/v1/completions": "text",
          "/completions": "text"}
# How often a waiting handler looks whether its client is still there.
POLL_SECONDS = 0.05
RETRY_AFTER_SECONDS = 1


class ClientGone(Exception):
    pass


class Handler(BaseHTTPRequestHandler):
    server_version = "mlxdg-serve"
    timeout = 60  # seconds a client may take to send its request

    @property
    def app(self):
        return self.server.app

    def log_message(self, format, *args):  # the scheduler logs one line per request instead
        log.debug("%s %s", self.address_string(), format % args)

    # -- plumbing ---------------------------------------------------------------------------

    def _headers(self, status: int, content_type: str, extra=None, length=None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Access-Control-Allow-Origin", "*")
        if length is not None:
            self.send_header("Content-Length", str(length))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()

    def _json(self, status: int, obj, extra=None) -> None:
        data = json.dumps(obj, ensure_ascii=False).encode()
        self._headers(status, "application/json", extra, len(data))
        self.wfile.write(data)
        self.wfile.flush()

    def _error(self, error: ApiError) -> None:
        self._json(error.status, error.body(), error.headers)

    def _sse(self, obj) -> None:
        data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
        self.wfile.write(f"data: {data}\n\n".encode())
        self.wfile.flush()

    def _authorized(self) -> bool:
        key = self.app.api_key
        if key is None:
            return True
        given = self.headers.get("Authorization", "")
        token = given[7:] if given.startswith("Bearer ") else ""
        return hmac.compare_digest(token.encode(), key.encode())

    def _client_gone(self) -> bool:
        """The client closed its end: the connection reads as ended (it sends nothing while it waits)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    # -- routes -----------------------------------------------------------------------------

    def do_OPTIONS(self):
        self.send_response(204)
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
        self.send_header("Access-Control-Allow-Headers", "Authorization, Content-Type")
        self.end_headers()

    def do_GET(self):
        path = self.path.split("?")[0].rstrip("/")
        if path == "/health":
            healthy = self.app.scheduler.healthy()
            return self._json(200 if healthy else 503, {"status": "ok" if healthy else "unavailable",
                                                        **self.app.scheduler.stats()})
        if not self._authorized():
            return self._error(ApiError(401, "invalid API key", code="invalid_api_key"))
        served = self.app.served
        if path == "/v1/models":
            return self._json(200, {"object": "list", "data": [served.model_card()]})
        if path.startswith("/v1/models/"):
            if path[len("/v1/models/"):] in served.names:
                return self._json(200, served.model_card())
            return self._error(ApiError(404, f"no model {path[len('/v1/models/'):]!r}", code="model_not_found"))
        self._error(ApiError(404, f"no route {self.path}"))

    def do_POST(self):
        try:
            kind = ROUTES.get(self.path.split("?")[0].rstrip("/"))
            if kind is None:
                raise ApiError(404, f"no route {self.path}")
            if not self._authorized():
                raise ApiError(401, "invalid API key", code="invalid_api_key")
            request = parse(kind, self._body(), self.app.served)
            try:
                self.app.scheduler.fits_alone(len(request.prompt), request.config.max_new_tokens)
            except InsufficientMemory as e:
                raise ApiError(400, f"the request cannot fit in memory: {e}", code="insufficient_memory") from None
            job = Job(request.id, request.prompt, request.config, request.seed, prefix=request.prefix,
                      drafts=request.drafts and request.stream)
            try:
                self.app.scheduler.submit(job)
            except QueueFull as e:
                raise ApiError(503, f"the server is busy ({e}); retry later", code="queue_full",
                               headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
            except ShuttingDown as e:
                raise ApiError(503, str(e), code="shutting_down") from None
        except ApiError as e:
            log.info("refused %s: %d %s", self.path, e.status, e.message)
            return self._error(e)
        try:
            (self._stream if request.stream else self._complete)(request, job, Responder(request, self.app.served))
        except (ClientGone, OSError):  # gone, reset, or too slow to read (the socket's timeout)
            job.cancel()

    def _body(self):
        length = self.headers.get("Content-Length")
        try:
            length = int(length)
        except (TypeError, ValueError):
            raise ApiError(411 if length is None else 400, "a Content-Length header is required") from None
        raw = self.rfile.read(length)
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None

    # -- answering --------------------------------------------------------------------------

    def _events(self, job: Job) -> Iterator:
        """The job's events until its last, cancelling it when the client leaves."""
        while True:
            try:
                event = job.events.get(timeout=POLL_SECONDS)
            except queue.Empty:
                if self._client_gone():
                    raise ClientGone from None
                continue
            yield event
            if isinstance(event, Failed) or (isinstance(event, Committed) and event.finish is not None):
                return

    @staticmethod
    def _failure(event) -> ApiError:
        if isinstance(event, Failed):
            if isinstance(event.error, ShuttingDown):
                return ApiError(503, str(event.error), code="shutting_down")
            return ApiError(500, f"generation failed: {type(event.error).__name__}: {event.error}")
        return ApiError(503, "the request was cancelled: the server is shutting down", code="shutting_down")

    def _complete(self, request, job: Job, responder: Responder) -> None:
        reply, watch, answer, cached = Reply(self.app.served, request.config.eos_token_id), StopWatch(request.stop), \
            Delta(), 0
        for event in self._events(job):
            if isinstance(event, Started):
                cached = event.cached_tokens
            elif isinstance(event, Failed) or (isinstance(event, Committed) and event.finish == "cancelled"):
                return self._error(self._failure(event))
            elif isinstance(event, Committed):
                delta = reply.add(event.tokens, last=event.finish is not None)
                answer.content += watch.feed(delta.content, last=event.finish is not None)
                answer.reasoning += delta.reasoning
                answer.tool_texts += delta.tool_texts
                if event.finish is not None or watch.hit:
                    if watch.hit:
                        job.cancel()
                    finish = responder.finish_reason("stop" if watch.hit else event.finish, reply)
                    return self._json(200, responder.response(
                        answer, finish, usage(len(job.prompt), job.completion_tokens, cached)))

    def _stream(self, request, job: Job, responder: Responder) -> None:
        self._headers(200, "text/event-stream", {"Cache-Control": "no-cache"})
        reply, watch, cached = Reply(self.app.served, request.config.eos_token_id), StopWatch(request.stop), 0
        tokenizer = self.app.served.tokenizer
        for event in self._events(job):
            if isinstance(event, Started):
                cached = event.cached_tokens
                if request.kind == "chat":
                    self._sse(responder.chunk(None, role=True))
            elif isinstance(event, DraftStep):
                self._sse(responder.draft(event.block, event.step,
                                          tokenizer.decode(event.canvas.tolist(), skip_special_tokens=True)))
            elif isinstance(event, Failed) or (isinstance(event, Committed) and event.finish == "cancelled"):
                self._sse(self._failure(event).body())
            elif isinstance(event, Committed):
                delta = reply.add(event.tokens, last=event.finish is not None)
                delta.content = watch.feed(delta.content, last=event.finish is not None)
                if event.finish is None and not watch.hit:
                    if delta:
                        self._sse(responder.chunk(delta))
                    continue
                if watch.hit:
                    job.cancel()
                finish = responder.finish_reason("stop" if watch.hit else event.finish, reply)
                self._sse(responder.chunk(delta, finish, usage(len(job.prompt), job.completion_tokens, cached)))
                break
        self._sse("[DONE]")
