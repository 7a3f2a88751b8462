"""Weights in the form MLX's CPU backend runs well.

Measured on MLX 0.32 (x86_64, OpenBLAS): the CPU backend is fast only for
float32 matmuls, which go to the BLAS. A bfloat16 matmul runs on MLX's own
kernel at about 1/25 of that speed, the quantized kernels at 1/20 to 1/50,
and ``GatherMM`` (the routed experts' matmul) accepts float32 only. So on the
CPU, :func:`prepare_weights` turns a checkpoint's bfloat16/float16 and
quantized matrices into float32 at load, as many as fit in memory: those every
token uses (embedding, attention, dense MLP) first, then the experts.
``model.Experts`` computes in float32 on the CPU whatever its weights are.

On Metal and CUDA nothing changes unless ``cpu_dequantize="always"``.
"""

import sys
from typing import Dict, List, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

from .memory import device_budget, weight_bytes
from .settings import CPU_DEQUANTIZE_MODES


# What ``model.weight_paths["dense" | "experts"]`` can say about a group of matrices.
NATIVE = "native"  # as the checkpoint stores them
UPCAST = "upcast"  # bfloat16/float16 in the checkpoint, float32 from load
PARTLY_UPCAST = "partly upcast"
QUANTIZED = "quantized"  # MLX's quantized kernels
DEQUANTIZED = "dequantized"  # quantized in the checkpoint, float32 from load
PARTLY_DEQUANTIZED = "partly dequantized"

_QUANTIZED_TYPES = (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedSwitchLinear)
_FLOAT_TYPES = (nn.Linear, nn.Embedding, SwitchLinear)


def on_cpu() -> bool:
    return mx.default_device().type == mx.cpu


def _dequantized_weight(module: nn.Module) -> mx.array:
    return mx.dequantize(module.weight, module.scales, module.get("biases"), module.group_size, module.bits,
                         mode=module.mode, global_scale=module.get("global_scale"), dtype=mx.float32)


def _float32_bytes(module: nn.Module) -> int:
    if isinstance(module, _QUANTIZED_TYPES):
        packed = module.weight
        return packed.size * packed.dtype.size * 8 // module.bits * 4
    return module.weight.size * 4


def _as_float32(module: nn.Module) -> nn.Module:
    """The same layer with a float32 weight (and bias)."""
    weight = _dequantized_weight(module) if isinstance(module, _QUANTIZED_TYPES) else module.weight.astype(mx.float32)
    if isinstance(module, (nn.Embedding, nn.QuantizedEmbedding)):
        out = nn.Embedding(*weight.shape)
    elif isinstance(module, (SwitchLinear, QuantizedSwitchLinear)):
        out = SwitchLinear(weight.shape[2], weight.shape[1], weight.shape[0], bias="bias" in module)
    else:
        out = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in module)
    out.weight = weight
    if "bias" in module:
        out.bias = module.bias.astype(mx.float32)
    return out


def _candidates(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """Quantized and half-precision matrices, the embedding first and the experts last."""
    leaves = tree_flatten(model.leaf_modules(), is_leaf=lambda m: isinstance(m, nn.Module))
    found = [(path, m) for path, m in leaves
             if isinstance(m, _QUANTIZED_TYPES) or (isinstance(m, _FLOAT_TYPES) and m.weight.dtype != mx.float32)]
    return sorted(found, key=lambda item: (_group(item[0]) == "experts", "embed" not in item[0]))


def _group(path: str) -> str:
    return "experts" if ".experts." in path else "dense"


def _summary(quantized: int, half: int, dequantized: int, upcast: int) -> str:
    if quantized:
        return DEQUANTIZED if dequantized == quantized else PARTLY_DEQUANTIZED if dequantized else QUANTIZED
    if half:
        return UPCAST if upcast == half else PARTLY_UPCAST if upcast else NATIVE
    return NATIVE


def prepare_weights(model: nn.Module, cpu_dequantize: str = "auto", lazy: bool = False,
                    budget: int = None, quiet: bool = False) -> Dict[str, str]:
    """Turn matrices into float32 where that makes the current device faster,
    and return what each group is now: ``{"dense": ..., "experts": ...}``.

    ``cpu_dequantize`` is for quantized matrices: ``"auto"`` dequantizes them
    on the CPU backend while the model fits in ``budget`` bytes
    (``memory.device_budget()`` by default) and says so in one line on stderr
    (unless ``quiet``);
    ``"always"`` dequantizes all of them, on any device, whatever the memory;
    ``"never"`` keeps MLX's quantized kernels. bfloat16/float16 matrices
    become float32 on the CPU backend while they fit, whatever the mode.
    """
    if cpu_dequantize not in CPU_DEQUANTIZE_MODES:
        raise ValueError(f"cpu_dequantize must be one of {', '.join(CPU_DEQUANTIZE_MODES)}, "
                         f"not {cpu_dequantize!r}")
    cpu = on_cpu()
    if budget is None and cpu:
        budget = device_budget()
    total = weight_bytes(model)
    counts = {g: {"quantized": 0, "half": 0, "dequantized": 0, "upcast": 0} for g in ("dense", "experts")}
    skipped = False
    for path, module in _candidates(model):
        quantized = isinstance(module, _QUANTIZED_TYPES)
        count = counts[_group(path)]
        count["quantized" if quantized else "half"] += 1
        if quantized:
            wanted = cpu_dequantize == "always" or (cpu_dequantize == "auto" and cpu)
            unlimited = cpu_dequantize == "always"
        else:
            wanted, unlimited = cpu, False
        if not wanted:
            continue
        grown = total + _float32_bytes(module) - weight_bytes(module)
        if not unlimited and grown > budget:
            skipped = True
            continue
        new = _as_float32(module)
        model.update_modules(tree_unflatten([(path, new)]))
        if not lazy:
            mx.eval(new.parameters())
        total = grown
        count["dequantized" if quantized else "upcast"] += 1

    if cpu and not quiet:
        _say(counts, total, skipped, cpu_dequantize)
    return {group: _summary(**count) for group, count in counts.items()}


def _say(counts: Dict[str, Dict[str, int]], total: int, skipped: bool, cpu_dequantize: str) -> None:
    """One line on stderr when the CPU backend changed weights or had no room to."""
    quantized, half, dequantized, upcast = (sum(c[k] for c in counts.values())
                                            for k in ("quantized", "half", "dequantized", "upcast"))
    if not (dequantized or upcast or skipped):
        return
    done = []
    if dequantized or (quantized and cpu_dequantize == "auto"):
        done.append(f"dequantized {dequantized} of {quantized} quantized matrices")
    if half:
        done.append(f"converted {upcast} of {half} half-precision matrices")
    print(f"mlxdg: for MLX's CPU backend, {' and '.join(done)} to float32 (model now "
          f"{total / 2**20:,.0f} MiB)" + ("; the rest would not fit in memory" if skipped else "")
          + ("; --cpu-dequantize never keeps them quantized" if dequantized else ""), file=sys.stderr)
