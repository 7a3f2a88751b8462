"""The ``mlxdg`` command line.

Each command imports what it runs inside its function, so that ``mlxdg
--help`` and usage errors come back without loading MLX's model code,
mlx-lm or transformers.
"""

import difflib
import functools
import inspect
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

from . import __version__
from .errors import describe, error_line
from .settings import (CPU_DEQUANTIZE_MODES, DEFAULT_MODEL, MAX_SEED, MAX_STEPS, MODEL_ENV, Settings, finite_option,
                       int_range_option, memory_limit_option)
from .sudoku.cli import app as sudoku_app

DEBUG = "--debug"

# Click's exceptions, or the copy of click that typer carries.
_click = sys.modules[typer.BadParameter.__module__]


class Commands(TyperGroup):
    """Every failure as one ``mlxdg:`` line and a non-zero exit, usage errors
    included; ``--debug``, which every command takes, keeps the traceback."""

    def main(self, args=None, prog_name=None, **extra):
        args = list(sys.argv[1:] if args is None else args)
        options = args[: args.index("--")] if "--" in args else args
        self.debug = DEBUG in options
        command = self.commands.get(next((a for a in options if a in self.commands), None))
        if self.debug and (command is None or not any(DEBUG in p.opts for p in command.params)):
            args.remove(DEBUG)  # a command that does not declare it takes it all the same
        extra.pop("standalone_mode", None)
        try:
            code = super().main(args, prog_name or "mlxdg", standalone_mode=False, **extra)
        except _click.ClickException as e:
            error_line(usage_error(e))
            sys.exit(e.exit_code)
        except typer.Abort:
            error_line("aborted")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (_click.ClickException, typer.Exit, typer.Abort):
            raise
        except BrokenPipeError:
            # The reader went away (``| head``): nothing to say, and nothing more to write at exit either.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(141) from None
        except KeyboardInterrupt:
            if self.debug:
                raise
            error_line("interrupted")
            raise typer.Exit(130) from None
        except Exception as e:
            if self.debug:
                raise
            error_line(describe(e))
            raise typer.Exit(1) from None



def usage_error(error) -> str:
    """A usage error as one line: what is wrong, with which flag, and what to do."""
    ctx = getattr(error, "ctx", None)
    where = ctx.command_path if ctx is not None else "mlxdg"
    if isinstance(error, _click.NoSuchOption) and ctx is not None:
        options = [o for p in ctx.command.params for o in p.opts + p.secondary_opts if o.startswith("-")]
        close = difflib.get_close_matches(error.option_name, options, n=1, cutoff=0.5)
        fix = f"did you mean {close[0]}?" if close else f"{where} --help lists the options"
        return f"no such option ({error.option_name}): {fix}"
    message = " ".join(error.format_message().split()).rstrip(".")
    return f"{message}; {where} --help says more"


def print_version(value: bool) -> None:
    if value:
        typer.echo(f"mlx-diffgemma {__version__}")
        raise typer.Exit()


app = typer.Typer(
    name="mlxdg",
    cls=Commands,
    help="Run Google's DiffusionGemma block-diffusion language model with MLX.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


CpuDequantize = Enum("CpuDequantize", {mode: mode for mode in CPU_DEQUANTIZE_MODES}, type=str)
CanvasChoice = Enum("CanvasChoice", {mode: mode for mode in ("full", "auto")}, type=str)


# For every command that loads a model: ``cpu_dequantize: CpuDequantizeOption = CpuDequantize.auto``,
# then ``load(..., cpu_dequantize=cpu_dequantize.value)``.
CpuDequantizeOption = Annotated[CpuDequantize, typer.Option(
    "--cpu-dequantize",
    help="Dequantize a quantized checkpoint's matrices to float32 at load: auto (on MLX's CPU "
    "backend, as many as fit in memory), always, or never (keep MLX's quantized kernels, much "
    "slower on the CPU).",
)]


app.add_typer(sudoku_app, name="sudoku")


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=print_version, is_eager=True,
                                          help="Print mlx-diffgemma's version and exit.")] = False,
):
    """Run Google's DiffusionGemma block-diffusion language model with MLX.

    Errors are one line; --debug after any command shows the traceback instead."""


@app.command()
def version():
    """Print the versions of mlx-diffgemma and MLX, and the BLAS MLX runs on."""
    import mlx.core as mx

    from . import blas

    typer.echo(f"mlx-diffgemma {__version__}, mlx {mx.__version__}, BLAS {blas.setup()}")


@app.command()
def convert(
    hf_path: str = typer.Option(None, "--hf-path", "--model", help="Hugging Face repo id or local directory."),
    mlx_path: str = typer.Option("mlx_model", "--mlx-path", help="Output directory."),
    quantize: bool = typer.Option(False, "-q", "--quantize", help="Quantize (recipe 'mixed' unless --recipe)."),
    q_bits: int = typer.Option(None, "--q-bits", help="Bits of the experts under 'mixed': 4 (default) or 8."),
    q_group_size: int = typer.Option(64, "--q-group-size", help="Quantization group size: 32, 64 or 128."),
    recipe: str = typer.Option(None, "--recipe", help="Quantization recipe; 'list' describes them."),
    dtype: str = typer.Option(None, "--dtype", help="float16, bfloat16 or float32 for unquantized "
                              "tensors and scales (default: as stored)."),
    upload_repo: str = typer.Option(None, "--upload-repo", help="Hugging Face repo to upload the result to."),
    force: bool = typer.Option(False, "--force", help="Replace --mlx-path if it exists."),
    text_only: bool = typer.Option(False, "--text-only", help="Drop the vision tower."),
):
    """Convert a Hugging Face DiffusionGemma checkpoint to MLX, optionally quantized."""
    from .convert.convert import main as convert_main

    raise typer.Exit(convert_main(hf_path, mlx_path, quantize, q_bits, q_group_size, recipe, dtype,
                                  upload_repo, force, text_only))


@app.command()
def bench(
    model: str = typer.Option(None, "--model", help="DiffusionGemma checkpoint: directory or Hugging Face repo id."),
    ar_model: str = typer.Option(None, "--ar-model", help="Autoregressive Gemma 4 for mlx-lm (directory or repo "
                                 "id); without it, --synthetic runs mlx-lm's Gemma 4 on the diffusion weights."),
    synthetic: str = typer.Option(None, "--synthetic", help="Random weights, no download: tiny, small or 26b-a4b."),
    layers: int = typer.Option(None, "--layers", help="With --synthetic: this many layers (26b-a4b has 30)."),
    steps: str = typer.Option(None, "--steps", help="Fixed denoising steps per block to sweep (default "
                              "4,8,16,32,48; with --synthetic tiny, a smoke run, 4,8)."),
    prompt_tokens: int = typer.Option(None, "--prompt-tokens", help="Random prompt length (default 512; tiny 32)."),
    gen_tokens: int = typer.Option(None, "--gen-tokens", help="Tokens generated per run (default 512; tiny 64)."),
    quant: str = typer.Option(None, "--quant", help="With --synthetic: mixed (default), 4, 8 or bf16."),
    trials: int = typer.Option(None, "--trials", help="Timed trials per engine, after one warm-up (default 5; "
                               "tiny 2)."),
    seed: int = typer.Option(None, "--seed", help="Seed of the prompts, the noise and the random weights (default 0); "
                             "with --task sudoku, of the puzzles (default: one no training set uses)."),
    json_path: str = typer.Option(None, "--json", help="Also write the full results to this JSON file."),
    plot: str = typer.Option(None, "--plot", help="Also plot tok/s against steps per block (needs matplotlib)."),
    cpu_dequantize: CpuDequantizeOption = CpuDequantize.auto,
    batch: str = typer.Option(None, "--batch", help="Also sweep canvases per forward pass, e.g. 1,2,4,8: "
                              "total tok/s and latency per request."),
    task: str = typer.Option(None, "--task", help="sudoku: solve rate, blank-cell accuracy and steps per block "
                             "of a Sudoku checkpoint (default --model sudoku) on fresh puzzles, diffusion and "
                             "autoregressive decoding side by side."),
    puzzles: int = typer.Option(200, "--puzzles", min=1, help="With --task sudoku: how many puzzles."),
    givens: str = typer.Option("45-50", "--givens", help="With --task sudoku: givens per puzzle, a range."),
    fast: bool = typer.Option(False, "--fast", help="With --task sudoku: also solve the puzzles by the diffusion fast "
                              "path, same seeds, beside the exact one (the fast path's quality guard)."),
    sc_top_k: int = typer.Option(None, "--sc-top-k", min=1, help="With --task sudoku --fast: tokens a position whose "
                                 "probabilities feed self-conditioning (default 32; at least the vocabulary: all)."),
    vs: str = typer.Option(None, "--vs", help="mlx-vlm: also time mlx-vlm's engine step and ours (exact and fast) "
                           "on the same weights, interleaved (needs mlx-vlm installed)."),
):
    """Diffusion versus autoregressive decoding on this machine, side by side, against the roofline."""
    if task is not None:
        from .bench.sudoku import DEFAULT_SEED, SudokuOptions, main as sudoku_main
        from .sudoku.puzzles import parse_givens

        if task != "sudoku":
            raise typer.BadParameter(f"the only task is sudoku, not {task!r}", param_hint="--task")
        try:
            given_range = parse_givens(givens)
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--givens") from None
        options = SudokuOptions(model or "sudoku", puzzles, given_range, DEFAULT_SEED if seed is None else seed,
                                cpu_dequantize=cpu_dequantize.value, fast=fast,
                                **({} if sc_top_k is None else {"sc_top_k": sc_top_k}))
        raise typer.Exit(sudoku_main(options, json_path, plot))
    if fast or sc_top_k is not None:
        raise typer.BadParameter("only with --task sudoku; --vs mlx-vlm times the fast path against the exact one",
                                 param_hint="--fast/--sc-top-k")
    seed = 0 if seed is None else seed
    from .bench.run import BenchError, Options, main as bench_main, parse_batches, parse_steps

    try:
        step_counts = parse_steps(steps) if steps else None
        batches = parse_batches(batch) if batch else ()
    except BenchError as e:
        raise typer.BadParameter(str(e), param_hint="--steps/--batch") from None
    options = Options(model, ar_model, synthetic, layers, step_counts, prompt_tokens, gen_tokens, quant, trials,
                      seed, cpu_dequantize.value, batches, vs)
    raise typer.Exit(bench_main(options, json_path, plot))


# The options of Settings, which generate and chat both take.
SETTINGS_OPTIONS = {
    "model": Annotated[Optional[str], typer.Option(
        "--model",
        help=f"Hugging Face repo id or local directory (default: ${MODEL_ENV} if set, else {DEFAULT_MODEL}).")],
    "max_tokens": Annotated[Optional[int], typer.Option(
        "--max-tokens", "-m", min=1, help="Most tokens to generate (default: the checkpoint's, else 256).")],
    "steps": Annotated[Optional[int], typer.Option(
        "--steps", "--max-denoising-steps", callback=int_range_option(1, MAX_STEPS),
        help="Most denoising steps per block (default: the checkpoint's).")],
    "entropy_bound": Annotated[Optional[float], typer.Option(
        "--entropy-bound", callback=finite_option, help="Entropy (nats) of the positions a step may accept; higher takes more per step.")],
    "temp": Annotated[Optional[float], typer.Option(
        "--temp", callback=finite_option, help="A constant temperature: --t-min and --t-max both this.")],
    "t_min": Annotated[Optional[float], typer.Option(
        "--t-min", callback=finite_option, help="Temperature of the last step.")],
    "t_max": Annotated[Optional[float], typer.Option(
        "--t-max", callback=finite_option, help="Temperature of the first step.")],
    "seed": Annotated[Optional[int], typer.Option(
        "--seed", callback=int_range_option(0, MAX_SEED), help="Seed of the sampler's random draws.")],
    "system": Annotated[Optional[str], typer.Option("--system", "--system-prompt", help="System prompt.")],
    "think": Annotated[bool, typer.Option(
        "--think", help="Let the model think first; thoughts go to stderr, or dimmed into the live view.")],
    "verbose": Annotated[bool, typer.Option("--verbose", help="Print mlx-lm's statistics lines after the answer.")],
    "no_live": Annotated[bool, typer.Option("--no-live", help="No live canvas on a terminal, just the text.")],
    "cpu_dequantize": CpuDequantizeOption,
    "memory_limit": Annotated[Optional[str], typer.Option(
        "--memory-limit", callback=memory_limit_option,
        help="Memory to plan for, e.g. 24GB (default: what the device offers).")],
    "exact": Annotated[bool, typer.Option(
        "--exact/--fast", help="--exact (default): the reference path, token for token transformers' with the same "
        "draws. --fast: one pass over the logits and self-conditioning from the top tokens of each position.")],
    "sc_top_k": Annotated[Optional[int], typer.Option(
        "--sc-top-k", min=1, help="With --fast: tokens a position whose probabilities feed self-conditioning "
        "(default 32).")],
    "canvas": Annotated[CanvasChoice, typer.Option(
        "--canvas", help="full (default): always the model's whole canvas; auto: an eighth, quarter or half "
        "canvas when fewer tokens remain under --max-tokens (a different computation from the reference's).")],
    "adapter_path": Annotated[Optional[str], typer.Option(
        "--adapter-path", help="Apply the adapters (or fully fine-tuned weights) that mlxdg lora wrote here.")],
    "debug": Annotated[bool, typer.Option("--debug", help="Show tracebacks.")],
}


def with_settings(command):
    """Give ``command`` the options of SETTINGS_OPTIONS after its own; it gets them as ``settings``."""
    own = [p for p in inspect.signature(command).parameters.values() if p.name != "settings"]
    shared = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                default=getattr(Settings, name))
              for name, annotation in SETTINGS_OPTIONS.items()]

    @functools.wraps(command)
    def run(**options):
        values = {name: options.pop(name) for name in SETTINGS_OPTIONS}
        values["cpu_dequantize"] = CpuDequantize(values["cpu_dequantize"]).value
        values["canvas"] = CanvasChoice(values["canvas"]).value
        return command(settings=Settings(**values), **options)

    run.__signature__ = inspect.Signature(own + shared)
    run.__annotations__ = {p.name: p.annotation for p in own + shared}
    return run


@app.command()
@with_settings
def generate(
    prompt: Annotated[Optional[str], typer.Argument(help="The prompt; - reads it from stdin.")] = None,
    prompt_option: Annotated[Optional[str], typer.Option(
        "-p", "--prompt", help="The prompt, as mlx-lm takes it; - reads it from stdin.")] = None,
    prompt_file: Annotated[Optional[Path], typer.Option(
        "--prompt-file", exists=True, dir_okay=False, help="Read the prompt from this file.")] = None,
    no_chat_template: Annotated[bool, typer.Option(
        "--no-chat-template", "--ignore-chat-template", help="Use the prompt as it is.")] = False,
    json_output: Annotated[bool, typer.Option(
        "--json", help="Print one JSON object with the answer and its statistics, nothing else.")] = False,
    prompts_file: Annotated[Optional[Path], typer.Option(
        "--prompts-file", exists=True, dir_okay=False,
        help="Answer every prompt of this file (one per line, or JSON Lines with a \"prompt\"), batched; "
        "the answers come in order, as JSON Lines with --json.")] = None,
    max_batch: Annotated[Optional[int], typer.Option(
        "--max-batch", min=1,
        help="With --prompts-file: most prompts denoised at once "
        "(default: as many as memory allows, at most 8).")] = None,
    *,
    settings: Settings,
):
    """Answer one prompt, streaming the text block by block (or a file of prompts, batched)."""
    from .commands import batch_command, generate_command

    if prompt is not None and prompt_option is not None:
        raise typer.BadParameter("give the prompt once: as an argument or with -p", param_hint="-p/--prompt")
    prompt = prompt if prompt_option is None else prompt_option
    if prompts_file is not None:
        if prompt is not None or prompt_file is not None:
            raise typer.BadParameter("--prompts-file replaces the prompt", param_hint="--prompts-file")
        batch_command(settings, prompts_file, no_chat_template, json_output, max_batch)
    elif max_batch is not None:
        raise typer.BadParameter("--max-batch goes with --prompts-file", param_hint="--max-batch")
    else:
        generate_command(settings, prompt, prompt_file, no_chat_template, json_output)


@app.command()
@with_settings
def chat(*, settings: Settings):
    """Chat in the terminal; the KV cache is kept between turns."""
    from .chat import chat_command

    chat_command(settings)


@app.command()
def serve(
    model: Annotated[Optional[str], typer.Option(
        "--model", help=f"Hugging Face repo id or local directory (default: ${MODEL_ENV} if set, else {DEFAULT_MODEL}).")] = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on; the default takes local clients only.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port to listen on.")] = 8080,
    max_batch: Annotated[Optional[int], typer.Option(
        "--max-batch", min=1, help="Most requests denoised at once (default: as many as memory allows, at most 8).")] = None,
    max_queue: Annotated[int, typer.Option(
        "--max-queue", min=1, help="Requests that may wait for a slot; past it the server answers 503.")] = 64,
    max_tokens: Annotated[Optional[int], typer.Option(
        "--max-tokens", "-m", min=1, help="Default max_tokens of a request (default: the checkpoint's, else 256).")] = None,
    memory_limit: Annotated[Optional[str], typer.Option(
        "--memory-limit", callback=memory_limit_option,
        help="Memory to plan for, e.g. 24GB (default: what the device offers).")] = None,
    api_key: Annotated[Optional[str], typer.Option(
        "--api-key", envvar="MLXDG_API_KEY", help="Require this key (Authorization: Bearer ...) on /v1 requests.")] = None,
    prefix_cache: Annotated[bool, typer.Option(
        "--prefix-cache/--no-prefix-cache", help="Keep recent conversations' KV caches and encode only what is new.")] = True,
    cpu_dequantize: CpuDequantizeOption = CpuDequantize.auto,
    adapter_path: SETTINGS_OPTIONS["adapter_path"] = None,
    exact: SETTINGS_OPTIONS["exact"] = True,
    sc_top_k: SETTINGS_OPTIONS["sc_top_k"] = None,
    canvas: SETTINGS_OPTIONS["canvas"] = Settings.canvas,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
):
    """Serve the OpenAI API (chat and text completions), batching concurrent requests."""
    from .server import serve as run_server

    run_server(Settings(model=model).model_ref, host=host, port=port, max_batch=max_batch, max_queue=max_queue,
               memory_limit=memory_limit, api_key=api_key, max_tokens=max_tokens, prefix_cache=prefix_cache,
               cpu_dequantize=CpuDequantize(cpu_dequantize).value, exact=exact, sc_top_k=sc_top_k,
               canvas=CanvasChoice(canvas).value, adapter_path=adapter_path)


# Fine-tuning lives in its own modules; their heavy imports happen inside the commands.
from . import fuse as _fuse  # noqa: E402
from . import lora as _lora  # noqa: E402

app.command("lora")(_lora.command)
app.command("fuse")(_fuse.command)
