"""Hugging Face DiffusionGemma checkpoints to MLX, optionally quantized.

Tensors stream from the source safetensors (``mx.load`` reads each one only
when it is evaluated) through the recipe into shards that are written one
tensor at a time, so memory holds about one tensor, never the model. The
output is built in a hidden folder next to ``--mlx-path`` and renamed into
place only after every shard has been read back and its hash checked.
"""

import copy
import errno
import fcntl
import glob
import json
import math
import os
import shlex
import shutil
import signal
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.utils import MAX_FILE_SIZE_GB, save_config

from .. import __version__
from ..errors import UserError, first_line
from ..loader import ALLOW_PATTERNS, CheckpointError, read_config, resolve_model_path
from ..memory import human_size
from ..model import VISION_PREFIXES, Model, ModelArgs
from . import recipes
from .shards import Entry, ShardWriter, file_sha256, nbytes

MAX_SHARD_BYTES = MAX_FILE_SIZE_GB << 30
DTYPES = ("float16", "bfloat16", "float32")
# Written by the converter itself rather than copied from the source.
_NOT_COPIED = {"config.json", "model.safetensors.index.json"}
# Inside a partial output folder, locked (flock) by the run writing it: the
# lock dies with the process however it ends, so a later run can tell a dead
# run's leftovers from a live run's work.
LOCK_FILE = ".mlxdg-convert.lock"
# Room left over beyond the planned bytes: headers, side files, model card.
_SPACE_MARGIN = 16 << 20


class ConvertError(UserError):
    """Bad input or a failed step, with a one-line message meant for people."""


class Terminated(BaseException):
    """SIGTERM, raised where the process is, so that it cleans up as after Ctrl-C."""


@dataclass
class Tensor:
    """One source tensor on its way to the output."""

    array: Optional[mx.array]  # lazy; dropped once written so its memory is freed
    shape: Tuple[int, ...]
    source_bytes: int
    name: str  # its name in the MLX layout
    dtype: mx.Dtype  # output dtype of the values (and of the scales when quantized)
    quant: Optional[Dict[str, int]]  # {"group_size", "bits"}, or None to keep it as is

    @property
    def is_vision(self) -> bool:
        return self.name.startswith(VISION_PREFIXES)

    def outputs(self) -> List[Entry]:
        if self.quant is None:
            return [(self.name, self.shape, self.dtype)]
        *rows, width = self.shape
        module = self.name[: -len(".weight")]
        packed = (*rows, width * self.quant["bits"] // 32)
        groups = (*rows, width // self.quant["group_size"])
        return [(f"{module}.weight", packed, mx.uint32), (f"{module}.scales", groups, self.dtype),
                (f"{module}.biases", groups, self.dtype)]

    def convert(self) -> List[mx.array]:
        x = self.array.astype(self.dtype)
        if self.quant is None:
            return [x]
        return list(mx.quantize(x, self.quant["group_size"], self.quant["bits"], mode="affine"))


@dataclass
class Options:
    recipe: Optional[str]  # None: no quantization
    q_bits: int
    q_group_size: int
    dtype: Optional[str]  # None: keep each tensor's stored dtype
    text_only: bool


def _check_group_size(q_group_size: int) -> None:
    if q_group_size not in recipes.GROUP_SIZES:
        raise ConvertError(f"--q-group-size must be one of {', '.join(map(str, recipes.GROUP_SIZES))}")


def check_options(quantize: bool, q_bits: Optional[int], q_group_size: int, recipe: Optional[str],
                  dtype: Optional[str], text_only: bool) -> Options:
    if recipe is not None and recipe not in recipes.RECIPES:
        raise ConvertError(f"unknown recipe {recipe!r}; choose from {', '.join(recipes.RECIPES)} "
                           "(--recipe list describes them)")
    if recipe is None and quantize:
        recipe = recipes.DEFAULT_RECIPE
    if q_bits is not None:
        if recipe is None:
            raise ConvertError("--q-bits needs -q or --recipe")
        if q_bits not in recipes.Q_BITS:
            raise ConvertError(f"--q-bits must be one of {', '.join(map(str, recipes.Q_BITS))}")
        if recipes.fixes_bits(recipe):
            raise ConvertError(f"recipe {recipe!r} sets its own bits; drop --q-bits or use --recipe mixed")
    _check_group_size(q_group_size)
    if dtype is not None and dtype not in DTYPES:
        raise ConvertError(f"--dtype must be one of {', '.join(DTYPES)}")
    return Options(recipe, q_bits or recipes.DEFAULT_Q_BITS, q_group_size, dtype, text_only)


def _skeleton(config: dict) -> Model:
    """The model for ``config`` with unevaluated parameters: shapes and names, no memory."""
    try:
        return Model(ModelArgs.from_dict(config))
    except (TypeError, ValueError, KeyError) as e:
        raise ConvertError(f"config.json does not describe a DiffusionGemma model: {first_line(e)}") from None


def text_shapes(model: Model) -> Dict[str, Tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in tree_flatten(model.parameters())}


def plan(source: Path, config: dict, options: Options) -> List[Tensor]:
    """Every output tensor, in writing order, checked against the config
    before a single weight is read."""
    skeleton = _skeleton(config)
    expected = text_shapes(skeleton)
    dtype = getattr(mx, options.dtype) if options.dtype else None
    tensors, seen = [], {}
    for path in sorted(source.glob("model*.safetensors")):
        try:
            weights = mx.load(str(path))
        except (RuntimeError, ValueError, OSError) as e:
            raise ConvertError(f"cannot read {path}: {first_line(e)}") from None
        for key in sorted(weights):
            array = weights.pop(key)
            if key in seen:
                raise ConvertError(f"{key} is in both {seen[key]} and {path.name}")
            seen[key] = path.name
            if key.startswith(VISION_PREFIXES):
                if options.text_only:
                    continue
                name, quant = key, None
            else:
                renamed = skeleton.sanitize({key: array})
                if not renamed:
                    continue  # a tied copy or a buffer the model recomputes
                (name,) = renamed
                if name not in expected:
                    raise ConvertError(f"{path.name} holds {key}, which a DiffusionGemma model with "
                                       "this config.json does not have")
                if tuple(array.shape) != expected[name]:
                    raise ConvertError(f"{key} has shape {tuple(array.shape)}; config.json implies "
                                       f"{expected[name]}")
                quant = recipes.quant_params(options.recipe, name, array.shape, options.q_bits,
                                             options.q_group_size) if options.recipe else None
            out_dtype = dtype if dtype is not None and mx.issubdtype(array.dtype, mx.floating) else array.dtype
            tensors.append(Tensor(array, tuple(array.shape), array.nbytes, name, out_dtype, quant))
    missing = sorted(expected.keys() - {t.name for t in tensors})
    if missing:
        raise ConvertError(f"the checkpoint lacks {len(missing)} tensors that config.json implies, "
                           f"such as {missing[0]}")
    return tensors


def shard(tensors: List[Tensor], max_bytes: int) -> List[List[Tensor]]:
    """Consecutive groups of at most ``max_bytes`` of output; a tensor bigger
    than that gets a shard of its own."""
    shards, size = [], 0
    for t in tensors:
        n = sum(nbytes(shape, dtype) for _, shape, dtype in t.outputs())
        if not shards or size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += n
    return shards


def shard_name(i: int, count: int) -> str:
    return "model.safetensors" if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"


def output_config(config: dict, tensors: List[Tensor], options: Options) -> dict:
    config = copy.deepcopy(config)
    # transformers writes the full-attention layers' head size and KV heads
    # only inside per_layer_config, which mlx-vlm does not read: spell them
    # out as well, or it builds those layers with its 26B-A4B defaults.
    args = ModelArgs.from_dict(config)
    text = config.setdefault("text_config", {}) if "text_config" in config else config
    text.setdefault("global_head_dim", args.global_head_dim)
    text.setdefault("num_global_key_value_heads", args.num_global_key_value_heads)
    if options.text_only:
        # null rather than absent: mlx-vlm builds its default vision tower for a missing one.
        config["vision_config"] = None
    if options.dtype:
        for section in (config, config.get("text_config"), config.get("vision_config")):
            for key in ("dtype", "torch_dtype"):
                if isinstance(section, dict) and key in section:
                    section[key] = options.dtype
    if options.recipe:
        default = {"group_size": options.q_group_size,
                   "bits": recipes.default_bits(options.recipe, options.q_bits)}
        quantization = {**default, "mode": "affine"}
        for t in tensors:
            if t.quant and t.quant != default:
                quantization[t.name[: -len(".weight")]] = {**t.quant, "mode": "affine"}
        config["quantization"] = quantization
    return config


def text_bits_per_weight(tensors: List[Tensor]) -> float:
    text = [t for t in tensors if not t.is_vision]
    stored = sum(nbytes(shape, dtype) for t in text for _, shape, dtype in t.outputs())
    return 8 * stored / sum(math.prod(t.shape) for t in text)


def copy_side_files(source: Path, dest: Path) -> List[str]:
    """Copy what a download of the checkpoint fetches besides the weights:
    generation config, tokenizer, chat template."""
    copied = []
    for pattern in ALLOW_PATTERNS:
        for path in sorted(source.glob(pattern)):
            if path.is_file() and path.name not in _NOT_COPIED and path.suffix != ".safetensors":
                shutil.copyfile(path, dest / path.name)
                copied.append(path.name)
    return copied


def describe(options: Options) -> str:
    if options.recipe is None:
        return f"unquantized, {options.dtype or 'stored dtypes kept'}"
    return (f"recipe {options.recipe} ({recipes.summary(options.recipe, options.q_bits)}; "
            f"group size {options.q_group_size})")


def write_model_card(dest: Path, name: str, source: Path, base_model: Optional[str], options: Options,
                     bpw: float, command: str) -> None:
    """README.md with the Hub metadata of an MLX model; ``name`` is the repo id
    or folder the card tells people to load."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData()
    if (source / "README.md").is_file():
        try:
            data = ModelCard.load(source / "README.md").data  # keeps the license
        except ValueError:
            pass
    data.library_name = "mlx"
    data.pipeline_tag = "text-generation"
    data.tags = sorted(set(data.tags or []) | {"mlx", "diffusiongemma"})
    if base_model:
        data.base_model = base_model
        if options.recipe:
            data.base_model_relation = "quantized"
    origin = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "DiffusionGemma"
    vision = "dropped (text only)" if options.text_only else "carried over unquantized"
    text = f"""
# {name}

{origin} converted to MLX with mlx-diffgemma {__version__}.

* Weights: {describe(options)}; {bpw:.2f} bits per text weight.
* Vision tower: {vision}.
* Layout: the mlx-community one (`model.decoder.*`, fused `experts.gate_up_proj`), so mlx-vlm
  loads it too.

Made with:

```bash
{command}
```

## Use

```bash
pip install mlx-diffgemma
```

```python
from mlx_diffgemma import load

model, tokenizer = load("{name}")
```
"""
    ModelCard(f"---\n{data.to_yaml()}\n---\n{text}").save(dest / "README.md")


def command_line(hf_path: str, out: Path, options: Options) -> str:
    args = ["mlxdg", "convert", "--hf-path", hf_path, "--mlx-path", str(out)]
    if options.recipe:
        args += ["--recipe", options.recipe, "--q-group-size", str(options.q_group_size)]
        if not recipes.fixes_bits(options.recipe):
            args += ["--q-bits", str(options.q_bits)]
    if options.dtype:
        args += ["--dtype", options.dtype]
    if options.text_only:
        args.append("--text-only")
    return shlex.join(args)


def _progress(show: bool):
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                    TransferSpeedColumn(), TimeRemainingColumn(), console=Console(stderr=True),
                    disable=not show)


def _write_tensor(writer: ShardWriter, tensor: Tensor) -> None:
    # A function of its own so that the converted arrays die on return.
    for (name, _, _), array in zip(tensor.outputs(), tensor.convert()):
        writer.add(name, array)
    tensor.array = None


def write_weights(dest: Path, tensors: List[Tensor], shards: List[List[Tensor]], show_progress: bool) -> None:
    """Write and verify the shards and their index."""
    weight_map, hashes, total_size = {}, {}, 0
    with _progress(show_progress) as progress:
        task = progress.add_task("Converting", total=sum(t.source_bytes for t in tensors))
        for i, group in enumerate(shards):
            path = dest / shard_name(i, len(shards))
            entries = [e for t in group for e in t.outputs()]
            with ShardWriter(path, entries, {"format": "mlx"}) as writer:
                for t in group:
                    _write_tensor(writer, t)
                    # MLX keeps freed buffers for reuse; hand them back so memory stays at one tensor.
                    mx.clear_cache()
                    progress.advance(task, t.source_bytes)
                hashes[path] = writer.finish()
            weight_map.update((name, path.name) for name, _, _ in entries)
            total_size += sum(nbytes(shape, dtype) for _, shape, dtype in entries)

        task = progress.add_task("Verifying", total=sum(p.stat().st_size for p in hashes))
        for path, digest in hashes.items():
            if file_sha256(path, lambda n: progress.advance(task, n)) != digest:
                raise ConvertError(f"{path.name} reads back differently from what was written; "
                                   "check the disk and convert again")
            if set(mx.load(str(path))) != {n for n, f in weight_map.items() if f == path.name}:
                raise ConvertError(f"{path.name} does not hold the tensors planned for it")

    index = {"metadata": {"total_size": total_size,
                          "total_parameters": sum(math.prod(t.shape) for t in tensors)},
             "weight_map": dict(sorted(weight_map.items()))}
    (dest / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))


def _lock(folder: Path):
    """Claim ``folder`` for this process (see LOCK_FILE); the open file holds the claim."""
    lock = open(folder / LOCK_FILE, "w")
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def clear_leftovers(out: Path, say=print) -> None:
    """Remove what dead conversions to ``out`` left behind (their lock is free);
    refuse while a live one is writing; name, with their size, leftovers this
    run cannot tell the owner of."""
    for folder in sorted(out.parent.glob(f".{glob.escape(out.name)}.*.partial")):
        try:
            lock = open(folder / LOCK_FILE, "r+")
        except FileNotFoundError:
            say(f"mlxdg: {folder} ({human_size(_folder_size(folder))}) is left from an interrupted conversion "
                "of unknown owner; remove it unless a conversion is still running")
            continue
        with lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = lock.read().strip() or "?"
                raise ConvertError(f"another mlxdg convert (pid {pid}) is writing {out} in {folder}; "
                                   "wait for it to finish or stop it") from None
            size = _folder_size(folder)
            shutil.rmtree(folder)
        say(f"mlxdg: removed {folder} ({human_size(size)}), left by an interrupted conversion")
    for old in sorted(out.parent.glob(f".{glob.escape(out.name)}.*.old")):
        say(f"mlxdg: {old} ({human_size(_folder_size(old))}) holds what was at {out} before an interrupted "
            "--force run; move it back or remove it")


def _is_model_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def check_replaceable(out: Path) -> Optional[str]:
    """What --force would replace at ``out`` ("model", "empty folder", "link"),
    or a ConvertError when that would delete something that is not a model."""
    if out.is_symlink():
        return "link"
    if not out.is_dir():
        raise ConvertError(f"--mlx-path {out} is a file, not a model folder; --force replaces only model "
                           "folders: remove it yourself or choose another --mlx-path")
    if _is_model_folder(out):
        return "model"
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return "empty folder"
    count = f"{len(entries)} entries" if len(entries) > 1 else "1 entry"
    raise ConvertError(f"--mlx-path {out} holds {count} ({entries[0]}{', ...' * (len(entries) > 1)}) but no model "
                       "(config.json and safetensors); --force replaces only model folders: remove it "
                       "yourself or choose another --mlx-path")


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def check_space(out: Path, needed: int) -> None:
    """Refuse before writing when the disk under ``out`` has less room than the output needs."""
    where = _existing_ancestor(out.parent)
    disk = os.statvfs(where)
    if disk.f_flag & os.ST_RDONLY:
        raise ConvertError(f"cannot write {out}: {where} is on a read-only file system; choose another --mlx-path")
    free = disk.f_bavail * disk.f_frsize
    # A pseudo file system (sysfs, procfs) reports no blocks at all: the first write will tell.
    if disk.f_blocks and free < needed + _SPACE_MARGIN:
        raise ConvertError(f"not enough space for {out}: the converted model needs {human_size(needed)} and "
                           f"{where} has {human_size(free)} free; free some space or choose another --mlx-path")


def _write_failure(e: OSError, out: Path, needed: int) -> ConvertError:
    """A one-line ConvertError for a write that failed: full disk, read-only or denied."""
    where = f" ({e.filename})" if e.filename else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return ConvertError(f"no space left writing {out}{where}: the converted model needs {human_size(needed)}; "
                            "free some space or choose another --mlx-path (nothing was left behind)")
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return ConvertError(f"cannot write {out}{where}: {e.strerror}; choose another --mlx-path")
    return ConvertError(f"writing {out}{where} failed: {e.strerror or e}; nothing was left behind")


def _holds(outer: Path, inner: Path) -> bool:
    outer, inner = outer.resolve(), inner.resolve()
    return outer == inner or outer in inner.parents


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` to ``out``, replacing what is there."""
    if not (out.exists() or out.is_symlink()):
        tmp.rename(out)
        return
    old = tmp.with_suffix(".old")
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    else:
        old.unlink()


def upload(out: Path, repo: str) -> None:
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id=repo, repo_type="model", exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=out, repo_type="model",
                          commit_message=f"Upload {out.name}, converted with mlx-diffgemma {__version__}")
    except Exception as e:  # network, auth and hub errors alike: the conversion itself stands
        raise ConvertError(f"upload to {repo} failed ({first_line(e)}); the converted model is in {out}") from None


def convert(hf_path: str, mlx_path: str = "mlx_model", quantize: bool = False, q_bits: Optional[int] = None,
            q_group_size: int = 64, recipe: Optional[str] = None, dtype: Optional[str] = None,
            upload_repo: Optional[str] = None, force: bool = False, text_only: bool = False,
            max_shard_bytes: int = MAX_SHARD_BYTES, show_progress: bool = True) -> Path:
    """Convert a Hugging Face DiffusionGemma checkpoint (directory or repo id)
    to an MLX one at ``mlx_path``; returns its path."""
    options = check_options(quantize, q_bits, q_group_size, recipe, dtype, text_only)
    if upload_repo is not None and upload_repo.count("/") != 1:
        raise ConvertError(f"--upload-repo {upload_repo!r} is not a Hugging Face repo id (owner/name)")
    out = Path(mlx_path).expanduser()
    replacing = None
    if out.exists() or out.is_symlink():
        if not force:
            raise ConvertError(f"{out} already exists; pass --force to replace it")
        replacing = check_replaceable(out)
    source = resolve_model_path(str(hf_path))
    if out.exists() and _holds(out, source):
        raise ConvertError(f"--mlx-path {out} holds the source checkpoint; choose another output")
    config = read_config(source)
    if "quantization" in config or "quantization_config" in config:
        raise ConvertError(f"{source} is already quantized; convert the unquantized checkpoint")
    tensors = plan(source, config, options)
    shards = shard(tensors, max_shard_bytes)
    base_model = None if Path(hf_path).expanduser().exists() else str(hf_path)
    if out.parent.is_dir():
        clear_leftovers(out, say=lambda line: print(line, file=sys.stderr))
    needed = sum(nbytes(shape, dtype) for t in tensors for _, shape, dtype in t.outputs())
    check_space(out, needed)

    new_parents = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.partial"
    lock = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # Not tempfile.mkdtemp: its 0700 mode would stay on the renamed output.
        tmp.mkdir()
        lock = _lock(tmp)
        write_weights(tmp, tensors, shards, show_progress)
        save_config(output_config(config, tensors, options), tmp / "config.json", keep_vision_config=True)
        copied = copy_side_files(source, tmp)
        bpw = text_bits_per_weight(tensors)
        write_model_card(tmp, upload_repo or out.name, source, base_model, options, bpw,
                         command_line(str(hf_path), out, options))
        if (out.exists() or out.is_symlink()) and not force:
            raise ConvertError(f"{out} appeared while converting; pass --force to replace it")
        # Out of the output, but still held (the open file) until the rename.
        (tmp / LOCK_FILE).unlink()
        _replace(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in new_parents:  # deepest first; stops at the first one someone else filled
            try:
                parent.rmdir()
            except OSError:
                break
        if isinstance(e, OSError):
            raise _write_failure(e, out, needed) from None
        raise
    finally:
        if lock is not None:
            lock.close()

    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    print(f"Wrote {out}: {len(shards)} shard(s), {size / 1e9:.2f} GB, {describe(options)}, "
          f"{bpw:.2f} bits per text weight; shard hashes verified.")
    if replacing:
        print(f"Replaced the {replacing} that was at {out}.")
    if text_only:
        print("Vision tower dropped (--text-only).")
    elif vision := sum(t.is_vision for t in tensors):
        print(f"Vision tower: {vision} tensors carried over unquantized.")
    if not any(name.startswith("tokenizer") for name in copied):
        print(f"warning: {source} has no tokenizer files; add them to {out} before loading it", file=sys.stderr)
    if upload_repo:
        upload(out, upload_repo)
        print(f"Uploaded to https://huggingface.co/{upload_repo}")
    return out


def recipe_table(q_group_size: int = 64) -> str:
    """The recipes with the bits per weight they give the real 26B-A4B model
    (shapes from the default config; no weights needed)."""
    shapes = text_shapes(Model(ModelArgs()))
    lines = [f"Bits per weight of the 26B-A4B text weights at group size {q_group_size} "
             "(bfloat16 scales; the vision tower stays bfloat16):",
             f"  {'recipe':<8}{'bits':>6}  description"]
    for name, recipe in recipes.RECIPES.items():
        bpw = recipes.bits_per_weight(name, shapes, recipes.DEFAULT_Q_BITS, q_group_size)
        default = " (the default for -q)" if name == recipes.DEFAULT_RECIPE else ""
        lines.append(f"  {name:<8}{bpw:>6.2f}  {recipe['description']}{default}")
    lines.append(f"  {'none':<8}{16:>6.2f}  no -q: unquantized bfloat16")
    return "\n".join(lines)


def main(hf_path: Optional[str], mlx_path: str, quantize: bool, q_bits: Optional[int], q_group_size: int,
         recipe: Optional[str], dtype: Optional[str], upload_repo: Optional[str], force: bool,
         text_only: bool) -> int:
    """``mlxdg convert``; the exit status. Errors are one line on stderr;
    SIGTERM stops it as Ctrl-C does, leaving nothing behind."""
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        if recipe == "list":
            _check_group_size(q_group_size)
            print(recipe_table(q_group_size))
            return 0
        if not hf_path:
            raise ConvertError("--hf-path is required")
        convert(hf_path, mlx_path, quantize, q_bits, q_group_size, recipe, dtype, upload_repo, force, text_only,
                show_progress=sys.stderr.isatty())
    except (ConvertError, CheckpointError) as e:
        print(f"mlxdg: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # outside the writing itself (which says more): reading the source, say
        print(f"mlxdg: {e.filename or mlx_path}: {e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"mlxdg: interrupted; {mlx_path} was left as it was", file=sys.stderr)
        return 130
    except Terminated:
        print(f"mlxdg: terminated; {mlx_path} was left as it was", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def _terminate(signum, frame):
    # Once: a second SIGTERM must not cut the cleanup that the first one started.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated
