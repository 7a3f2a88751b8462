"""Training-step speed and peak memory on random weights in real layer shapes,
beside the memory planner's forecast for the same run.

    python -m mlx_diffgemma.bench.train_step --shape 26b-a4b --layers 2 --context 256 --steps 3

One example per step: ``--context`` prompt tokens and an answer that fills
``--canvases`` canvases. The self-conditioned step (two decoder passes) and
the plain one are timed separately with injected draws, so each figure is one
kind of step. The weights are float32 on MLX's CPU backend (as ``mlxdg lora``
holds them there), bfloat16 elsewhere.
"""

import argparse
import json
import sys
import time

import mlx_diffgemma  # noqa: F401  (binds the BLAS before MLX loads)
import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_diffgemma.bench.synthetic import build_diffusion_model, synthetic_args
from mlx_diffgemma.cpu import on_cpu, prepare_weights
from mlx_diffgemma.memory import human_size, training_plan, weight_bytes
from mlx_diffgemma.tuner.adapters import prepare
from mlx_diffgemma.tuner.batches import Example, collate
from mlx_diffgemma.tuner.losses import Draws, Objective, draw


def measure(args) -> dict:
    margs = synthetic_args(args.shape, args.layers)
    model = build_diffusion_model(margs, dtype=mx.bfloat16, seed=0)
    if on_cpu():
        prepare_weights(model, "auto")
    prepare(model, args.fine_tune_type, -1, {"rank": args.rank})
    L = margs.canvas_length
    rng = np.random.default_rng(0)
    example = Example(rng.integers(3, margs.vocab_size, args.context).tolist(),
                      rng.integers(3, margs.vocab_size, args.canvases * L - 1).tolist() + [1])
    batch = collate([example] * args.batch_size, L, 0)
    objective = Objective(grad_checkpoint=args.grad_checkpoint)
    value_and_grad = nn.value_and_grad(model, objective)
    optimizer = __import__("mlx.optimizers", fromlist=["Adam"]).Adam(learning_rate=1e-5)
    model.train()
    base = draw(batch, margs.vocab_size, 0.5, key=mx.random.key(0))
    results = {}
    for name, sc in (("plain", False), ("self_conditioned", True)):
        draws = Draws(base.noise_level, base.replace, base.noise, mx.array([sc] * args.batch_size))
        times = []
        mx.reset_peak_memory()
        for i in range(args.steps + 1):  # the first is warm-up
            tic = time.perf_counter()
            (loss, n, *_), grads = value_and_grad(model, batch, draws)
            optimizer.update(model, grads)
            mx.eval(model.trainable_parameters(), optimizer.state, loss)
            if i:
                times.append(time.perf_counter() - tic)
        step = float(np.median(times))
        results[name] = {"step_seconds": step, "tokens_per_second": n.item() / step,
                         "peak_memory_bytes": mx.get_peak_memory(), "loss": loss.item()}
    plan = training_plan(margs, weight_bytes(model), fine_tune_type=args.fine_tune_type, num_layers=-1,
                         rank=args.rank, batch_size=args.batch_size, canvases=args.canvases,
                         context=example.length(L), grad_checkpoint=args.grad_checkpoint,
                         dtype_bytes=4 if on_cpu() else 2, budget=1 << 50)
    return {"shape": args.shape, "layers": margs.num_hidden_layers, "fine_tune_type": args.fine_tune_type,
            "rank": args.rank, "batch_size": args.batch_size, "context": args.context, "canvases": args.canvases,
            "grad_checkpoint": args.grad_checkpoint, "device": str(mx.default_device()),
            "weights_bytes": weight_bytes(model), "steps": results,
            "forecast": {"peak": plan.peak, "weights": plan.weights, "trainable": plan.trainable,
                         "activations": plan.activations, "logits": plan.logits}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="26b-a4b")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--fine-tune-type", default="lora", choices=["lora", "dora", "full"])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--canvases", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--grad-checkpoint", action="store_true")
    parser.add_argument("--json", help="Also write the results here.")
    args = parser.parse_args(argv)
    result = measure(args)
    print(f"{args.shape}, {result['layers']} layers, {args.fine_tune_type} rank {args.rank}, batch "
          f"{args.batch_size}, {args.context} context + {args.canvases} canvas(es), grad checkpoint "
          f"{args.grad_checkpoint}, {result['device']}; weights {human_size(result['weights_bytes'])}")
    print(f"  {'step':<18}{'s/step':>8}{'tok/s':>9}{'peak':>12}")
    for name, r in result["steps"].items():
        print(f"  {name:<18}{r['step_seconds']:>8.2f}{r['tokens_per_second']:>9.1f}"
              f"{human_size(r['peak_memory_bytes']):>12}")
    f = result["forecast"]
    print(f"  forecast peak {human_size(f['peak'])} (weights {human_size(f['weights'])}, trained "
          f"{human_size(f['trainable'])}, activations {human_size(f['activations'])}, logits {human_size(f['logits'])})")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
