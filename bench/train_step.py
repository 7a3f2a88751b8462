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
import resource
import sys
import time
from dataclasses import replace

import mlx_diffgemma  # noqa: F401  (binds the BLAS before MLX loads)
import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_diffgemma import model as model_module
from mlx_diffgemma.bench.synthetic import build_diffusion_model, synthetic_args
from mlx_diffgemma.cpu import on_cpu, prepare_weights
from mlx_diffgemma.memory import human_size, training_plan, weight_bytes
from mlx_diffgemma.tuner.adapters import prepare
from mlx_diffgemma.tuner.batches import Example, collate
from mlx_diffgemma.tuner.losses import Draws, Objective, draw


def measure(args) -> dict:
    margs = synthetic_args(args.shape, args.layers)
    margs = replace(margs, **{k: v for k, v in (("num_experts", args.num_experts), ("vocab_size", args.vocab_size))
                              if v is not None})
    if args.experts != "auto":  # the CPU backend's choice, forced either way
        model_module.GROUPED_EXPERT_SIZE = 0 if args.experts == "grouped" else float("inf")
    model = build_diffusion_model(margs, dtype=mx.bfloat16, seed=0)
    if on_cpu():
        prepare_weights(model, "auto")
        mx.clear_cache()  # the bfloat16 originals, which the process would otherwise keep
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
                         "peak_memory_bytes": mx.get_peak_memory(), "loss": loss.item(),
                         "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                         * (1 if sys.platform == "darwin" else 1024)}
        plan = training_plan(margs, weight_bytes(model), fine_tune_type=args.fine_tune_type, num_layers=-1,
                             rank=args.rank, batch_size=args.batch_size, canvases=args.canvases,
                             context=example.length(L), grad_checkpoint=args.grad_checkpoint,
                             dtype_bytes=4 if on_cpu() else 2, host_routing=model.layers[0].experts.grouped,
                             self_conditioning=sc, budget=1 << 50)
        results[name]["forecast_peak_bytes"] = plan.peak
    return {"shape": args.shape, "layers": margs.num_hidden_layers, "num_experts": margs.num_experts,
            "vocab_size": margs.vocab_size, "grouped_experts": model.layers[0].experts.grouped,
            "fine_tune_type": args.fine_tune_type,
            "rank": args.rank, "batch_size": args.batch_size, "context": args.context, "canvases": args.canvases,
            "grad_checkpoint": args.grad_checkpoint, "device": str(mx.default_device()),
            "weights_bytes": weight_bytes(model), "steps": results,
            "forecast": {"peak": plan.peak, "weights": plan.weights, "trainable": plan.trainable,
                         "activations": plan.activations, "logits": plan.logits}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="26b-a4b")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--num-experts", type=int, help="Fewer experts than the shape's (only the weights shrink).")
    parser.add_argument("--vocab-size", type=int, help="Another vocabulary size than the shape's.")
    parser.add_argument("--experts", default="auto", choices=["auto", "grouped", "gathered"],
                        help="How the experts run on the CPU backend (auto: grouped when large).")
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
    print(f"{args.shape}, {result['layers']} layers, {result['num_experts']} experts "
          f"({'grouped' if result['grouped_experts'] else 'gathered'}), vocabulary {result['vocab_size']}, "
          f"{args.fine_tune_type} rank {args.rank}, batch "
          f"{args.batch_size}, {args.context} context + {args.canvases} canvas(es), grad checkpoint "
          f"{args.grad_checkpoint}, {result['device']}; weights {human_size(result['weights_bytes'])}")
    print(f"  {'step':<18}{'s/step':>8}{'tok/s':>9}{'peak':>12}{'forecast':>12}{'max RSS':>12}")
    for name, r in result["steps"].items():
        print(f"  {name:<18}{r['step_seconds']:>8.2f}{r['tokens_per_second']:>9.1f}"
              f"{human_size(r['peak_memory_bytes']):>12}{human_size(r['forecast_peak_bytes']):>12}"
              f"{human_size(r['max_rss_bytes']):>12}")
    f = result["forecast"]
    print(f"  the run's forecast peak {human_size(f['peak'])} (weights {human_size(f['weights'])}, trained "
          f"{human_size(f['trainable'])}, activations {human_size(f['activations'])}, logits {human_size(f['logits'])})")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
