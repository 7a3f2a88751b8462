"""``mlxdg serve``: an OpenAI-compatible HTTP server whose concurrent requests
share denoising passes (continuous batching) and whose conversations keep
their KV caches between turns (prefix reuse).

``protocol`` reads requests and builds responses, ``handler`` speaks HTTP,
``scheduler`` runs the model, ``prefix`` keeps the caches.
"""

import logging
import os
import signal
import sys
import threading
from http.server import ThreadingHTTPServer
from typing import Optional

from .handler import Handler
from .protocol import Served
from .scheduler import Scheduler

log = logging.getLogger("mlxdg.server")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_MAX_QUEUE = 64


class Server:
    """``served`` answered by ``scheduler`` on ``host:port`` (port 0: any free one)."""

    def __init__(self, served: Served, scheduler: Scheduler, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                 api_key: Optional[str] = None):
        self.served, self.scheduler, self.api_key = served, scheduler, api_key
        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = False  # close() waits for the answers being written
        self.httpd.app = self
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="mlxdg-http", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "Server":
        self.scheduler.start()
        self._thread.start()
        return self

    def close(self, cancel: bool = False, timeout: Optional[float] = None) -> None:
        """Stop taking connections; requests in flight finish (or, with
        ``cancel``, stop at their next step) and get their answers."""
        self.httpd.shutdown()
        self.scheduler.stop(cancel_active=cancel, timeout=timeout)
        self.httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close(cancel=True)


def open_server(model: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *, max_batch: Optional[int] = None,
                max_queue: int = DEFAULT_MAX_QUEUE, memory_limit=None, api_key: Optional[str] = None,
                max_tokens: Optional[int] = None, prefix_cache: bool = True, cpu_dequantize: str = "auto",
                exact: bool = True, sc_top_k: Optional[int] = None, canvas: str = "full",
                adapter_path: Optional[str] = None) -> Server:
    """A server for the checkpoint ``model`` (with the adapters ``mlxdg lora`` wrote to
    ``adapter_path``), not started (``start`` loads the weights); ``exact``, ``sc_top_k``
    and ``canvas`` choose the engine's path as ``mlxdg generate`` does."""
    from ..loader import Checkpoint
    from ..sampler import DEFAULT_SELF_CONDITIONING_TOP_K
    from ..generate import resolve_config
    from ..memory import DEFAULT_MAX_BATCH

    checkpoint = Checkpoint(model, adapter_path=adapter_path, cpu_dequantize=cpu_dequantize, memory_limit=memory_limit)
    checkpoint.sampler = checkpoint.sampler.override(max_new_tokens=max_tokens)
    checkpoint.check_memory([1])
    served = Served(model, checkpoint.tokenizer, checkpoint.args,
                    resolve_config(None, checkpoint.tokenizer, checkpoint.sampler, {}),
                    aliases=(str(checkpoint.path), checkpoint.path.name))
    if canvas not in ("full", "auto"):
        raise ValueError(f"canvas must be 'full' or 'auto', not {canvas!r}")
    path = dict(exact=exact, top_k=sc_top_k or DEFAULT_SELF_CONDITIONING_TOP_K, auto_canvas=canvas == "auto")
    scheduler = Scheduler(checkpoint.load, max_batch=max_batch or DEFAULT_MAX_BATCH, max_queue=max_queue,
                          memory_limit=memory_limit, prefix_cache=prefix_cache, path=path)
    return Server(served, scheduler, host, port, api_key)


def serve(model: str, **options) -> None:
    """Serve ``model`` (options as ``open_server`` takes them) until SIGINT
    or SIGTERM: the first lets the requests in flight finish, a second cancels them."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    server = open_server(model, **options)
    scheduler = server.scheduler
    stop, presses = threading.Event(), []

    def on_signal(signum, frame):
        presses.append(signum)
        if len(presses) > 1:
            scheduler.stop(cancel_active=True, timeout=0)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        log.info("loading %s", model)
        server.start()
        log.info("serving %s at %s (batches of up to %d, queue %d%s)", model, server.url, scheduler.max_batch,
                 scheduler.max_queue, ", API key required" if server.api_key else "")
        while not stop.wait(0.5):
            pass
        stats = scheduler.stats()
        log.info("shutting down: %d running requests finish, %d waiting are refused (again to cancel)",
                 stats["active"], stats["waiting"])
        server.httpd.shutdown()
        scheduler.stop(timeout=0)
        while not scheduler.join(0.2):
            pass
        server.httpd.server_close()
        log.info("stopped")
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    exit_now()


def exit_now(code: int = 0) -> None:
    """End the process without running interpreter teardown: everything is
    answered and closed by now, and MLX's per-thread streams, destroyed at
    teardown after the engine thread has ended, sometimes abort the process
    ("terminate called without an active exception")."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
