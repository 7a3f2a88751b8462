"""Find, check and load DiffusionGemma checkpoints (Hugging Face or MLX layout).

Only safetensors and JSON are read; nothing in a checkpoint is executed.
``load`` opens a ``Checkpoint`` and loads it; the commands open one, refuse
what cannot fit and then load it, the same way.
"""

import json
import threading
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Tuple

import mlx.core as mx
from mlx_lm.utils import load_model as _mlx_lm_load_model
from mlx_lm.utils import load_tokenizer

from .cpu import prepare_weights
from .errors import UserError, first_line
from .memory import MemoryPlan, device_budget, generation_plan, positions_needed, weight_bytes, wire_weights
from .model import MODEL_TYPE, Model, ModelArgs
from .safetensors_header import CheckpointError, weight_headers
from .sampler import SamplerConfig
from .sudoku import BUILTIN_MODELS

# What a checkpoint download needs: weights, configs, tokenizer and chat template.
ALLOW_PATTERNS = ["*.json", "model*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]


def resolve_model_path(path_or_repo: str, revision: str = None) -> Path:
    """A built-in name (``sudoku``: the packaged model); a local directory as
    is; otherwise a Hugging Face repo id, from the local cache when it is there
    and downloaded when not."""
    if path_or_repo in BUILTIN_MODELS:
        return BUILTIN_MODELS[path_or_repo]
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is not a directory")
        return path
    if path_or_repo.startswith((".", "/", "~")) or path_or_repo.count("/") != 1:
        raise CheckpointError(f"{path_or_repo}: no such directory, and not a Hugging Face repo id")

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(path_or_repo, revision=revision,
                                      allow_patterns=ALLOW_PATTERNS, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    try:
        return Path(snapshot_download(path_or_repo, revision=revision, allow_patterns=ALLOW_PATTERNS))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise CheckpointError(
            f"{path_or_repo} is not in the Hugging Face cache and could not be downloaded "
            f"({type(e).__name__}); download it with `hf download {path_or_repo}` on a "
            "machine with network access, or pass a local directory (`mlxdg convert` makes one "
            "from a Hugging Face checkpoint)"
        ) from None


def read_config(path: Path) -> Dict[str, Any]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path} has no config.json")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_file} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file} is not a JSON object")
    model_type = config.get("model_type")
    if model_type != MODEL_TYPE:
        raise CheckpointError(
            f"{path} holds a {model_type!r} model, not a DiffusionGemma ({MODEL_TYPE!r}) checkpoint"
        )
    if not weight_headers(path):
        raise CheckpointError(f"{path} has no model*.safetensors weights")
    return config


def load_model(path: Path, lazy: bool = False, cpu_dequantize: str = "auto",
               memory_budget: int = None, quiet: bool = False) -> Tuple[Model, Dict[str, Any]]:
    """The model and its config from a local checkpoint directory.

    ``cpu_dequantize`` (``"auto"``, ``"always"`` or ``"never"``) decides whether
    quantized matrices become float32 at load (``cpu.prepare_weights``, within
    ``memory_budget`` bytes, the device's budget by default);
    ``model.weight_paths`` says what the dense layers and the experts run on.
    """
    read_config(path)
    try:
        model, config = _mlx_lm_load_model(
            path, lazy=lazy, get_model_classes=lambda config: (Model, ModelArgs)
        )
    except ValueError as e:
        # mlx's load_weights lists missing or unexpected parameters here, one per line.
        raise CheckpointError(f"{path}: weights do not match the config: {_one_line(e)}") from None
    except Exception as e:  # corrupt or truncated safetensors surface as RuntimeError/OSError
        raise CheckpointError(f"{path}: cannot read the weights: {first_line(e)}") from None
    model.weight_paths = prepare_weights(model, cpu_dequantize, lazy=lazy, budget=memory_budget, quiet=quiet)
    wire_weights(weight_bytes(model))
    # generate() takes its sampler defaults from here, as the reference does from the checkpoint.
    model.generation_config = SamplerConfig.from_checkpoint(path)
    return model, config


def _one_line(error: Exception, limit: int = 300) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def load_checkpoint_tokenizer(path: Path, eos_token_ids=None):
    """mlx-lm's tokenizer of the checkpoint at ``path``; a missing or broken
    tokenizer file is a CheckpointError naming it."""
    present = [name for name in TOKENIZER_FILES if (path / name).is_file()]
    if not present:
        raise CheckpointError(f"{path} has no tokenizer ({' or '.join(TOKENIZER_FILES)}); copy the tokenizer "
                              "files of the original checkpoint into it")
    try:
        return load_tokenizer(path, eos_token_ids=eos_token_ids)
    except Exception as e:  # the tokenizers library's errors have no common type
        raise CheckpointError(f"{path / present[0]}: cannot load the tokenizer ({first_line(e)}); "
                              "download or convert the checkpoint again") from None


def chat_template_file(path: Path) -> Path:
    """Where a checkpoint keeps its chat template (for messages)."""
    jinja = path / "chat_template.jinja"
    return jinja if jinja.is_file() else path / "tokenizer_config.json"


IGNORE_TEMPLATE = "pass --ignore-chat-template to use the prompt as it is"


def check_chat_template(tokenizer, path: Path, advice: str = IGNORE_TEMPLATE) -> None:
    """Refuse a checkpoint with no chat template, or one that does not render
    a one-message conversation, naming the file and ``advice``."""
    if not tokenizer.has_chat_template:
        raise CheckpointError(f"{path} has no chat template (chat_template.jinja, or chat_template in "
                              f"tokenizer_config.json); {advice}")
    try:
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                      tokenize=False)
    except Exception as e:  # jinja2's syntax and rendering errors, and whatever the template raises
        raise CheckpointError(f"{chat_template_file(path)}: the chat template does not render "
                              f"({type(e).__name__}: {first_line(e)}); fix it, or {advice}") from None


class ContextTooLong(UserError, ValueError):
    """A prompt that, with its answer, needs more positions than the model has."""


class Checkpoint:
    """A checkpoint opened for generation: its config, tokenizer and sampler
    settings, and its model opened lazily (MLX reads no weight until ``load``),
    so that a request that cannot fit is refused first (``check_positions``,
    ``check_memory``) with the same forecast the engine then sizes its batch by."""

    def __init__(self, path_or_hf_repo: str, *, revision: str = None, adapter_path=None,
                 cpu_dequantize: str = "auto", memory_limit=None):
        self.path = resolve_model_path(str(path_or_hf_repo), revision)
        self.config = read_config(self.path)
        self.args = ModelArgs.from_dict(self.config)
        self.tokenizer = load_checkpoint_tokenizer(self.path, eos_token_ids=self.config.get("eos_token_id"))
        self.adapter_path = None if adapter_path is None else Path(adapter_path).expanduser()
        if self.adapter_path is not None:
            from .tuner.adapters import read_adapter_config

            read_adapter_config(self.adapter_path)  # a bad folder fails before the weights load
        self.cpu_dequantize, self.memory_limit = cpu_dequantize, memory_limit
        self.sampler = SamplerConfig.from_checkpoint(self.path)
        self._opened = None  # (thread, model): MLX evaluates arrays only on the thread whose stream made them
        self._told = False  # the CPU backend's line on what it converted, said once however often it opens

    def open(self) -> Model:
        """The model with its weights as the loader will hold them (the CPU
        backend's upcast and the adapters included) but none read yet."""
        thread = threading.get_ident()
        if self._opened is None or self._opened[0] != thread:
            model, _ = load_model(self.path, lazy=True, cpu_dequantize=self.cpu_dequantize,
                                  memory_budget=device_budget(self.memory_limit), quiet=self._told)
            self._told = True
            if self.adapter_path is not None:
                from .tuner.adapters import load_adapters

                load_adapters(model, self.adapter_path, lazy=True)
            self._opened = (thread, model)
        return self._opened[1]

    def positions(self, cached: int, new: int) -> int:
        """Positions used once ``new`` tokens after ``cached`` ones have their whole answer."""
        return positions_needed(cached + new, self.sampler.max_new_tokens, self.args.canvas_length)

    def check_positions(self, cached: int, new: int, advice: str) -> None:
        needed, allowed = self.positions(cached, new), self.args.max_position_embeddings
        if needed > allowed:
            before = f" after {cached} earlier ones" if cached else ""
            raise ContextTooLong(
                f"the prompt is {new} tokens{before}; with up to {self.sampler.max_new_tokens} new tokens "
                f"that needs {needed} positions, but the model has {allowed}; {advice}")

    def memory_plan(self, prompt_lengths: Iterable[int]) -> MemoryPlan:
        """``memory.generation_plan`` for these prompts, before any weight is read."""
        return generation_plan(self.open(), prompt_lengths, self.sampler.max_new_tokens,
                               memory_limit=self.memory_limit)

    def check_memory(self, prompt_lengths: Iterable[int], max_batch: Optional[int] = None) -> None:
        """Refuse prompts whose batch (``max_batch`` at once, else one) cannot fit, as the engine would."""
        prompt_lengths = list(prompt_lengths)
        self.memory_plan(prompt_lengths).batch(len(prompt_lengths), max_batch)

    def load(self, lazy: bool = False) -> Model:
        """The opened model with its weights read (left lazy with ``lazy``)."""
        model = self.open()
        self._opened = None
        if not lazy:
            try:
                mx.eval(model.parameters())
            except Exception as e:  # a read error surfaces here, when the weights are first used
                raise CheckpointError(f"{self.path}: cannot read the weights: {first_line(e)}") from None
        return model


def load(path_or_hf_repo: str, revision: str = None, lazy: bool = False,
         cpu_dequantize: str = "auto", adapter_path: str = None) -> Tuple[Model, Any]:
    """Load a DiffusionGemma checkpoint: ``model, tokenizer = load("path/or/repo")``;
    ``adapter_path`` applies what ``mlxdg lora`` trained there."""
    checkpoint = Checkpoint(path_or_hf_repo, revision=revision, adapter_path=adapter_path,
                            cpu_dequantize=cpu_dequantize)
    return checkpoint.load(lazy=lazy), checkpoint.tokenizer
