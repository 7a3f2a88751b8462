"""Milliseconds per denoising step on MLX's CPU backend: the reference BLAS that
``mlx[cpu]`` bundles against OpenBLAS, for float32, bfloat16, 4-bit quantized
and 4-bit dequantized-at-load checkpoints of a random-weight model.

    python -m mlx_diffgemma.bench.cpu_backend [--shape small] [--layers N] [--steps 3]

Two worker processes, one per BLAS, load the same checkpoints; their steps
are interleaved one at a time, so both see the same machine. Every timed step
is a steady-state one: self-conditioned, on a canvas of ``canvas_length``
after an encoded prompt. Nothing here is a test: it only reports.
"""

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx_diffgemma  # noqa: F401  (before MLX: it chooses MLX's BLAS)
from mlx_diffgemma import blas

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.utils import save_config, save_model

from mlx_diffgemma.bench.synthetic import build_diffusion_model, synthetic_args
from mlx_diffgemma.loader import load_model

QUANTIZATION = {"group_size": 64, "bits": 4, "mode": "affine"}
# name: (checkpoint, cpu_dequantize)
VARIANTS = {
    "float32": ("float32", "auto"),
    "bfloat16": ("bfloat16", "auto"),
    "4bit-never": ("q4", "never"),  # MLX's quantized kernels
    "4bit-auto": ("q4", "auto"),  # dequantized to float32 at load
}
PROMPT_LENGTH = 128


def write_checkpoints(args, out: Path) -> None:
    config = dataclasses.asdict(args)
    for name, dtype, quantized in (("float32", mx.float32, False), ("bfloat16", mx.bfloat16, False),
                                   ("q4", mx.float32, True)):
        model = build_diffusion_model(args, dtype=dtype)
        if quantized:
            nn.quantize(model, QUANTIZATION["group_size"], QUANTIZATION["bits"],
                        class_predicate=lambda path, module: hasattr(module, "to_quantized"))
        (out / name).mkdir(parents=True)
        save_model(out / name, model)
        save_config(dict(config, quantization=QUANTIZATION) if quantized else config, out / name / "config.json")


class Session:
    """One loaded variant: its model, an encoded prompt, a canvas to denoise,
    and the logits of a first, untimed step to self-condition on."""

    def __init__(self, path: Path, cpu_dequantize: str):
        self.model, _ = load_model(path, cpu_dequantize=cpu_dequantize)
        args = self.model.args
        rng = np.random.default_rng(0)
        self.cache = self.model.make_cache()
        self.model.encode(mx.array(rng.integers(0, args.vocab_size, (1, PROMPT_LENGTH))), self.cache)
        self.canvas = mx.array(rng.integers(0, args.vocab_size, (1, args.canvas_length)))
        self.logits = self.model.denoise(self.canvas, self.cache)
        mx.eval(self.logits)

    def step(self) -> float:
        start = time.perf_counter()
        self.logits = self.model.denoise(self.canvas, self.cache, self.logits)
        mx.eval(self.logits)
        return time.perf_counter() - start


def worker(checkpoints: Path) -> None:
    """Answer one JSON line per request line (a variant name) with a step's time."""
    sessions = {}
    for line in sys.stdin:
        name = line.strip()
        if name not in sessions:
            checkpoint, cpu_dequantize = VARIANTS[name]
            sessions[name] = Session(checkpoints / checkpoint, cpu_dequantize)
        session = sessions[name]
        reply = {"seconds": session.step(), "weight_paths": session.model.weight_paths, "blas": blas.setup()}
        print(json.dumps(reply), flush=True)


class Worker:
    def __init__(self, checkpoints: Path, bundled: bool):
        env = dict(os.environ)
        env.pop(blas.OPT_OUT_ENV, None)
        if bundled:
            env.pop("LD_PRELOAD", None)
            env[blas.OPT_OUT_ENV] = "1"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlx_diffgemma.bench.cpu_backend", "--worker", str(checkpoints)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def step(self, variant: str) -> dict:
        self.process.stdin.write(variant + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the benchmark worker exited (code {self.process.wait()})")
        return json.loads(line)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="small")
    parser.add_argument("--layers", type=int, default=None, help="layers of the shape to keep")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant and BLAS")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        metavar="VARIANT", help=f"any of: {', '.join(VARIANTS)}")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.worker:
        return worker(options.worker)
    if mx.default_device().type != mx.cpu:
        sys.exit("this benchmark measures MLX's CPU backend; the default device here is a GPU")
    if blas.bundled_reference_blas() is None:
        sys.exit("this MLX does not bundle the reference BLAS (only mlx[cpu] on Linux does): nothing to compare")

    args = synthetic_args(options.shape, options.layers)
    print(f"shape {options.shape}: {args.num_hidden_layers} layers, hidden {args.hidden_size}, "
          f"{args.num_experts} experts top-{args.top_k_experts} (width {args.moe_intermediate_size}), "
          f"dense MLP {args.intermediate_size}, vocab {args.vocab_size}, canvas {args.canvas_length} "
          f"after a {PROMPT_LENGTH}-token prompt, batch 1, self-conditioned steps")
    print(f"{platform.machine()}, {os.cpu_count()} cores, mlx {mx.__version__}; median of {options.steps} "
          f"steps after one warm-up, BLAS workers interleaved step by step; load average "
          f"{os.getloadavg()[0]:.1f} at the start")

    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoints(args, Path(tmp))
        workers = {"bundled": Worker(Path(tmp), bundled=True), "openblas": Worker(Path(tmp), bundled=False)}
        results = {(v, b): [] for v in options.variants for b in workers}
        try:
            for _ in range(options.steps):
                for variant in options.variants:
                    for name, w in workers.items():
                        results[variant, name].append(w.step(variant))
        finally:
            for w in workers.values():
                w.close()

    for name in workers:
        print(f"{name} BLAS: {results[options.variants[0], name][0]['blas']}")
    header = f"{'variant':<12} {'dense / experts':<26} {'bundled BLAS':>14} {'OpenBLAS':>10} {'speed-up':>9}"
    print(header)
    print("-" * len(header))
    for variant in options.variants:
        ms = {name: 1000 * statistics.median(r["seconds"] for r in results[variant, name]) for name in workers}
        paths = results[variant, "openblas"][0]["weight_paths"]
        path = f"{paths['dense']} / {paths['experts']}"
        print(f"{variant:<12} {path:<26} {ms['bundled']:>11.0f} ms {ms['openblas']:>7.0f} ms "
              f"{ms['bundled'] / ms['openblas']:>8.1f}x")


if __name__ == "__main__":
    main()
