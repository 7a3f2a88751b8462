"""Milliseconds per denoising step and per commit, on a random-weight model.

    python -m mlx_diffgemma.bench.step_time [--shape small] [--layers 2] [--batch 1] [--json out.json]

A step is timed as generation runs it: the decoder pass over the canvas with
self-conditioning, the sampler, the noise draws and the next step's
self-conditioning input. The decoder pass and vocabulary projection alone are
timed too, so the share of the sampler and self-conditioning is visible. A
commit encodes one canvas-length block into the cache; commits follow each
other, so the context grows by one block per commit, as in generation. This
is the baseline for speed work; nothing here is a test.
"""

import argparse
import json
import statistics
import time
from dataclasses import asdict, replace
from importlib.metadata import PackageNotFoundError, version

import mlx_diffgemma  # noqa: F401  (before MLX: it chooses MLX's BLAS)

import mlx.core as mx
from rich.console import Console
from rich.table import Table

from mlx_diffgemma.bench.synthetic import SHAPES, build_diffusion_model, synthetic_args
from mlx_diffgemma.engine import Denoiser, Row
from mlx_diffgemma.sampler import MLXNoise, SamplerConfig, empty_history, temperatures

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def _timed(fn, repeats: int, warmup: int) -> list:
    """Milliseconds of each of ``repeats`` calls of ``fn`` (which evaluates its own work)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return times


def measure(args, batch: int, prompt_tokens: int, repeats: int, warmup: int, dtype, seed: int = 0) -> dict:
    model = build_diffusion_model(args, dtype=dtype, seed=seed)
    L, V = args.canvas_length, args.vocab_size
    config = SamplerConfig()
    noise = MLXNoise(seed)
    rows = list(range(batch))

    cache = model.make_cache()
    prompt = mx.random.randint(0, V, (batch, prompt_tokens), key=mx.random.key(seed))
    start = time.perf_counter()
    model.encode(prompt, cache)
    prefill_ms = 1e3 * (time.perf_counter() - start)

    canvas = noise.canvas(rows, L, V, block=0, step=0)
    soft = model.soft_embeddings(model.denoise(canvas, cache) / float(temperatures(config)[0]))
    history = empty_history(config, batch, L)
    mx.eval(canvas, soft)

    denoiser = Denoiser(model, config, noise)

    def step():
        denoiser.step(cache, canvas, soft, history, [Row(r) for r in rows], step=2,
                      temperature=float(temperatures(config)[1]))

    def forward():
        mx.eval(model.logits(model.hidden_states(canvas, cache, soft)))

    step_ms = _timed(step, repeats, warmup)
    forward_ms = _timed(forward, repeats, warmup)
    block = mx.random.randint(0, V, (batch, L), key=mx.random.key(seed + 1))
    commit_ms = _timed(lambda: model.encode(block, cache), repeats, warmup)
    return {
        "prefill_ms": prefill_ms,
        "step_ms": step_ms,
        "forward_ms": forward_ms,
        "commit_ms": commit_ms,
        "context_after": cache[0].offset,
    }


def _versions() -> dict:
    found = {}
    for package in ("mlx", "mlx-lm", "mlx-diffgemma"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description="Milliseconds per denoising step and per commit.")
    parser.add_argument("--shape", default="tiny", choices=sorted(SHAPES),
                        help="model shape (bench.synthetic.SHAPES; 26b-a4b is the real one)")
    parser.add_argument("--layers", type=int, help="number of layers (default: the shape's)")
    parser.add_argument("--canvas-length", type=int, help="canvas length (default: the shape's)")
    parser.add_argument("--vocab-size", type=int, help="vocabulary size (default: the shape's)")
    parser.add_argument("--batch", type=int, default=1, help="rows denoised together")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="encoded context before the first step")
    parser.add_argument("--dtype", choices=sorted(DTYPES),
                        help="weight dtype (default: float32 on the CPU, where half precision is slow; "
                             "bfloat16 elsewhere)")
    parser.add_argument("--repeats", type=int, default=10, help="timed repetitions of each measurement")
    parser.add_argument("--warmup", type=int, default=2, help="untimed repetitions first (compilation)")
    parser.add_argument("--json", help="also write the results to this file")
    opts = parser.parse_args(argv)

    args = synthetic_args(opts.shape, opts.layers)
    overrides = {k: v for k, v in (("canvas_length", opts.canvas_length), ("vocab_size", opts.vocab_size)) if v}
    args = replace(args, **overrides)
    dtype_name = opts.dtype or ("float32" if mx.default_device() == mx.cpu else "bfloat16")
    results = measure(args, opts.batch, opts.prompt_tokens, opts.repeats, opts.warmup, DTYPES[dtype_name])

    L = args.canvas_length
    tokens = opts.batch * L
    table = Table(title=f"{opts.shape}: {args.num_hidden_layers} layers, hidden {args.hidden_size}, "
                        f"vocab {args.vocab_size}, canvas {L}, batch {opts.batch}, {dtype_name}, "
                        f"{mx.default_device()}")
    for column in ("", "median ms", "min ms", "ms per canvas token"):
        table.add_column(column, justify="left" if not column else "right")
    for name, key in (("denoise step (forward + sampler)", "step_ms"), ("decoder forward only", "forward_ms"),
                      ("commit (encode one block)", "commit_ms")):
        times = results[key]
        median = statistics.median(times)
        table.add_row(name, f"{median:.2f}", f"{min(times):.2f}", f"{median / tokens:.4f}")
    table.add_row(f"prefill ({opts.prompt_tokens} tokens, once)", f"{results['prefill_ms']:.2f}", "", "")
    Console().print(table)

    if opts.json:
        report = {
            "shape": opts.shape, "args": asdict(args), "dtype": dtype_name, "batch": opts.batch,
            "prompt_tokens": opts.prompt_tokens, "repeats": opts.repeats, "warmup": opts.warmup,
            "device": str(mx.default_device()), "versions": _versions(),
            "median_ms": {k: statistics.median(results[k]) for k in ("step_ms", "forward_ms", "commit_ms")},
            **results,
        }
        with open(opts.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
