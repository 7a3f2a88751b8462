"""The models `mlxdg bench` compares, in the form this device runs them.

A synthetic run quantizes random weights with a convert recipe, then prepares
them as the loader prepares a checkpoint (``cpu.prepare_weights``: on MLX's CPU
backend quantized matrices become float32), so the expert path that runs is
the one a real checkpoint would take. mlx-lm's Gemma 4 then reads the very
same arrays (no copy): all three engines decode with one set of weights, and
the two autoregressive rows differ only in their model code.
"""

import re
from dataclasses import dataclass
from typing import Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models import gemma4_text

from mlx_diffgemma.bench.engines import SyntheticTokenizer
from mlx_diffgemma.bench.roofline import ParameterCounts, denoise_step
from mlx_diffgemma.bench.synthetic import build_diffusion_model, gemma4_args, synthetic_args
from mlx_diffgemma.convert import recipes
from mlx_diffgemma.cpu import prepare_weights
from mlx_diffgemma.memory import checkpoint_weight_bytes, device_budget, weight_bytes

# --quant: (recipe, bits of the experts); None keeps bfloat16.
QUANT = {"mixed": ("mixed", 4), "4": ("4bit", 4), "8": ("8bit", 8), "bf16": None}
GROUP_SIZE = 64


@dataclass
class Subject:
    """A model under test and what the report says about its weights."""

    model: object
    weight_paths: dict  # {"dense": ..., "experts": ...}, as cpu.prepare_weights reports them
    stored_bits: float  # bits per weight as converted (what a GPU run reads)
    resident_bits: float  # bits per weight as this run holds them
    expert_bits: Optional[int]  # of quantized experts, else None


@dataclass
class Models:
    args: object  # ModelArgs benchmarked
    full_args: object  # ModelArgs of the model it stands for
    diffusion: Subject
    tokenizer: object
    ar: Optional[Subject]
    description: dict


def _leaves(model) -> dict:
    return dict(tree_flatten(model.leaf_modules(), is_leaf=lambda m: isinstance(m, nn.Module)))


def _expert_bits(model) -> Optional[int]:
    return next((m.bits for path, m in _leaves(model).items() if ".experts." in path and hasattr(m, "bits")), None)


def recipe_predicate(recipe: str, q_bits: int):
    """``nn.quantize``'s predicate for a convert recipe, with the recipe's group size rules."""
    def predicate(path, module):
        if not hasattr(module, "to_quantized"):
            return False
        return recipes.quant_params(recipe, path + ".weight", module.weight.shape, q_bits, GROUP_SIZE) or False
    return predicate


def _source(name: str, width: int) -> Tuple[str, Optional[slice]]:
    """Where mlx-lm's Gemma 4 parameter or module ``name`` lives in our model,
    and which rows of it: Gemma 4 splits the fused expert projection in two."""
    if name.endswith("layer_scalar"):  # the encoder's scalars: Gemma 4 is the encoder
        return name.replace("model.", "model.encoder.language_model.", 1), None
    name = name.replace("model.", "model.decoder.", 1)
    match = re.search(r"\.switch_glu\.(gate|up|down)_proj", name)
    if match is None:
        return name, None
    part = match.group(1)
    fused = name[:match.start()] + (".down_proj" if part == "down" else ".gate_up_proj") + name[match.end():]
    rows = {"gate": slice(None, width), "up": slice(width, None), "down": None}[part]
    return fused, rows


def gemma4_on_same_weights(model) -> gemma4_text.Model:
    """mlx-lm's Gemma 4 reading ``model``'s arrays: the shared matrices, views
    of the fused experts' halves, the encoder's layer scalars; quantized where
    ``model`` is, with the same settings."""
    width = model.args.moe_intermediate_size
    gemma = gemma4_text.Model(gemma4_args(model.args))
    ours = _leaves(model)

    def quantized_like_ours(path, module):
        source = ours.get(_source(path, width)[0])
        if not hasattr(source, "bits"):
            return False
        return {"group_size": source.group_size, "bits": source.bits, "mode": source.mode}

    nn.quantize(gemma, class_predicate=quantized_like_ours)
    arrays = dict(tree_flatten(model.parameters()))
    weights = []
    for name, _ in tree_flatten(gemma.parameters()):
        source, rows = _source(name, width)
        array = arrays[source]
        weights.append((name, array if rows is None else array[..., rows, :]))
    gemma.load_weights(weights)
    mx.eval(gemma.parameters())
    return gemma


def _prepared(model, params: int, stored_bits: float, cpu_dequantize: str) -> Subject:
    """The model in the form this device runs (cpu.prepare_weights), within
    what the models already loaded leave of the memory budget."""
    others = mx.get_active_memory() - weight_bytes(model)
    paths = prepare_weights(model, cpu_dequantize, budget=device_budget() - others)
    return Subject(model, paths, stored_bits, 8 * weight_bytes(model) / params, _expert_bits(model))


def _vocabulary_share(args) -> float:
    """The LM head's and the soft embedding's share of a denoising step's FLOPs."""
    return 2 * 2 * args.canvas_length * args.vocab_size * args.hidden_size / denoise_step(args, 16, 0).flops


RANDOM_WEIGHTS = ("Random weights make a model neither fluent nor typical in its confidence: the adaptive-stop "
                  "row shows the sampler at work, not a trained model's steps per block.")


def _scaling_note(shape: str, args, full_args) -> str:
    if shape != "26b-a4b":
        return (f"synthetic '{shape}' shape, a toy model (not the real one's shape) with random weights; "
                f"its figures show the machinery, not DiffusionGemma's speed. {RANDOM_WEIGHTS}")
    if args.num_hidden_layers == full_args.num_hidden_layers:
        return f"the real 26B-A4B shape with random weights; nothing scaled. {RANDOM_WEIGHTS}"
    kinds = ", ".join(f"{args.layer_types.count(k)} {k.split('_')[0]}" for k in ("sliding_attention", "full_attention"))
    return (f"{args.num_hidden_layers} of {full_args.num_hidden_layers} layers ({kinds}), random weights; "
            "hidden size, heads, experts, vocabulary and canvas at full size. Per-layer costs are the real "
            "model's; the LM head and self-conditioning embedding weigh more in every pass than with all "
            f"{full_args.num_hidden_layers} layers: {_vocabulary_share(args):.0%} of a denoising step's FLOPs "
            f"here, {_vocabulary_share(full_args):.0%} in the full model. The 'full model' roofline scales the "
            f"layers back up. {RANDOM_WEIGHTS}")


def synthetic_models(shape: str, layers: Optional[int], quant: str, seed: int, cpu_dequantize: str,
                     with_gemma4: bool) -> Models:
    args = synthetic_args(shape, layers)
    full_args = synthetic_args(shape)
    params = ParameterCounts.of(args).total
    predicate = recipe_predicate(*QUANT[quant]) if QUANT[quant] else None
    model = build_diffusion_model(args, mx.bfloat16, seed, predicate)
    diffusion = _prepared(model, params, 8 * weight_bytes(model) / params, cpu_dequantize)
    ar = None
    if with_gemma4:
        ar = Subject(gemma4_on_same_weights(model), diffusion.weight_paths, diffusion.stored_bits,
                     diffusion.resident_bits, diffusion.expert_bits)
    described = recipes.summary(*QUANT[quant]) if QUANT[quant] else "unquantized bfloat16"
    return Models(args, full_args, diffusion, SyntheticTokenizer(), ar, {
        "source": f"synthetic:{shape}",
        "ar_source": "mlx-lm's gemma4_text.Model on the diffusion model's own random weights" if ar else None,
        "quantization": f"{quant}: {described} (group {GROUP_SIZE})",
        "scaled": _scaling_note(shape, args, full_args),
    })


def checkpoint_models(path_or_repo: str, cpu_dequantize: str) -> Models:
    from mlx_diffgemma.loader import load, read_config, resolve_model_path

    model, tokenizer = load(path_or_repo, cpu_dequantize=cpu_dequantize)
    path = resolve_model_path(path_or_repo)
    params = ParameterCounts.of(model.args).total
    stored = 8 * checkpoint_weight_bytes(path) / params
    diffusion = Subject(model, model.weight_paths, stored, 8 * weight_bytes(model) / params, _expert_bits(model))
    return Models(model.args, model.args, diffusion, tokenizer, None, {
        "source": path_or_repo,
        "ar_source": None,
        "quantization": read_config(path).get("quantization") or "none",
        "scaled": None,
    })


def add_ar_checkpoint(models: Models, path_or_repo: str, cpu_dequantize: str) -> None:
    """mlx-lm's own load of an autoregressive checkpoint, prepared like ours.
    Its costs are modelled with the diffusion model's shape: Gemma 4 26B-A4B is its backbone."""
    import mlx_lm

    model, _ = mlx_lm.load(path_or_repo)
    params = ParameterCounts.of(models.args).total
    models.ar = _prepared(model, params, 8 * weight_bytes(model) / params, cpu_dequantize)
    models.description["ar_source"] = path_or_repo
