"""What the memory planner says fits when fine-tuning the real 26B-A4B on a Mac.

    python -m mlx_diffgemma.bench.train_forecast

The weights are the ``mixed`` 4-bit checkpoint's size (from the convert
recipe and the real shapes, no download); activations are bfloat16, as on
Metal. A Mac's budget is Metal's recommended working set, about three
quarters of its memory.
"""

import sys

import mlx_diffgemma  # noqa: F401  (binds the BLAS before MLX loads)
from mlx.utils import tree_flatten

from mlx_diffgemma.convert import recipes
from mlx_diffgemma.memory import GiB, human_size, parameter_count, training_plan
from mlx_diffgemma.model import Model, ModelArgs

MACS = (24, 32, 64)
WORKING_SET = 0.75
RUNS = [  # (batch, context tokens, grad checkpoint)
    (1, 256, False), (1, 256, True), (1, 1024, False), (1, 1024, True), (1, 2048, True), (4, 256, False),
    (4, 256, True), (4, 1024, True),
]


def table(recipe: str = "mixed", rank: int = 8, num_layers: int = 16) -> str:
    args = ModelArgs()
    shapes = {name: tuple(p.shape) for name, p in tree_flatten(Model(args).parameters())}
    weights = int(parameter_count(args) * recipes.bits_per_weight(recipe, shapes, 4, 64) / 8)
    lines = [f"26B-A4B, {recipe} checkpoint ({human_size(weights)}), LoRA rank {rank} on the last {num_layers} "
             f"layers, one {args.canvas_length}-token canvas per example:", "",
             "| batch | context | --grad-checkpoint | forecast peak | " + " | ".join(f"{m} GB Mac" for m in MACS) + " |",
             "|---|---|---|---|" + "---|" * len(MACS)]
    for batch, context, checkpoint in RUNS:
        plan = training_plan(args, weights, fine_tune_type="lora", num_layers=num_layers, rank=rank,
                             batch_size=batch, canvases=1, context=context + args.canvas_length,
                             grad_checkpoint=checkpoint, dtype_bytes=2, budget=1 << 50)
        fits = ["fits" if plan.peak <= m * WORKING_SET * GiB else "no" for m in MACS]
        lines.append(f"| {batch} | {context} | {'yes' if checkpoint else 'no'} | {human_size(plan.peak)} | "
                     + " | ".join(fits) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
    sys.exit(0)
