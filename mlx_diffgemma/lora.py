"""``mlxdg lora``: fine-tune DiffusionGemma (LoRA, DoRA or every weight) with
its own training objective, with mlx-lm's flags, data formats and adapter files.

Options come from the command line, then ``-c config.yaml`` (mlx-lm's keys),
then the defaults below. Everything that can be checked is checked before the
weights are read, and nothing is written to ``--adapter-path`` until the
model, the data and the memory forecast are all known to be usable.
"""

import json
import math
from pathlib import Path
from typing import Optional

import typer

from .errors import UserError

DEFAULTS = {
    "model": None,
    "train": False,
    "test": False,
    "data": None,
    "fine_tune_type": "lora",
    "optimizer": "adam",
    "optimizer_config": {},
    "num_layers": 16,
    "batch_size": 4,
    "iters": 1000,
    "val_batches": 25,
    "test_batches": 500,
    "learning_rate": 1e-4,
    "lr_schedule": None,
    "steps_per_report": 10,
    "steps_per_eval": 200,
    "save_every": 100,
    "resume_adapter_file": None,
    "adapter_path": "adapters",
    "max_seq_length": 2048,
    "grad_checkpoint": False,
    "seed": 0,
    "lora_parameters": {},
    "encoder_loss_weight": 1.0,
    "self_conditioning_p": 0.5,
    "self_conditioning_temperature": 1.0,
    "cpu_dequantize": "auto",
    "memory_limit": None,
}
OPTIMIZERS = ("adam", "adamw", "sgd", "adafactor", "muon")


class OptionError(UserError, ValueError):
    """An option that cannot work, named with its flag."""


def resolve_options(given: dict) -> dict:
    """Command-line values (None where not given) over the config file's over the defaults."""
    options = dict(given)
    config_file = options.pop("config", None)
    file_values = {}
    if config_file:
        import yaml

        try:
            file_values = yaml.safe_load(Path(config_file).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise OptionError(f"-c {config_file}: cannot read it as YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(file_values, dict):
            raise OptionError(f"-c {config_file}: not a mapping of option names to values")
        unknown = sorted(set(file_values) - set(DEFAULTS))
        if unknown:
            raise OptionError(f"-c {config_file}: unknown option {unknown[0]!r}")
    resolved = {}
    for key, default in DEFAULTS.items():
        value = options.get(key)
        resolved[key] = value if value is not None else file_values.get(key, default)
    lora = dict(resolved["lora_parameters"] or {})
    for key in ("rank", "scale", "dropout"):
        if options.get(f"lora_{key}") is not None:
            lora[key] = options[f"lora_{key}"]
    resolved["lora_parameters"] = lora
    _check(resolved)
    return resolved


def _check(o: dict) -> None:
    if not o["model"]:
        raise OptionError("--model is required")
    if not (o["train"] or o["test"]):
        raise OptionError("give --train, --test or both")
    for key in ("iters", "batch_size", "steps_per_report", "steps_per_eval", "save_every", "max_seq_length"):
        if not isinstance(o[key], int) or o[key] < 1:
            raise OptionError(f"--{key.replace('_', '-')} must be a positive integer, not {o[key]!r}")
    if o["optimizer"] not in OPTIMIZERS:
        raise OptionError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, not {o['optimizer']!r}")
    if not 0 <= o["self_conditioning_p"] <= 1:
        raise OptionError(f"--self-conditioning-p must be between 0 and 1, not {o['self_conditioning_p']}")
    if o["encoder_loss_weight"] < 0:
        raise OptionError(f"--encoder-loss-weight must be >= 0, not {o['encoder_loss_weight']}")
    if not o["self_conditioning_temperature"] > 0:
        raise OptionError("--self-conditioning-temperature must be > 0")


def learning_rate(o: dict):
    """A float, or mlx-lm's schedule from ``lr_schedule``: a config mapping
    (name, arguments, warmup) or the name of one of MLX's schedules, which
    then decays from --learning-rate over --iters."""
    from mlx_lm.tuner.utils import build_schedule

    schedule = o["lr_schedule"]
    if schedule is None:
        return o["learning_rate"]
    if isinstance(schedule, str):
        schedule = json.loads(schedule) if schedule.lstrip().startswith("{") else {
            "name": schedule, "arguments": [o["learning_rate"], o["iters"]]}
    try:
        return build_schedule(schedule)
    except (AttributeError, KeyError, TypeError) as e:
        raise OptionError(f"--lr-schedule {schedule}: not one of MLX's schedules with its arguments ({e})") from None


def make_optimizer(o: dict):
    import mlx.optimizers as optim

    classes = {"adam": optim.Adam, "adamw": optim.AdamW, "sgd": optim.SGD, "adafactor": optim.Adafactor,
               "muon": optim.Muon}
    config = o["optimizer_config"].get(o["optimizer"], {}) if o["optimizer_config"] else {}
    return classes[o["optimizer"]](learning_rate=learning_rate(o), **config)


def adapter_config(o: dict, model_path: Path, num_layers: int) -> dict:
    """What ``adapter_config.json`` records: mlx-lm's keys, plus the base model
    and the objective's settings."""
    from .model import MODEL_TYPE
    from .tuner.adapters import DEFAULT_LORA_PARAMETERS, LORA_KEYS

    config = {k: v for k, v in o.items() if k not in ("memory_limit", "cpu_dequantize")}
    config.update(model=str(model_path), model_type=MODEL_TYPE, num_layers=num_layers,
                  lora_parameters={**DEFAULT_LORA_PARAMETERS, **o["lora_parameters"], "keys": list(LORA_KEYS)})
    return config


def run(options: dict) -> None:
    """``mlxdg lora`` with resolved options; raises the errors the CLI reports."""
    import itertools

    import mlx.core as mx
    import numpy as np
    from mlx_lm.utils import load_tokenizer

    from .loader import load_model, read_config, resolve_model_path
    from .cpu import on_cpu
    from .memory import checkpoint_weight_bytes, device_budget, parameter_count
    from .model import ModelArgs, grouped_experts
    from .tuner import datasets, trainer
    from .tuner.adapters import load_adapters, num_lora_layers, prepare
    from .tuner.losses import Objective
    from .memory import training_plan

    o = options
    path = resolve_model_path(o["model"])
    config = read_config(path)
    args = ModelArgs.from_dict(config)
    tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    L = args.canvas_length
    max_seq_length = min(o["max_seq_length"], args.max_position_embeddings)
    names = (["train", "valid"] if o["train"] else []) + (["test"] if o["test"] else [])
    splits = datasets.load_splits(o["data"], tokenizer, names, L, max_seq_length)
    if o["train"]:
        datasets.check_batch_size(splits["train"], o["batch_size"])
        datasets.check_batch_size(splits["valid"], o["batch_size"])
    if o["test"]:
        datasets.check_batch_size(splits["test"], o["batch_size"])
    resume_file = None
    if o["resume_adapter_file"]:
        resume_file = Path(o["resume_adapter_file"]).expanduser()
        if not resume_file.is_file():
            raise OptionError(f"--resume-adapter-file {resume_file} does not exist")
    longest = max(e.length(L) for s in splits.values() for e in s.examples)
    canvases = max(e.canvases(L) for s in splits.values() for e in s.examples)
    weights = checkpoint_weight_bytes(path)
    if on_cpu() and o["cpu_dequantize"] != "never":
        weights = 4 * parameter_count(args)  # the CPU backend computes in float32 (cpu.prepare_weights)
    plan = training_plan(args, weights, fine_tune_type=o["fine_tune_type"],
                         num_layers=o["num_layers"], rank=o["lora_parameters"].get("rank", 8),
                         batch_size=o["batch_size"], canvases=canvases, context=longest,
                         grad_checkpoint=o["grad_checkpoint"], optimizer=o["optimizer"],
                         host_routing=grouped_experts(args.hidden_size, 2 * args.moe_intermediate_size)
                         and ("quantization" not in config or o["cpu_dequantize"] != "never"),
                         self_conditioning=o["self_conditioning_p"] > 0, budget=device_budget(o["memory_limit"]))
    plan.require()

    np.random.seed(o["seed"])
    mx.random.seed(o["seed"])
    model, _ = load_model(path, cpu_dequantize=o["cpu_dequantize"], memory_budget=device_budget(o["memory_limit"]))
    objective = Objective(encoder_loss_weight=o["encoder_loss_weight"],
                          self_conditioning_p=o["self_conditioning_p"],
                          self_conditioning_temperature=o["self_conditioning_temperature"],
                          grad_checkpoint=o["grad_checkpoint"])
    adapter_path = Path(o["adapter_path"]).expanduser()

    if o["train"]:
        prepare(model, o["fine_tune_type"], o["num_layers"], o["lora_parameters"])
        optimizer = make_optimizer(o)
        start = 0
        if resume_file is not None:
            start = trainer.resume(model, optimizer, resume_file)
        trainable = sum(v.size for _, v in _flatten(model.trainable_parameters()))
        total = sum(v.size for _, v in _flatten(model.parameters()))
        _say(f"Training {trainable / 1e6:.3f}M of {total / 1e6:.3f}M parameters ({o['fine_tune_type']}); "
             f"{len(splits['train'])} train and {len(splits['valid'])} validation examples; forecast peak "
             f"{plan.describe()}" + (f"; resuming after step {start}" if start else ""))
        adapter_path.mkdir(parents=True, exist_ok=True)
        trainer.atomic_write_text(adapter_path / trainer.CONFIG_FILE, json.dumps(
            adapter_config(o, path, num_lora_layers(model, o["num_layers"])), indent=4))
        schedule = trainer.Schedule(iters=o["iters"], steps_per_report=o["steps_per_report"],
                                    steps_per_eval=o["steps_per_eval"], val_batches=o["val_batches"],
                                    save_every=o["save_every"], seed=o["seed"])
        # A resumed run sees the batches the uninterrupted one would have.
        train_batches = itertools.islice(datasets.batches(splits["train"], o["batch_size"], L, pad, seed=o["seed"]),
                                         start, None)
        val = lambda: datasets.batches(splits["valid"], o["batch_size"], L, pad, seed=o["seed"], loop=False)
        if start < o["iters"]:
            trainer.train(model, objective, optimizer, train_batches, val, schedule, adapter_path, start=start)
    elif o["test"] and (adapter_path / "adapters.safetensors").is_file():
        load_adapters(model, adapter_path)

    if o["test"]:
        test = datasets.batches(splits["test"], o["batch_size"], L, pad, seed=o["seed"], loop=False)
        loss = trainer.evaluate(model, objective, test, o["test_batches"], o["seed"])
        print(f"Test loss {loss:.3f}, test ppl {math.exp(min(loss, 700)):.3f}.")


def _flatten(tree):
    from mlx.utils import tree_flatten

    return tree_flatten(tree)


def _say(message: str) -> None:
    import sys

    print(message, file=sys.stderr, flush=True)


def command(
    model: Optional[str] = typer.Option(None, "--model", help="Base checkpoint: directory or Hugging Face repo id."),
    train: bool = typer.Option(False, "--train", help="Train."),
    test: bool = typer.Option(False, "--test", help="Report the loss on test.jsonl (after training)."),
    data: Optional[str] = typer.Option(None, "--data", help="Directory with train.jsonl, valid.jsonl (and "
                                       "test.jsonl): messages, prompt/completion or text rows."),
    fine_tune_type: Optional[str] = typer.Option(None, "--fine-tune-type", help="lora (default), dora or full "
                                                 "(every weight)."),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help="adam (default), adamw, sgd, adafactor or muon."),
    num_layers: Optional[int] = typer.Option(None, "--num-layers", help="LoRA on the last N layers (default 16; "
                                             "-1 all)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Examples per step (default 4)."),
    iters: Optional[int] = typer.Option(None, "--iters", help="Training steps (default 1000)."),
    val_batches: Optional[int] = typer.Option(None, "--val-batches", help="Validation batches (default 25; -1 all)."),
    test_batches: Optional[int] = typer.Option(None, "--test-batches", help="Test batches (default 500; -1 all)."),
    learning_rate: Optional[float] = typer.Option(None, "--learning-rate", help="Learning rate (default 1e-4)."),
    lr_schedule: Optional[str] = typer.Option(None, "--lr-schedule", help="An MLX schedule decaying from "
                                              "--learning-rate over --iters (e.g. cosine_decay), or mlx-lm's "
                                              "JSON {name, arguments, warmup}."),
    lora_parameters: Optional[str] = typer.Option(None, "--lora-parameters", help='JSON, e.g. {"rank": 8, '
                                                  '"scale": 2.0, "dropout": 0.0}.'),
    lora_rank: Optional[int] = typer.Option(None, "--lora-rank", help="LoRA rank (default 8)."),
    lora_scale: Optional[float] = typer.Option(None, "--lora-scale", help="LoRA scale (default 2.0)."),
    lora_dropout: Optional[float] = typer.Option(None, "--lora-dropout", help="LoRA dropout (default 0)."),
    adapter_path: Optional[str] = typer.Option(None, "--adapter-path", help="Where adapters, checkpoints and "
                                               "the log go (default ./adapters)."),
    resume_adapter_file: Optional[str] = typer.Option(None, "--resume-adapter-file", help="Start from these "
                                                      "weights; from their step when the optimizer state "
                                                      "saved with them is there."),
    steps_per_report: Optional[int] = typer.Option(None, "--steps-per-report", help="Default 10."),
    steps_per_eval: Optional[int] = typer.Option(None, "--steps-per-eval", help="Default 200."),
    save_every: Optional[int] = typer.Option(None, "--save-every", help="Checkpoint every N steps (default 100)."),
    max_seq_length: Optional[int] = typer.Option(None, "--max-seq-length", help="Most positions of an example: "
                                                 "context plus padded canvases; longer lines are refused "
                                                 "(default 2048)."),
    grad_checkpoint: bool = typer.Option(False, "--grad-checkpoint", help="Recompute activations in "
                                         "the backward pass to save memory."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the data order and every draw (default 0)."),
    encoder_loss_weight: Optional[float] = typer.Option(None, "--encoder-loss-weight", help="Weight of the "
                                                        "encoder's next-token loss (default 1.0)."),
    self_conditioning_p: Optional[float] = typer.Option(None, "--self-conditioning-p", help="Probability that "
                                                        "an example's pass is self-conditioned (default 0.5)."),
    self_conditioning_temperature: Optional[float] = typer.Option(
        None, "--self-conditioning-temperature", help="Temperature dividing the first pass's logits before "
        "they condition the second (default 1.0)."),
    cpu_dequantize: Optional[str] = typer.Option(None, "--cpu-dequantize", help="auto, always or never (keep a "
                                                 "quantized base quantized on the CPU: QLoRA, slow)."),
    memory_limit: Optional[str] = typer.Option(None, "--memory-limit", help="Memory to plan for, e.g. 24GB."),
    config: Optional[str] = typer.Option(None, "-c", "--config", help="YAML file of options (mlx-lm's keys)."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
):
    """Fine-tune DiffusionGemma with its own objective (LoRA, DoRA or full), as mlx_lm.lora does."""
    given = {k: v for k, v in locals().items() if k != "debug"}
    for flag in ("train", "test", "grad_checkpoint"):  # a flag not given leaves the config file's value
        given[flag] = given[flag] or None
    if given["lora_parameters"] is not None:
        try:
            given["lora_parameters"] = json.loads(given["lora_parameters"])
        except json.JSONDecodeError as e:
            raise OptionError(f"--lora-parameters is not JSON ({e.msg})") from None
    run(resolve_options(given))
