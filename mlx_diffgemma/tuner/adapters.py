"""Which weights train, and adapters in mlx-lm's format.

LoRA and DoRA (mlx-lm's layers) go on the attention projections and the
dense MLP of the last ``num_layers`` layers, which the encoder and decoder
share; the router, the experts and the embedding (also the LM head) stay
frozen. ``full`` trains every weight, the encoder's layer scalars included.
"""

import json
from pathlib import Path

import mlx.core as mx
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.tuner.utils import load_adapters as _mlx_lm_load_adapters

from ..loader import CheckpointError
from ..model import MODEL_TYPE

FINE_TUNE_TYPES = ("lora", "dora", "full")
LORA_KEYS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# rank 8, scale 2 (LoRA's alpha/rank as the reference recipes set it; mlx-lm's
# default scale of 20 is reported to make DiffusionGemma's LoRA diverge).
DEFAULT_LORA_PARAMETERS = {"rank": 8, "scale": 2.0, "dropout": 0.0}


def num_lora_layers(model, num_layers: int) -> int:
    """``num_layers`` with -1 (or more than the model has) meaning all."""
    return len(model.layers) if num_layers < 0 or num_layers > len(model.layers) else num_layers


def prepare(model, fine_tune_type: str, num_layers: int, lora_parameters: dict) -> None:
    """Freeze ``model`` but what ``fine_tune_type`` trains, adding LoRA/DoRA layers."""
    if fine_tune_type not in FINE_TUNE_TYPES:
        raise ValueError(f"--fine-tune-type must be one of {', '.join(FINE_TUNE_TYPES)}, not {fine_tune_type!r}")
    if fine_tune_type == "full":
        model.unfreeze()
        return
    model.freeze()
    config = {**DEFAULT_LORA_PARAMETERS, **lora_parameters, "keys": list(LORA_KEYS)}
    linear_to_lora_layers(model, num_lora_layers(model, num_layers), config, use_dora=fine_tune_type == "dora")


def read_adapter_config(adapter_path: Path) -> dict:
    file = Path(adapter_path) / "adapter_config.json"
    if not file.is_file():
        raise CheckpointError(f"{adapter_path} has no adapter_config.json; is it an adapter folder "
                              "written by mlxdg lora?")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file} is not valid JSON ({e})") from None
    model_type = config.get("model_type", MODEL_TYPE)
    if model_type != MODEL_TYPE:
        raise CheckpointError(f"{adapter_path} holds adapters for a {model_type!r} model, not DiffusionGemma")
    return config


def load_adapters(model, adapter_path, lazy: bool = False) -> dict:
    """Apply the adapters (or fully fine-tuned weights) in ``adapter_path`` to
    ``model`` (read later with ``lazy``); returns their config. Adapters
    trained on another model are refused in one line."""
    adapter_path = Path(adapter_path).expanduser()
    config = read_adapter_config(adapter_path)
    if not (adapter_path / "adapters.safetensors").is_file():
        raise CheckpointError(f"{adapter_path} has no adapters.safetensors")
    try:
        _mlx_lm_load_adapters(model, str(adapter_path))
    except ValueError as e:
        lines = str(e).strip().splitlines()
        detail = lines[1].strip() if len(lines) > 1 else lines[0]
        raise CheckpointError(f"{adapter_path} does not fit this model ({detail}); it was trained on "
                              f"{config.get('model', 'another checkpoint')}") from None
    except (RuntimeError, OSError) as e:
        raise CheckpointError(f"{adapter_path}/adapters.safetensors cannot be read ({e})") from None
    if not lazy:
        mx.eval(model.parameters())
    return config
