"""Memory planning: what fits in the device's memory before anything is allocated.

A denoising step reads nearly every weight whatever the batch, so throughput
comes from denoising several canvases at once. What limits that is memory:
each prompt needs its KV cache and each canvas its activations, small next to
its logits ([canvas, vocab] float32, 268 MB for the real model) and the
sampler's working copies of them. So the planner fits as many canvases as the
cache and activations allow, and then as many canvases' logits at once as
the rest allows; the engine computes the logits that many rows at a time.
"""

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Tuple

import mlx.core as mx
from mlx.utils import tree_flatten

from .cache import FullAttentionCache
from .errors import UserError
from .model import VISION_PREFIXES, ModelArgs
from .safetensors_header import weight_headers

GiB = 1 << 30

# Live [canvas, vocab] float32 buffers per canvas whose logits are being
# computed, at the peak of a denoising step of the engine
# (``engine.Denoiser.step``): the tempered logits, kept for the
# self-conditioning softmax, and the sampler's two working buffers. Measured
# with mx.get_peak_memory() on the small synthetic model of tests/test_memory.py;
# change it when that code path changes.
LOGIT_BUFFERS_PER_CANVAS = 3.0

# The default cap on canvases denoised at once. A 256-token canvas already
# keeps an Apple GPU's (and this CPU's) arithmetic busy, so more canvases add
# latency and no throughput there (the roofline of ``bench``); where a step is
# bandwidth-bound (datacenter GPUs) the gain levels off within a few canvases.
DEFAULT_MAX_BATCH = 8

# What the CPU backend leaves to the OS and other programs.
CPU_RESERVE_FRACTION = 0.15
CPU_MIN_RESERVE = 2 * GiB



class InsufficientMemory(UserError, RuntimeError):
    """A request that cannot fit, said in one line before anything large is allocated."""


def parse_size(text) -> int:
    """Bytes from ``1073741824``, ``"16GB"``, ``"16GiB"``, ``"1.5G"`` or ``"512MB"``."""
    if isinstance(text, (int, float)):
        return int(text)
    match = re.fullmatch(r"\s*([0-9.]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", str(text))
    if not match:
        raise ValueError(f"not a memory size: {text!r} (try 16GB or 512MB)")
    number, unit = float(match.group(1)), match.group(2).upper()
    return int(number * 1024 ** " KMGT".index(unit or " "))


def human_size(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def cgroup_memory_limit(proc_cgroup: Path = Path("/proc/self/cgroup"),
                        root: Path = Path("/sys/fs/cgroup")) -> Optional[int]:
    """The tightest memory limit on this process's Linux control group and the
    groups above it (cgroup v2 or v1), as a container sets it; None when there
    is none or this is not Linux."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            base, name = root, "memory.max"
        elif "memory" in controllers.split(","):
            base, name = root / "memory", "memory.limit_in_bytes"
        else:
            continue
        parts = Path(path).parts[1:]
        for depth in range(len(parts), -1, -1):
            try:
                value = (base.joinpath(*parts[:depth]) / name).read_text().strip()
            except OSError:
                continue
            if value.isdigit() and int(value) < 1 << 60:  # v1 writes ~2**63 for "no limit", v2 "max"
                limits.append(int(value))
    return min(limits) if limits else None


def device_budget(limit=None) -> int:
    """Bytes this process may use on the default device: ``limit`` when given;
    Metal's recommended working set on a Mac GPU; the device's memory where
    MLX reports it (CUDA); on the CPU, physical RAM or the container's limit,
    whichever is less, less a reserve."""
    if limit is not None:
        return parse_size(limit)
    info = mx.device_info() if mx.default_device() == mx.gpu else {}
    for key in ("max_recommended_working_set_size", "memory_size", "total_memory"):
        if info.get(key):
            return int(info[key])
    total = min(physical_memory(), cgroup_memory_limit() or physical_memory())
    return total - max(int(total * CPU_RESERVE_FRACTION), CPU_MIN_RESERVE)


def weight_bytes(module) -> int:
    """Bytes of a loaded module's parameters, as they are held now."""
    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


def checkpoint_weight_bytes(path: Path) -> int:
    """Bytes of the text weights in a checkpoint, from the safetensors headers alone (checked first)."""
    total = 0
    for header in weight_headers(path).values():
        for name, entry in header.items():
            if name.startswith(VISION_PREFIXES):
                continue
            start, end = entry["data_offsets"]
            total += end - start
    return total


def kv_bytes(args: ModelArgs, kv_tokens: int, dtype_bytes: int) -> int:
    """KV cache of one sequence of ``kv_tokens`` encoded tokens."""
    total = 0
    for shape in args.attention_layers():
        if shape.kept is None:
            positions = -(-kv_tokens // FullAttentionCache.step) * FullAttentionCache.step  # mlx-lm's growth steps
        else:
            positions = shape.kept_positions(kv_tokens)
        total += positions * shape.kv_bytes_per_position(dtype_bytes)
    return total


def canvas_bytes(args: ModelArgs, kv_tokens: int, dtype_bytes: int) -> int:
    """Peak working memory of one canvas after ``kv_tokens`` cached ones in
    the body of a denoising step, besides weights, cache and logits."""
    L = args.canvas_length
    # Attention scores over [cache; canvas] (the CPU backend materialises them) and
    # the routed experts' intermediate activations, for the widest layer.
    attention = args.num_attention_heads * L * (kv_tokens + L) * 4
    experts = L * args.top_k_experts * 3 * args.moe_intermediate_size * dtype_bytes
    # The hidden states, the self-conditioning input and the residual stream around them.
    hidden = 4 * L * args.hidden_size * dtype_bytes
    return attention + experts + hidden


def logits_bytes(args: ModelArgs) -> int:
    """Peak memory of one canvas's logits and the sampler's work on them."""
    return int(LOGIT_BUFFERS_PER_CANVAS * args.canvas_length * args.vocab_size * 4)


@dataclass(frozen=True)
class MemoryPlan:
    budget: int
    weights: int
    kv_per_prompt: int
    per_canvas: int  # activations of the body
    logits_per_canvas: int

    def peak(self, canvases: int, logits_rows: int) -> int:
        """Forecast peak of ``canvases`` canvases whose logits exist ``logits_rows`` at a time."""
        return self.weights + canvases * (self.kv_per_prompt + self.per_canvas) + logits_rows * self.logits_per_canvas

    @property
    def max_canvases(self) -> int:
        """Canvases that can be denoised together, each with its prompt's
        cache, with the logits of one canvas at a time."""
        free = self.budget - self.weights - self.logits_per_canvas
        return max(free // (self.kv_per_prompt + self.per_canvas), 0)

    def logits_rows(self, canvases: int) -> int:
        """How many of ``canvases`` canvases can have their logits at once (at least 1)."""
        free = self.budget - self.peak(canvases, 0)
        return int(min(canvases, max(free // self.logits_per_canvas, 1)))

    def batch(self, prompts: int, max_batch: Optional[int] = None) -> Tuple[int, int]:
        """Canvases to denoise at once for ``prompts`` prompts (``max_batch``,
        else as many as fit, at most ``DEFAULT_MAX_BATCH``) and how many of
        them may have their logits at once; raises ``InsufficientMemory``
        when not even the asked batch (or one canvas) fits."""
        self.require(1 if max_batch is None else min(max_batch, prompts))
        canvases = max(1, min(max_batch or min(self.max_canvases, DEFAULT_MAX_BATCH), prompts))
        return canvases, self.logits_rows(canvases)

    def require(self, canvases: int = 1) -> None:
        if self.max_canvases >= canvases:
            return
        raise InsufficientMemory(
            f"needs about {human_size(self.peak(canvases, 1))} ({human_size(self.weights)} weights, {canvases} x "
            f"{human_size(self.kv_per_prompt + self.per_canvas)} per canvas, "
            f"{human_size(self.logits_per_canvas)} for logits) but {human_size(self.budget)} "
            "is available; use a smaller quantization, fewer prompts at once, or --memory-limit if "
            "more memory is really free"
        )


def inference_plan(args: ModelArgs, weight_bytes: int, kv_tokens: int, dtype_bytes: int = 2,
                   budget: Optional[int] = None) -> MemoryPlan:
    """The plan for canvases denoised after up to ``kv_tokens`` cached tokens
    with activations of ``dtype_bytes``, beside ``weight_bytes`` of weights."""
    return MemoryPlan(
        budget=device_budget() if budget is None else budget,
        weights=weight_bytes,
        kv_per_prompt=kv_bytes(args, kv_tokens, dtype_bytes),
        per_canvas=canvas_bytes(args, kv_tokens, dtype_bytes),
        logits_per_canvas=logits_bytes(args),
    )


def generation_plan(model, prompt_lengths: Iterable[int], max_new_tokens: int, *, cached: int = 0,
                    memory_limit=None) -> MemoryPlan:
    """The one forecast of a generation run, for the check before the weights
    are read (on the lazily opened model) and for the engine's batch sizing
    alike: the weights as ``model`` holds them (after the CPU backend's
    upcast), activations in its dtype, and the cache at the last block after
    ``cached`` tokens of an earlier conversation."""
    tokens = cached + kv_tokens_at_last_block(prompt_lengths, max_new_tokens, model.args.canvas_length)
    return inference_plan(model.args, weight_bytes(model), tokens, model.dtype.size, device_budget(memory_limit))


def wire_weights(weight_bytes: int) -> None:
    """On a Mac GPU, keep the weights wired (as mlx-lm does) so macOS does not page them out."""
    if not (mx.default_device() == mx.gpu and mx.metal.is_available()):
        return
    recommended = mx.device_info().get("max_recommended_working_set_size")
    if recommended is None:
        return
    if weight_bytes > 0.9 * recommended:
        print(f"mlxdg: the weights ({weight_bytes / GiB:.1f} GiB) are close to the GPU's working set "
              f"({recommended / GiB:.1f} GiB); generation may be slow", file=sys.stderr)
    mx.set_wired_limit(recommended)


def kv_tokens_at_last_block(prompt_lengths: Iterable[int], max_new_tokens: int, canvas_length: int) -> int:
    """Tokens in the cache while the last block is denoised: the longest
    prompt plus every committed block before it."""
    blocks = -(-max_new_tokens // canvas_length)
    return max(prompt_lengths) + (blocks - 1) * canvas_length


def positions_needed(prompt_tokens: int, max_new_tokens: int, canvas_length: int) -> int:
    """Positions a prompt and its whole answer use (against the model's
    ``max_position_embeddings``): the last canvas sits after every earlier block."""
    return kv_tokens_at_last_block([prompt_tokens], max_new_tokens, canvas_length) + canvas_length


# Training (``mlxdg lora``). Measured constants, from mx.get_peak_memory()
# after a LoRA step on random weights (bench/train_step.py, with
# --num-experts, --vocab-size and --experts) in the "small" synthetic shape and
# in the real 26B-A4B layer shapes with 1, 2 and 4 layers, fewer experts or a
# smaller vocabulary (tests/test_training_memory.py checks the small shape). A
# step's peak is the larger of its phases, each a sum of these terms:
# - float32 [tokens, vocab] buffers per scored position (the logits, the
#   cross-entropy's softmax and their gradients);
TRAIN_LOGIT_BUFFERS = 3.4
# - the activations a layer keeps for the backward pass per token, in
#   hidden-size units besides its attention probabilities and MLP widths;
TRAIN_HIDDEN_PER_TOKEN_LAYER = 24
# - with --grad-checkpoint, what the backward pass of one layer holds, in
#   units of that layer's activations.
TRAIN_CHECKPOINT_RECOMPUTE = 1.28
# Where the experts read their routing on the host (``model.Experts.grouped``:
# MLX's CPU backend, large experts), MLX keeps every buffer it evaluates inside
# the gradient transformation, not only what the backward pass needs: per
# layer below the last, this many times its activations, besides hidden-size
# vectors per token and float32 [canvas, vocab] buffers per canvas position.
# The self-conditioning first pass, evaluated there too, adds more of both.
TRAIN_HOST_ROUTING_LAYER = 1.43
TRAIN_HOST_ROUTING_PER_TOKEN = 39
TRAIN_HOST_ROUTING_LOGITS = 1.5
TRAIN_HOST_ROUTING_FIRST_PASS_PER_TOKEN = 36
TRAIN_HOST_ROUTING_FIRST_PASS_LOGITS = 4.5
# Bytes per trainable parameter besides the parameter itself: its gradient and
# the optimizer's state (Adam keeps two moments), in float32.
OPTIMIZER_STATE_FLOATS = {"adam": 3, "adamw": 3, "sgd": 2, "adafactor": 2, "muon": 2}


def _matrix_shapes(args: ModelArgs, layer_type: str):
    """(name, in, out) of the LoRA-able linear layers of one layer."""
    shape = args.attention(layer_type)
    q, kvd, d, f = shape.q_dims, shape.kv_dims, args.hidden_size, args.intermediate_size
    shapes = [("q_proj", d, q), ("k_proj", d, kvd), ("o_proj", q, d), ("gate_proj", d, f), ("up_proj", d, f),
              ("down_proj", f, d)]
    return shapes + ([("v_proj", d, kvd)] if shape.has_values else [])


def parameter_count(args: ModelArgs) -> int:
    """Text parameters of a model with ``args``, from its shapes alone."""
    from .model import Model

    return sum(p.size for _, p in tree_flatten(Model(args).parameters()))


def trainable_parameters(args: ModelArgs, fine_tune_type: str, num_layers: int, rank: int) -> int:
    if fine_tune_type == "full":
        return parameter_count(args)
    n = args.num_hidden_layers if num_layers < 0 else min(num_layers, args.num_hidden_layers)
    total = 0
    for layer_type in args.layer_types[args.num_hidden_layers - n:]:
        for _, fan_in, fan_out in _matrix_shapes(args, layer_type):
            total += rank * (fan_in + fan_out) + (fan_out if fine_tune_type == "dora" else 0)
    return total


def layer_activation_bytes(args: ModelArgs, tokens: int, keys: int, dtype_bytes: int) -> int:
    """What one layer keeps for its backward pass over ``tokens`` queries that
    attend to ``keys`` positions each."""
    widest_q = max(shape.q_dims for shape in args.attention_layers())
    per_token = (TRAIN_HIDDEN_PER_TOKEN_LAYER * args.hidden_size + 4 * widest_q + 3 * args.intermediate_size
                 + args.top_k_experts * (3 * args.moe_intermediate_size + args.hidden_size))
    attention = args.num_attention_heads * keys * 4  # float32 probabilities
    return tokens * (per_token * dtype_bytes + attention)


@dataclass(frozen=True)
class TrainingPlan:
    budget: int
    weights: int
    trainable: int  # the trained parameters with their gradients and optimizer state
    activations: int  # the encoder's and decoder's over the batch
    logits: int  # the scored positions' logits and their gradients

    @property
    def peak(self) -> int:
        return self.weights + self.trainable + self.activations + self.logits

    def describe(self) -> str:
        return (f"{human_size(self.peak)} ({human_size(self.weights)} weights, {human_size(self.trainable)} "
                f"trained parameters with gradients and optimizer state, {human_size(self.activations)} "
                f"activations, {human_size(self.logits)} logits)")

    def require(self) -> None:
        if self.peak <= self.budget:
            return
        parts = {"the weights (use a quantized checkpoint)": self.weights,
                 "the activations (lower --batch-size or --max-seq-length, or add --grad-checkpoint)":
                     self.activations,
                 "the logits (lower --batch-size)": self.logits,
                 "the trained parameters (use --fine-tune-type lora, a lower rank or fewer --num-layers)":
                     self.trainable}
        largest = max(parts, key=parts.get)
        raise InsufficientMemory(f"training needs about {self.describe()} but {human_size(self.budget)} is "
                                 f"available; most of it is {largest}, or pass --memory-limit if more "
                                 "memory is really free")


def training_plan(args: ModelArgs, weight_bytes: int, *, fine_tune_type: str, num_layers: int, rank: int,
                  batch_size: int, canvases: int, context: int, grad_checkpoint: bool, optimizer: str = "adam",
                  dtype_bytes: int = 4, host_routing: bool = False, self_conditioning: bool = True,
                  budget: Optional[int] = None) -> TrainingPlan:
    """The forecast peak of one training step: ``batch_size`` examples of up
    to ``context`` positions (context plus padded canvases), each with up to
    ``canvases`` answer canvases; ``dtype_bytes`` is the activations' (4 on
    MLX's CPU backend, which computes in float32); ``host_routing`` whether the
    experts read their routing on the host (``model.Experts.grouped``), where
    --grad-checkpoint is not applied (``tuner.losses``); ``self_conditioning``
    whether some steps are self-conditioned."""
    L = args.canvas_length
    n_canvases = batch_size * canvases
    trainable = trainable_parameters(args, fine_tune_type, num_layers, rank)
    floats = OPTIMIZER_STATE_FLOATS.get(optimizer, 3)
    # A fully fine-tuned weight is already in ``weights``; LoRA's are new.
    trainable_bytes = trainable * 4 * (floats if fine_tune_type == "full" else floats + 1)
    encoder = layer_activation_bytes(args, batch_size * context, context, dtype_bytes)
    decoder = layer_activation_bytes(args, n_canvases * L, context + L, dtype_bytes)
    # Only the layers from the lowest trained one up keep activations for the backward pass.
    layers = args.num_hidden_layers if fine_tune_type == "full" or num_layers < 0 else min(num_layers, args.num_hidden_layers)
    tokens = batch_size * context + n_canvases * L  # the encoder's and the decoder's
    if grad_checkpoint and not host_routing:
        # Each layer's input is kept; one layer's activations exist at a time, recomputed.
        kept = tokens * args.hidden_size * dtype_bytes * layers
        activations = kept + int(TRAIN_CHECKPOINT_RECOMPUTE * (encoder + decoder))
    else:
        activations = layers * (encoder + decoder)
    logits = int(TRAIN_LOGIT_BUFFERS * 2 * n_canvases * L * args.vocab_size * 4)  # canvas and answer positions
    phases = [(activations, logits)]  # the scored logits' backward pass
    if host_routing:
        # The forward pass, everything evaluated kept; then the self-conditioning first pass.
        canvas_logits = n_canvases * L * args.vocab_size * 4
        kept = int(activations + (layers - 1) * TRAIN_HOST_ROUTING_LAYER * (encoder + decoder)
                   + TRAIN_HOST_ROUTING_PER_TOKEN * tokens * args.hidden_size * dtype_bytes)
        phases.append((kept, int(TRAIN_HOST_ROUTING_LOGITS * canvas_logits)))
        if self_conditioning:
            phases.append((kept + TRAIN_HOST_ROUTING_FIRST_PASS_PER_TOKEN * tokens * args.hidden_size * dtype_bytes,
                           int((TRAIN_HOST_ROUTING_LOGITS + TRAIN_HOST_ROUTING_FIRST_PASS_LOGITS) * canvas_logits)))
    activations, logits = max(phases, key=sum)
    return TrainingPlan(budget=device_budget() if budget is None else budget, weights=weight_bytes,
                        trainable=trainable_bytes, activations=activations, logits=logits)
