"""`mlxdg bench --task sudoku`: how well a Sudoku checkpoint solves fresh puzzles,
by block diffusion with its own sampler and by autoregressive decoding of the
same weights (the encoder, which training also fits as a causal LM). With
``fast``, the diffusion fast path (``exact=False``) solves the same puzzles
with the same seeds beside the exact one: the fast path's quality guard.

Every puzzle is solved on its own (batch 1, the puzzle's own seed), so its
seconds are the latency a user sees and its answer does not depend on the
others. The puzzles come from a seed that no training set uses.
"""

import hashlib
import json
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import mlx.core as mx
import numpy as np
from mlx_lm.generate import generate_step

from mlx_diffgemma.bench.engines import EncoderLM
from mlx_diffgemma.generate import Block, stream_blocks
from mlx_diffgemma.sampler import DEFAULT_SELF_CONDITIONING_TOP_K
from mlx_diffgemma.sudoku import BUILTIN_MODELS
from mlx_diffgemma.sudoku.puzzles import CELLS, Puzzle, conflicts, format_grid, is_solution, puzzles, read_answer

SCHEMA = "mlxdg-bench-sudoku/1"
FAST = "diffusion (fast)"
# Held out: training data sets are written from small seeds (see the README's recipe).
DEFAULT_SEED = 1_000_003
DEFAULT_GIVENS = (45, 50)


@dataclass(frozen=True)
class SudokuOptions:
    model: str = "sudoku"
    puzzles: int = 200
    givens: Tuple[int, int] = DEFAULT_GIVENS
    seed: int = DEFAULT_SEED
    autoregressive: bool = True
    cpu_dequantize: str = "auto"
    fast: bool = False  # also the diffusion fast path, beside the exact one
    sc_top_k: int = DEFAULT_SELF_CONDITIONING_TOP_K  # the fast path's self-conditioning tokens


def score(puzzle: Puzzle, text: str) -> dict:
    """One answer against its puzzle: solved, blank cells right, conflicts."""
    answer = read_answer(text)
    blanks = [i for i in range(CELLS) if not puzzle.puzzle[i]]
    right = 0 if answer is None else sum(answer[i] == puzzle.solution[i] for i in blanks)
    return {
        "solved": answer is not None and is_solution(puzzle.puzzle, answer),
        "blank_cells": len(blanks),
        "blank_cells_right": right,
        "conflicts": None if answer is None else conflicts(answer),
    }


def solve_diffusion(model, tokenizer, prompt: List[int], seed: int, **path) -> dict:
    """``path``: ``exact``/``top_k`` of ``stream_blocks`` (the exact path by default)."""
    steps, text = [], ""
    start = time.perf_counter()
    for event in stream_blocks(model, tokenizer, prompt, seed=seed, **path):
        if isinstance(event, Block):
            steps.append(int(event.steps[0]))
            text += event.texts[0]
    return {"text": text, "seconds": time.perf_counter() - start, "steps_per_block": steps}


def solve_autoregressive(lm, eos: set, prompt: List[int], max_tokens: int, tokenizer) -> dict:
    """Greedy, one token at a time, up to an end-of-sequence token."""
    tokens = []
    start = time.perf_counter()
    for token, _ in generate_step(mx.array(prompt), lm, max_tokens=max_tokens):
        token = int(token)
        if token in eos:
            break
        tokens.append(token)
    return {"text": tokenizer.decode(tokens), "seconds": time.perf_counter() - start, "tokens": len(tokens)}


def summarize(runs: List[dict]) -> dict:
    solved = sum(r["solved"] for r in runs)
    blanks = sum(r["blank_cells"] for r in runs)
    seconds = [r["seconds"] for r in runs]
    out = {
        "puzzles": len(runs),
        "solved": solved,
        "solve_rate": solved / len(runs),
        "blank_cell_accuracy": sum(r["blank_cells_right"] for r in runs) / blanks,
        "seconds_per_puzzle": statistics.mean(seconds),
        "seconds_per_puzzle_median": statistics.median(seconds),
    }
    steps = [s for r in runs for s in r.get("steps_per_block", [])]
    if steps:
        out["steps_per_block_mean"] = statistics.mean(steps)
        out["steps_per_block_distribution"] = {str(k): v for k, v in sorted(Counter(steps).items())}
    return out


def weights_digest(path: Path) -> str:
    """SHA-256 of the checkpoint's safetensors files, in name order."""
    digest = hashlib.sha256()
    for file in sorted(Path(path).glob("*.safetensors")):
        digest.update(file.read_bytes())
    return digest.hexdigest()


def run(opts: SudokuOptions, progress: Callable[[str], None] = lambda line: None) -> dict:
    from mlx_diffgemma.loader import load, resolve_model_path

    path = resolve_model_path(opts.model)
    model, tokenizer = load(str(path), cpu_dequantize=opts.cpu_dequantize)
    sampler = model.generation_config
    eos = set(sampler.eos_token_id or ()) | set(tokenizer.eos_token_ids)
    items = list(puzzles(opts.seed, opts.puzzles, opts.givens))
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": format_grid(p.puzzle)}],
                                             add_generation_prompt=True) for p in items]
    engines = {"diffusion": lambda i: solve_diffusion(model, tokenizer, prompts[i], opts.seed + i)}
    if opts.fast:
        engines[FAST] = lambda i: solve_diffusion(model, tokenizer, prompts[i], opts.seed + i, exact=False,
                                                  top_k=opts.sc_top_k)
    if opts.autoregressive:
        lm = EncoderLM(model)
        engines["autoregressive"] = lambda i: solve_autoregressive(lm, eos, prompts[i], sampler.max_new_tokens,
                                                                   tokenizer)
    # One untimed warm-up per engine (MLX compiles and allocates on the first call).
    for solve in engines.values():
        solve(0)
    results = {}
    for name, solve in engines.items():
        runs = []
        for i, item in enumerate(items):
            record = solve(i)
            runs.append({"puzzle": format_grid(item.puzzle).replace("\n", ""), **record, **score(item, record["text"])})
            if (i + 1) % 20 == 0 or i + 1 == len(items):
                done = summarize(runs)
                progress(f"{name}: {i + 1}/{len(items)} puzzles, {done['solve_rate']:.1%} solved, "
                         f"{done['blank_cell_accuracy']:.1%} of blank cells right")
        results[name] = {"summary": summarize(runs), "runs": runs}
    return {
        "schema": SCHEMA,
        # A built-in name, not this machine's install path; the digest names the very weights.
        "model": opts.model if opts.model in BUILTIN_MODELS else str(path),
        "weights_sha256": weights_digest(path),
        "options": {**asdict(opts), "givens": list(opts.givens)},
        "sampler": {k: v for k, v in asdict(sampler).items()},
        "max_denoising_steps": sampler.max_denoising_steps,
        # K >= vocab: the fast path's self-conditioning is the exact one's, only its proposals are drawn otherwise.
        "vocab_size": model.args.vocab_size,
        "engines": results,
    }


def print_report(result: dict, console) -> None:
    from rich.table import Table

    opts = result["options"]
    table = Table(title=f"Sudoku: {opts['puzzles']} puzzles with {opts['givens'][0]}-{opts['givens'][1]} givens "
                        f"(seed {opts['seed']}), {result['model']}")
    for column in ("decoding", "solved", "blank cells right", "steps/block (mean)", "s/puzzle"):
        table.add_column(column, justify="left" if column == "decoding" else "right")
    for name, engine in result["engines"].items():
        s = engine["summary"]
        steps = f"{s['steps_per_block_mean']:.1f} of {result['max_denoising_steps']}" if "steps_per_block_mean" in s \
            else "-"
        table.add_row(name, f"{s['solve_rate']:.1%} ({s['solved']})", f"{s['blank_cell_accuracy']:.1%}", steps,
                      f"{s['seconds_per_puzzle']:.3f}")
    console.print(table)
    for name, engine in result["engines"].items():
        distribution = engine["summary"].get("steps_per_block_distribution", {})
        if distribution:
            console.print(f"{name} steps per block: " + ", ".join(f"{k}: {v}" for k, v in distribution.items()))
    if FAST in result["engines"]:
        exact, fast = (result["engines"][n]["summary"] for n in ("diffusion", FAST))
        console.print(f"fast path against the exact one: solved {100 * (fast['solve_rate'] - exact['solve_rate']):+.1f} "
                      f"points, blank cells {100 * (fast['blank_cell_accuracy'] - exact['blank_cell_accuracy']):+.1f} "
                      f"points, steps per block {fast['steps_per_block_mean'] - exact['steps_per_block_mean']:+.2f}, "
                      f"s/puzzle x{fast['seconds_per_puzzle'] / exact['seconds_per_puzzle']:.2f}")


def write_json(result: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")


def write_plot(result: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = result["engines"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(engines)
    rates = [100 * engines[n]["summary"]["solve_rate"] for n in names]
    cells = [100 * engines[n]["summary"]["blank_cell_accuracy"] for n in names]
    x = np.arange(len(names))
    left.bar(x - 0.2, rates, 0.4, label="puzzles solved")
    left.bar(x + 0.2, cells, 0.4, label="blank cells right")
    left.set_xticks(x, [f"{n}\n{engines[n]['summary']['seconds_per_puzzle']:.2f} s/puzzle" for n in names])
    left.set_ylabel("%")
    left.set_ylim(0, 100)
    left.legend()
    diffusion = [n for n in names if "steps_per_block_distribution" in engines[n]["summary"]]
    width = 0.8 / len(diffusion)
    for i, name in enumerate(diffusion):
        distribution = engines[name]["summary"]["steps_per_block_distribution"]
        right.bar([int(k) + (i - (len(diffusion) - 1) / 2) * width for k in distribution], list(distribution.values()),
                  width, label=name)
    right.axvline(result["max_denoising_steps"], color="gray", linestyle=":", label="step cap")
    right.set_xlabel("denoising steps in the block")
    right.set_ylabel("puzzles")
    right.legend()
    opts = result["options"]
    fig.suptitle(f"Sudoku, {opts['puzzles']} puzzles with {opts['givens'][0]}-{opts['givens'][1]} givens")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot written to {path}"


def main(opts: SudokuOptions, json_path: Optional[str] = None, plot_path: Optional[str] = None) -> int:
    import sys

    from rich.console import Console

    from .run import BenchError, check_outputs

    console = Console(width=None if sys.stdout.isatty() else 160)
    errors = Console(stderr=True, soft_wrap=True)
    try:
        check_outputs(json_path, plot_path)  # before the puzzles, so a typo or a missing matplotlib loses nothing
    except BenchError as e:
        errors.print(f"mlxdg: {e}", highlight=False, markup=False)
        return 2
    result = run(opts, lambda line: errors.print(f"[dim]{line}[/dim]", highlight=False))
    print_report(result, console)
    if json_path:
        write_json(result, json_path)
        console.print(f"JSON written to {json_path}")
    if plot_path:
        console.print(write_plot(result, plot_path))
    return 0
