"""``mlxdg fuse``: merge what ``mlxdg lora`` trained into its base model and
write a checkpoint that this package and mlx-vlm load.

LoRA/DoRA layers are folded into their linear layers (mlx-lm's ``fuse``); a
full fine-tune's weights replace the base's. Every tensor keeps the base
checkpoint's dtype, and the vision tower is copied from the base unchanged.
An unquantized result goes through ``mlxdg convert``'s writer (re-quantized
with its recipes on request), which verifies every shard before the output
appears; a quantized base stays quantized (the fused layers re-quantized with
their own group size and bits) unless ``--de-quantize``.
"""

import json
import shutil
import uuid
from pathlib import Path
from typing import Optional

import typer

from .errors import UserError


class FuseError(UserError, ValueError):
    """Bad input to fuse, said in one line."""


def _base_dtypes(path: Path, model) -> dict:
    """The dtype each parameter of ``model`` has in the checkpoint at ``path``
    (a quantized matrix's: its scales')."""
    import mlx.core as mx

    stored = {}
    for file in sorted(path.glob("model*.safetensors")):
        for key, value in model.sanitize(mx.load(str(file))).items():
            stored[key] = value.dtype
    dtypes = {}
    for key, dtype in stored.items():
        if key.endswith(".scales"):
            dtypes[key[: -len(".scales")] + ".weight"] = dtype
        dtypes.setdefault(key, dtype)
    return dtypes


def fused_model(path: Path, adapter_path: Path, de_quantize: bool):
    """The base model at ``path`` with the adapters merged in, and whether it is still quantized."""
    import mlx.nn as nn
    from mlx.utils import tree_unflatten

    from .cpu import prepare_weights
    from .loader import load_model
    from .tuner.adapters import load_adapters

    model, config = load_model(path, cpu_dequantize="never")
    load_adapters(model, adapter_path)
    fused = [(name, m.fuse(dequantize=de_quantize)) for name, m in model.named_modules() if hasattr(m, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    if de_quantize:
        prepare_weights(model, "always")
    quantized = any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) or "scales" in m
                    for _, m in model.named_modules())
    return model, config, quantized


def write_fused(model, config: dict, base: Path, dest: Path) -> None:
    """The fused weights (in the base's dtypes), the base's vision tower, its
    config and side files, into the empty folder ``dest``."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import save_config

    from .convert.convert import copy_side_files
    from .model import VISION_PREFIXES

    dtypes = _base_dtypes(base, model)
    weights = {}
    for name, value in tree_flatten(model.parameters()):
        dtype = dtypes.get(name, value.dtype)
        weights[name] = value.astype(dtype) if mx.issubdtype(value.dtype, mx.floating) else value
    for file in sorted(base.glob("model*.safetensors")):
        weights.update({k: v for k, v in mx.load(str(file)).items() if k.startswith(VISION_PREFIXES)})
    mx.save_safetensors(str(dest / "model.safetensors"), weights, metadata={"format": "mlx"})
    save_config(config, dest / "config.json", keep_vision_config=True)
    copy_side_files(base, dest)


def fuse(model: str, adapter_path: str, save_path: str, *, de_quantize: bool = False, recipe: Optional[str] = None,
         q_bits: Optional[int] = None, q_group_size: int = 64, force: bool = False) -> Path:
    """Write the fused checkpoint to ``save_path``; returns its path."""
    from .convert.convert import _replace, convert
    from .loader import read_config, resolve_model_path
    from .tuner.adapters import read_adapter_config

    out = Path(save_path).expanduser()
    if (out.exists() or out.is_symlink()) and not force:
        raise FuseError(f"--save-path {out} already exists; pass --force to replace it")
    base = resolve_model_path(model)
    config = read_config(base)
    read_adapter_config(Path(adapter_path).expanduser())
    base_quantized = "quantization" in config or "quantization_config" in config
    de_quantize = de_quantize or recipe is not None
    model_, config, quantized = fused_model(base, Path(adapter_path).expanduser(), de_quantize or not base_quantized)
    if not quantized:
        config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.fusing"
    tmp.mkdir()
    try:
        write_fused(model_, config, base, tmp)
        del model_
        if quantized:
            _replace(tmp, out)  # already quantized: the files are the checkpoint
        else:
            convert(str(tmp), str(out), recipe=recipe, q_bits=q_bits, q_group_size=q_group_size, force=force,
                    show_progress=False)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    (out / "fused_from.json").write_text(json.dumps({"base": str(base), "adapters": str(adapter_path)}, indent=2))
    return out


def command(
    model: str = typer.Option(..., "--model", help="The base checkpoint the adapters were trained on."),
    adapter_path: str = typer.Option("adapters", "--adapter-path", help="What mlxdg lora wrote."),
    save_path: str = typer.Option("fused_model", "--save-path", help="Output checkpoint directory."),
    de_quantize: bool = typer.Option(False, "--de-quantize", "--dequantize",
                                     help="Write a quantized base unquantized (in its scales' dtype)."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="Re-quantize with this mlxdg convert recipe "
                                         "(mixed, 4bit, 8bit)."),
    quantize: bool = typer.Option(False, "-q", "--quantize", help="Re-quantize with the 'mixed' recipe."),
    q_bits: Optional[int] = typer.Option(None, "--q-bits", help="Bits of the experts under 'mixed'."),
    q_group_size: int = typer.Option(64, "--q-group-size", help="Quantization group size."),
    force: bool = typer.Option(False, "--force", help="Replace --save-path if it exists."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
):
    """Merge adapters (or a full fine-tune) into the base model and write a checkpoint."""
    from .convert.recipes import DEFAULT_RECIPE

    out = fuse(model, adapter_path, save_path, de_quantize=de_quantize,
               recipe=recipe or (DEFAULT_RECIPE if quantize else None), q_bits=q_bits, q_group_size=q_group_size,
               force=force)
    typer.echo(f"Fused {adapter_path} into {model}: {out}")
