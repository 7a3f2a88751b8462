"""Serving benchmark: total throughput and latency per request of ``mlxdg
serve`` with 1, 2, 4, 8 ... concurrent clients, on a random-weight model.

The server runs in this process on loopback; each client sends ``rounds``
text-completion requests back to back (token-id prompts, fixed-step blocks,
``ignore_eos``, so every request does the same work). Concurrent requests
share denoising passes, so total tok/s grows with the clients until a pass is
compute-bound, while each request's latency grows with what it shares.

    python -m mlx_diffgemma.bench.serve --synthetic small --clients 1,2,4,8
"""

import argparse
import http.client
import json
import logging
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from typing import List

import numpy as np

import mlx_diffgemma  # noqa: F401  (binds MLX to a real BLAS first)
from mlx_diffgemma.bench.synthetic import SHAPES, build_diffusion_model, synthetic_args
from mlx_diffgemma.sampler import SamplerConfig
from mlx_diffgemma.server import Server
from mlx_diffgemma.server.protocol import Served
from mlx_diffgemma.server.scheduler import Scheduler


def word_tokenizer(vocab_size: int):
    """A tokenizer over ``vocab_size`` made-up words, with Gemma's first special ids, for random-weight models."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(len(specials), vocab_size)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(specials)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                 unk_token="<unk>")
    return TokenizerWrapper(hf)


@dataclass(frozen=True)
class ServeRecord:
    clients: int
    requests: int
    seconds: float
    completion_tokens: int
    tokens_per_second: float  # all clients together
    latency_mean_s: float
    latency_max_s: float
    first_block_mean_s: float  # until the first committed block arrived


def _request(url_host, url_port, body) -> tuple:
    """(seconds to the first block, seconds to the end, completion tokens) of one streamed request."""
    connection = http.client.HTTPConnection(url_host, url_port, timeout=600)
    start = time.perf_counter()
    connection.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
        raise RuntimeError(f"{response.status}: {response.read()[:200]!r}")
    first, tokens = None, 0
    for line in response:
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
            first = time.perf_counter() - start
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    connection.close()
    return first, time.perf_counter() - start, tokens


def run(server: Server, clients: int, rounds: int, prompt_tokens: int, gen_tokens: int, steps: int,
        seed: int) -> ServeRecord:
    host, port = server.httpd.server_address[:2]
    rng = np.random.default_rng(seed)
    vocab = server.served.args.vocab_size
    results: List[tuple] = []
    lock = threading.Lock()

    bodies = [[{"prompt": rng.integers(4, vocab, prompt_tokens).tolist(), "max_tokens": gen_tokens,
                "stream": True, "seed": seed + index * rounds + r, "ignore_eos": True,
                "max_denoising_steps": steps, "confidence_threshold": 0.0} for r in range(rounds)]
              for index in range(clients)]

    def client(index: int):
        for body in bodies[index]:
            result = _request(host, port, body)
            with lock:
                results.append(result)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    tokens = sum(r[2] for r in results)
    return ServeRecord(clients, len(results), seconds, tokens, tokens / seconds,
                       statistics.mean(r[1] for r in results), max(r[1] for r in results),
                       statistics.mean(r[0] for r in results))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synthetic", default="small", choices=sorted(SHAPES))
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--clients", default="1,2,4,8")
    parser.add_argument("--rounds", type=int, default=2, help="requests each client sends, one after the other")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--gen-tokens", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8, help="fixed denoising steps per block")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", dest="json_path", default=None)
    parser.add_argument("--log", action="store_true", help="print the server's line per request to stderr")
    args = parser.parse_args(argv)
    if args.log:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        logging.getLogger("httpx").setLevel(logging.WARNING)
    counts = [int(c) for c in args.clients.split(",")]
    model_args = synthetic_args(args.synthetic, args.layers)
    import mlx.core as mx

    dtype = mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16  # CPU experts run in float32 only
    served = Served(f"synthetic-{args.synthetic}", word_tokenizer(model_args.vocab_size), model_args,
                    SamplerConfig(eos_token_id=[1]))
    scheduler = Scheduler(lambda: build_diffusion_model(model_args, dtype=dtype, seed=args.seed),
                          max_batch=max(counts), prefix_cache=False)
    server = Server(served, scheduler, port=0).start()
    try:
        run(server, 1, 1, args.prompt_tokens, args.gen_tokens, args.steps, args.seed)  # warm-up
        records = [run(server, c, args.rounds, args.prompt_tokens, args.gen_tokens, args.steps, args.seed)
                   for c in counts]
    finally:
        server.close(cancel=True)
    base = records[0].tokens_per_second
    print(f"synthetic {args.synthetic} ({model_args.num_hidden_layers} layers, canvas {model_args.canvas_length}), "
          f"prompt {args.prompt_tokens}, {args.gen_tokens} tokens per request, {args.steps} steps per block, "
          f"{args.rounds} requests per client")
    print(f"{'clients':>7} {'requests':>8} {'tok/s':>8} {'gain':>6} {'latency s':>10} {'max s':>7} {'first block s':>14}")
    for r in records:
        print(f"{r.clients:>7} {r.requests:>8} {r.tokens_per_second:>8.1f} {r.tokens_per_second / base:>5.2f}x "
              f"{r.latency_mean_s:>10.2f} {r.latency_max_s:>7.2f} {r.first_block_mean_s:>14.2f}")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"options": vars(args), "records": [asdict(r) for r in records]}, f, indent=2)
    return 0


if __name__ == "__main__":
    from mlx_diffgemma.server import exit_now

    exit_now(main())
