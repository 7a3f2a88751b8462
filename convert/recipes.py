"""Quantization recipes: which weight matrices get how many bits.

A recipe is data: a one-line description and the bits for each part of the
model. ``"q_bits"`` stands for the ``--q-bits`` the user asked for. Parts a
recipe leaves out, and everything that is not a matrix (norms, layer scalars,
the router's input scale and per-expert scales), are never quantized.
"""

import math
import re
from typing import Dict, Mapping, Optional, Sequence, Tuple

# The part of the model a weight belongs to, matched against its MLX name.
PARTS = {
    "embedding": r"\.embed_tokens\.weight$",  # also the tied LM head
    "attention": r"\.self_attn\.[qkvo]_proj\.weight$",
    "router": r"\.router\.proj\.weight$",
    "dense_mlp": r"\.layers\.\d+\.mlp\.(gate|up|down)_proj\.weight$",
    "self_conditioning": r"\.self_conditioning\.(gate|up|down)_proj\.weight$",
    "experts": r"\.experts\.(gate_up|down)_proj\.weight$",
}

RECIPES = {
    "mixed": {
        "description": "experts at --q-bits (default 4); embedding, attention, router, "
                       "dense MLPs at 8 bits",
        "bits": {"experts": "q_bits", "embedding": 8, "attention": 8, "router": 8,
                 "dense_mlp": 8, "self_conditioning": 8},
    },
    "4bit": {
        "description": "every weight matrix at 4 bits",
        "bits": {part: 4 for part in PARTS},
    },
    "8bit": {
        "description": "every weight matrix at 8 bits",
        "bits": {part: 8 for part in PARTS},
    },
}

DEFAULT_RECIPE = "mixed"
DEFAULT_Q_BITS = 4
Q_BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)

_PART_PATTERNS = [(part, re.compile(pattern)) for part, pattern in PARTS.items()]


def part_of(name: str) -> Optional[str]:
    for part, pattern in _PART_PATTERNS:
        if pattern.search(name):
            return part
    return None


def fixes_bits(recipe: str) -> bool:
    """Whether the recipe ignores --q-bits."""
    return "q_bits" not in RECIPES[recipe]["bits"].values()


def quant_params(recipe: str, name: str, shape: Sequence[int], q_bits: int,
                 group_size: int) -> Optional[Dict[str, int]]:
    """``{"group_size", "bits"}`` for the weight ``name`` of ``shape``, or None
    to keep it unquantized."""
    if len(shape) < 2:
        return None
    bits = RECIPES[recipe]["bits"].get(part_of(name))
    if bits is None:
        return None
    if bits == "q_bits":
        bits = q_bits
    # Widths such as the real model's 2112 and 704 are not multiples of 128:
    # a smaller group still quantizes them, rather than leaving whole
    # projections in 16 bits.
    for size in sorted((g for g in GROUP_SIZES if g <= group_size), reverse=True):
        if shape[-1] % size == 0:
            return {"group_size": size, "bits": bits}
    return None


def quantized_bytes(shape: Sequence[int], params: Mapping[str, int], scale_bytes: int) -> int:
    """Bytes of the packed weight plus its affine scales and biases."""
    rows = math.prod(shape[:-1])
    width = shape[-1]
    return rows * (width * params["bits"] // 8 + 2 * (width // params["group_size"]) * scale_bytes)


def bits_per_weight(recipe: str, shapes: Mapping[str, Tuple[int, ...]], q_bits: int,
                    group_size: int, float_bytes: int = 2) -> float:
    """Stored bits per parameter over ``shapes`` (MLX names), with unquantized
    tensors and scales at ``float_bytes`` each (2 = bfloat16)."""
    total_bytes = total_params = 0
    for name, shape in shapes.items():
        params = math.prod(shape)
        total_params += params
        q = quant_params(recipe, name, shape, q_bits, group_size)
        total_bytes += quantized_bytes(shape, q, float_bytes) if q else params * float_bytes
    return 8 * total_bytes / total_params


def summary(recipe: str, q_bits: int) -> str:
    """What the recipe does with the bits resolved, e.g. "experts at 4 bits,
    embedding, attention, ... at 8 bits"."""
    by_bits = {}
    for part, bits in RECIPES[recipe]["bits"].items():
        by_bits.setdefault(q_bits if bits == "q_bits" else bits, []).append(part.replace("_", " "))
    if len(by_bits) == 1 and sum(map(len, by_bits.values())) == len(PARTS):
        return f"every weight matrix at {next(iter(by_bits))} bits"
    return "; ".join(f"{', '.join(parts)} at {bits} bits" for bits, parts in sorted(by_bits.items()))


def default_bits(recipe: str, q_bits: int) -> int:
    """The bits of the config's top-level ``quantization`` entry: the experts',
    as they hold most of the weights; other modules are listed with their own."""
    bits = RECIPES[recipe]["bits"]["experts"]
    return q_bits if bits == "q_bits" else bits
