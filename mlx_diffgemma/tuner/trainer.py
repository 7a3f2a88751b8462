"""The training loop: steps, validation, progress, the JSON Lines log and
checkpoints that survive an interruption.

A checkpoint is ``adapters.safetensors`` (the trained weights, mlx-lm's
format) and ``optimizer.safetensors`` (the optimizer's state), each written
to a temporary file and renamed into place, and each carrying the step it was
taken at in its metadata: an interrupted run leaves the last complete
checkpoint, and ``--resume-adapter-file`` continues from its step when the two
files agree on it.
"""

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .batches import Batch
from .losses import Objective, draw

ADAPTER_FILE = "adapters.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
CONFIG_FILE = "adapter_config.json"
LOG_FILE = "train_log.jsonl"


@dataclass(frozen=True)
class Schedule:
    """When things happen, in training steps."""

    iters: int
    steps_per_report: int = 10
    steps_per_eval: int = 200
    val_batches: int = 25
    save_every: int = 100
    seed: int = 0


def step_key(seed: int, step: int, stream: int = 0) -> mx.array:
    """The random key of training step ``step`` (``stream`` 1: validation
    batch ``step``): the same whether or not the run was resumed."""
    return mx.random.key(int(np.random.SeedSequence([seed, stream, step]).generate_state(1)[0]))


def atomic_save(path: Path, arrays: dict, metadata: dict) -> None:
    """Write safetensors so that ``path`` is the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.stem}.partial.safetensors")
    mx.save_safetensors(str(tmp), arrays, metadata={k: str(v) for k, v in metadata.items()})
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(adapter_path: Path, model, optimizer, step: int) -> None:
    """The trained weights and the optimizer's state after ``step`` steps."""
    atomic_save(adapter_path / ADAPTER_FILE, dict(tree_flatten(model.trainable_parameters())), {"step": step})
    atomic_save(adapter_path / OPTIMIZER_FILE, dict(tree_flatten(optimizer.state)), {"step": step})


def resume(model, optimizer, adapter_file: Path) -> int:
    """Load ``adapter_file``'s weights, and the optimizer state saved with
    them when there is one from the same step; the step to continue after (0
    to start over with these weights)."""
    weights, metadata = mx.load(str(adapter_file), return_metadata=True)
    model.load_weights(list(weights.items()), strict=False)
    optimizer_file = adapter_file.with_name(OPTIMIZER_FILE)
    if "step" not in metadata or not optimizer_file.is_file():
        return 0
    state, state_metadata = mx.load(str(optimizer_file), return_metadata=True)
    if state_metadata.get("step") != metadata["step"]:
        return 0
    optimizer.state = tree_unflatten(list(state.items()))
    return int(metadata["step"])


class Log:
    """The run's log, one JSON object per line, appended to ``path``, and what
    the progress display shows."""

    def __init__(self, path: Path, progress: "Progress"):
        self.path, self.progress = path, progress

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.progress.show(record)


class Progress:
    """A rich bar with the last train loss, validation loss, learning rate,
    tokens/s and peak memory on a terminal; one line per report elsewhere."""

    def __init__(self, total: int, start: int):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeRemainingColumn

        self.console = Console(stderr=True)
        self.live = self.console.is_terminal
        self.fields = {"train": "-", "val": "-", "lr": "-", "tps": "-", "peak": "-"}
        self.bar = Bar(TextColumn("step"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                       TextColumn("{task.description}"), console=self.console, disable=not self.live)
        self.task = self.bar.add_task(self._description(), total=total, completed=start)

    def _description(self) -> str:
        f = self.fields
        return f"train {f['train']}  val {f['val']}  lr {f['lr']}  {f['tps']} tok/s  peak {f['peak']} GB"

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        self.bar.__exit__(*exc)

    def advance(self) -> None:
        self.bar.advance(self.task)

    def show(self, record: dict) -> None:
        if "train_loss" in record:
            self.fields.update(train=f"{record['train_loss']:.3f}", lr=f"{record['learning_rate']:.2e}",
                               tps=f"{record['tokens_per_second']:.1f}", peak=f"{record['peak_memory_gb']:.2f}")
        if "val_loss" in record:
            self.fields["val"] = f"{record['val_loss']:.3f}"
        if "saved" in record:
            message = f"step {record['step']}: saved {record['saved']}"
        elif "val_loss" in record:
            message = f"step {record['step']}: val loss {record['val_loss']:.3f}"
        else:
            message = (f"step {record['step']}: train loss {record['train_loss']:.3f} (decoder "
                       f"{record['decoder_loss']:.3f}, encoder {record['encoder_loss']:.3f}), "
                       f"lr {record['learning_rate']:.2e}, {record['tokens_per_second']:.1f} tok/s, "
                       f"peak {record['peak_memory_gb']:.2f} GB")
        if self.live:
            self.bar.update(self.task, description=self._description())
        else:
            print(message, file=sys.stderr, flush=True)


def evaluate(model, objective: Objective, batches: Iterator[Batch], num_batches: int, seed: int) -> float:
    """The mean loss per supervised token over ``num_batches`` batches (all
    when -1), with the same draws for the same batch every time."""
    total, tokens = 0.0, 0
    for i, batch in enumerate(batches):
        if num_batches != -1 and i >= num_batches:
            break
        draws = draw(batch, model.args.vocab_size, objective.self_conditioning_p, key=step_key(seed, i, 1))
        loss, n, *_ = objective(model, batch, draws)
        mx.eval(loss, n)
        total += loss.item() * n.item()
        tokens += n.item()
    return total / max(tokens, 1)


def train(model, objective: Objective, optimizer, train_batches: Iterator[Batch],
          val_batches: Optional[Callable[[], Iterator[Batch]]], schedule: Schedule, adapter_path: Path,
          start: int = 0, on_save: Optional[Callable[[int], None]] = None) -> None:
    """Train from step ``start`` to ``schedule.iters``, validating at the first
    step, every ``steps_per_eval`` and at the end, and saving a checkpoint every
    ``save_every`` steps and at the end."""
    value_and_grad = nn.value_and_grad(model, objective)
    model.train()
    sums = np.zeros(4)  # loss, decoder loss, encoder loss, supervised tokens
    steps, elapsed = 0, 0.0
    mx.reset_peak_memory()
    with Progress(schedule.iters, start) as progress:
        log = Log(adapter_path / LOG_FILE, progress)
        for step in range(start + 1, schedule.iters + 1):
            if val_batches is not None and (step == start + 1 or step % schedule.steps_per_eval == 0
                                            or step == schedule.iters):
                tic = time.perf_counter()
                val_loss = evaluate(model, objective, val_batches(), schedule.val_batches, schedule.seed)
                model.train()
                log.write({"step": step - 1, "val_loss": val_loss, "val_time": time.perf_counter() - tic})

            tic = time.perf_counter()
            batch = next(train_batches)
            draws = draw(batch, model.args.vocab_size, objective.self_conditioning_p,
                         key=step_key(schedule.seed, step))
            (loss, n, decoder_loss, encoder_loss), grads = value_and_grad(model, batch, draws)
            optimizer.update(model, grads)
            mx.eval(model.trainable_parameters(), optimizer.state, loss, n)
            elapsed += time.perf_counter() - tic
            sums += [loss.item() * n.item(), decoder_loss.item() * n.item(), encoder_loss.item() * n.item(), n.item()]
            steps += 1
            progress.advance()

            if step % schedule.steps_per_report == 0 or step == schedule.iters:
                tokens = sums[3]
                log.write({"step": step, "train_loss": sums[0] / tokens, "decoder_loss": sums[1] / tokens,
                           "encoder_loss": sums[2] / tokens, "learning_rate": optimizer.learning_rate.item(),
                           "steps_per_second": steps / elapsed, "tokens_per_second": tokens / elapsed,
                           "trained_tokens": int(tokens), "peak_memory_gb": mx.get_peak_memory() / 1e9})
                sums[:], steps, elapsed = 0, 0, 0.0
            if step % schedule.save_every == 0 or step == schedule.iters:
                save_checkpoint(adapter_path, model, optimizer, step)
                if on_save is not None:
                    on_save(step)
                log.write({"step": step, "saved": str(adapter_path / ADAPTER_FILE)})
