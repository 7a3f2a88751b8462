"""What ``mlxdg generate`` and ``mlxdg chat`` share: the checkpoint of their
flags, opened so that a request that cannot fit is refused before its weights
are read (``loader.Checkpoint``); one answer run with a view and a soft
Ctrl-C. A failure becomes one ``mlxdg:`` line in ``cli.Commands``.
"""

import json
import os
import signal
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .engine import Draft
from .errors import error_line
from .generate import (Answer, Answers, Block, GenerationResult, generation_result, print_summary, prompt_ids,
                       run_statistics, stream_blocks)
from .live import make_view
from .loader import Checkpoint, CheckpointError, ContextTooLong, check_chat_template  # noqa: F401  (chat's too)
from .sampler import SamplerConfig
from .settings import DEFAULT_MODEL, MODEL_ENV, Settings, memory_limit_option  # noqa: F401  (callers find them here)
from .sudoku import is_sudoku
from .sudoku.puzzles import format_grid, parse as parse_puzzle, warn_if_unsolved


def open_checkpoint(settings: Settings) -> Checkpoint:
    """The checkpoint of ``settings``, with the sampler settings of its flags."""
    checkpoint = Checkpoint(settings.model_ref, adapter_path=settings.adapter_path,
                            cpu_dequantize=settings.cpu_dequantize, memory_limit=settings.memory_limit)
    try:
        checkpoint.sampler = checkpoint.sampler.override(**settings.sampler_overrides())
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    return checkpoint


class SoftInterrupt:
    """While active, a first Ctrl-C (or SIGTERM, as ``timeout`` and closing
    sessions send) only asks the running answer to stop after the current
    denoising step, which leaves the KV cache whole and what was committed
    written; a second one raises KeyboardInterrupt at once."""

    requested = False
    signal_number: Optional[int] = None  # the signal that asked

    def __enter__(self):
        self.requested, self.signal_number = False, None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested, self.signal_number = True, signum

    @property
    def exit_code(self) -> int:
        """The shell's status for the signal that stopped the answer."""
        return 128 + (self.signal_number or signal.SIGINT)

    @property
    def verb(self) -> str:
        return "terminated" if self.signal_number == signal.SIGTERM else "interrupted"

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


@dataclass
class CommandAnswer(Answer):
    """The one answer of ``mlxdg generate`` or a chat turn, as far as it was
    committed; its finish reason may also be "interrupted"."""

    cache_broken: bool = False  # a hard interrupt may have stopped the cache mid-update
    last: Optional[Block] = None

    def add(self, block: Block) -> None:
        super().add(block, 0)
        self.last = block

    def result(self) -> GenerationResult:
        """The answer as ``generate`` returns it; needs at least one block."""
        return generation_result([self], self.last)

    def as_json(self) -> dict:
        return {
            "text": self.text,
            "thinking": self.thinking,
            "finish_reason": self.finish_reason,
            "tokens": self.tokens,
            "steps_per_block": self.steps,
            **run_statistics(self.last),
            "tokens_per_forward": self.tokens_per_forward if self.last else None,
        }


def run_answer(model, tokenizer, prompt: List[int], sampler: SamplerConfig, settings: Settings, view,
               interrupt: SoftInterrupt, cache: Optional[list] = None) -> CommandAnswer:
    """Generate one answer to ``prompt`` (token ids), showing it on ``view``."""
    answer = CommandAnswer()
    events = stream_blocks(model, tokenizer, prompt, config=sampler, seed=settings.seed, cache=cache,
                             memory_limit=settings.memory_limit, **settings.path)
    try:
        for event in events:
            if isinstance(event, Draft):
                view.draft(event)
            else:
                shown = answer.thinking
                answer.add(event)
                view.block(event.texts[0], answer.thinking[len(shown):])
            if interrupt.requested:
                if answer.finish_reason is None:  # a Ctrl-C after the last block changes nothing
                    answer.finish_reason = "interrupted"
                break
    except KeyboardInterrupt:
        answer.finish_reason = "interrupted"
        answer.cache_broken = True
    finally:
        events.close()
        view.close(end_line=not settings.verbose)
    if settings.verbose and answer.last:
        print_summary(answer.result())
    return answer


def first_messages(settings: Settings, message: str) -> List[dict]:
    """The chat messages that open a conversation with ``message``."""
    system = [{"role": "system", "content": settings.system}] if settings.system else []
    return system + [{"role": "user", "content": message}]


def encode_prompt(settings: Settings, tokenizer, text: str, *, use_template: bool):
    """``text`` as the model reads it, the same for one prompt and a file of
    them: through the chat template (with ``--system``), or raw, where a
    system prompt has no place."""
    if not use_template:
        if settings.system:
            raise typer.BadParameter("needs the chat template", param_hint="--system")
        return prompt_ids(tokenizer, text)[0]
    return prompt_ids(tokenizer, None, messages=first_messages(settings, text), enable_thinking=settings.think)[0]


def require_stdout() -> None:
    """Refuse to run when the answer could not be written: standard output closed."""
    if sys.stdout is None:
        raise CheckpointError("standard output is closed, so the answer could not be written; "
                              "redirect it to a file instead (> answer.txt)")


def generate_command(settings: Settings, prompt: Optional[str], prompt_file: Optional[Path],
                     no_chat_template: bool, json_output: bool) -> None:
    """``mlxdg generate``."""
    require_stdout()
    text = read_prompt(prompt, prompt_file)
    checkpoint = open_checkpoint(settings)
    tokenizer = checkpoint.tokenizer
    puzzle = None
    if is_sudoku(checkpoint.config):
        puzzle = parse_puzzle(text)
        text = format_grid(puzzle)
    if not no_chat_template:
        check_chat_template(tokenizer, checkpoint.path)
    ids = encode_prompt(settings, tokenizer, text, use_template=not no_chat_template)
    checkpoint.check_positions(0, len(ids), "shorten the prompt or lower --max-tokens")
    checkpoint.check_memory([len(ids)])
    model = checkpoint.load()
    if json_output:
        settings = replace(settings, verbose=False)
    elif settings.verbose:
        print("=" * 10)
    view = make_view(tokenizer, checkpoint.sampler.max_denoising_steps, json_output, settings.no_live,
                     puzzle=puzzle)
    with SoftInterrupt() as interrupt:
        answer = run_answer(model, tokenizer, ids.tolist(), checkpoint.sampler, settings, view, interrupt)
    if puzzle is not None and answer.finish_reason != "interrupted":
        warn_if_unsolved(puzzle, answer.text)
    if json_output:
        typer.echo(json.dumps({"model": str(checkpoint.path), "seed": settings.seed, **answer.as_json()}))
    if answer.finish_reason == "interrupted":
        blocks = len(answer.steps)
        error_line(f"{interrupt.verb}; the answer so far is the {blocks} committed block{'s' * (blocks != 1)}")
        raise typer.Exit(interrupt.exit_code)


def batch_command(settings: Settings, prompts_file: Path, no_chat_template: bool, json_output: bool,
                  max_batch: Optional[int] = None) -> None:
    """``mlxdg generate --prompts-file``: every prompt of the file, batched
    (at most ``max_batch`` at once); the answers in the file's order (JSON
    Lines with ``--json``)."""
    require_stdout()
    texts = read_prompts(prompts_file)
    checkpoint = open_checkpoint(settings)
    tokenizer = checkpoint.tokenizer
    if not no_chat_template:
        check_chat_template(tokenizer, checkpoint.path)
    rows = [encode_prompt(settings, tokenizer, text, use_template=not no_chat_template) for text in texts]
    longest = max(len(ids) for ids in rows)
    checkpoint.check_positions(0, longest, "shorten the longest prompt or lower --max-tokens")
    checkpoint.check_memory(map(len, rows), max_batch)
    model = checkpoint.load()
    answers = Answers()
    events = stream_blocks(model, tokenizer, [ids.tolist() for ids in rows], config=checkpoint.sampler,
                             seed=settings.seed, memory_limit=settings.memory_limit, max_batch=max_batch,
                             **settings.path)
    written = 0
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        with batch_progress() as progress:
            task = progress.add_task("answering", total=len(texts))
            for event in events:
                if not isinstance(event, Block):
                    continue
                progress.update(task, advance=len(answers.add(event)),
                                description=f"{event.generation_tps:.1f} tok/s")
                # In the file's order, each answer as soon as it and all before it are done.
                while written in answers.rows and answers.rows[written].finish_reason is not None:
                    write_answer(written, texts[written], answers.rows[written], json_output)
                    written += 1
    except KeyboardInterrupt as e:
        stopped, code = ("terminated", 128 + signal.SIGTERM) if isinstance(e, Terminated) else ("interrupted", 130)
        error_line(f"{stopped}; the first {written} of {len(texts)} answers were written")
        raise typer.Exit(code) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
        events.close()
    if settings.verbose and not json_output:
        print_summary(answers.result(), texts=False)


class Terminated(KeyboardInterrupt):
    """SIGTERM where it stops the work at once, as Ctrl-C does."""


def _terminate(signum, frame):
    raise Terminated


def batch_progress() -> Progress:
    """A bar of answers done, on stderr when it is a terminal. Answers printed
    to the same terminal go above the bar; to a file or pipe, straight there."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), transient=True, disable=not sys.stderr.isatty(),
                    redirect_stdout=sys.stdout.isatty())


def write_answer(index: int, prompt: str, answer: Answer, json_output: bool) -> None:
    # print, not typer.echo: the progress bar redirects sys.stdout on a terminal (see batch_progress).
    if json_output:
        print(json.dumps({"index": index, "prompt": prompt, "text": answer.text, "thinking": answer.thinking,
                          "finish_reason": answer.finish_reason, "tokens": answer.tokens,
                          "steps_per_block": answer.steps, "tokens_per_forward": answer.tokens_per_forward}),
              flush=True)
    else:
        print(answer.text + "\n", flush=True)


def read_prompts(path: Path) -> List[str]:
    """One prompt per line, or JSON Lines whose objects have a "prompt" (blank lines skipped)."""
    prompts = []
    for number, line in enumerate(read_utf8(path, "--prompts-file").splitlines(), start=1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                prompts.append(str(json.loads(line)["prompt"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise typer.BadParameter(f'line {number} is not a JSON object with a "prompt"',
                                         param_hint="--prompts-file") from None
        else:
            prompts.append(line)
    if not prompts:
        raise typer.BadParameter("the file holds no prompt", param_hint="--prompts-file")
    return prompts


def read_prompt(prompt: Optional[str], prompt_file: Optional[Path]) -> str:
    """The prompt from the argument, ``-`` (stdin) or ``--prompt-file``."""
    if prompt is not None and prompt_file is not None:
        raise typer.BadParameter("give the prompt or --prompt-file, not both", param_hint="PROMPT")
    # A file or a pipe usually ends in a newline the user did not mean as part of the prompt.
    if prompt_file is not None:
        text = read_utf8(prompt_file, "--prompt-file").rstrip("\n")
    elif prompt == "-":
        text = decode_utf8(sys.stdin.buffer.read() if sys.stdin else b"", "standard input", "PROMPT").rstrip("\n")
    elif prompt is None:
        raise typer.BadParameter('give a prompt: mlxdg generate "..." , - to read stdin, or --prompt-file',
                                 param_hint="PROMPT")
    else:
        # Arguments arrive decoded with surrogate escapes where their bytes were not valid.
        text = decode_utf8(os.fsencode(prompt), "the prompt argument", "PROMPT")
    if not text.strip():
        raise typer.BadParameter("the prompt is empty", param_hint="PROMPT")
    return text


def decode_utf8(data: bytes, source: str, param_hint: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise typer.BadParameter(f"{source} is not valid UTF-8 (byte {e.start}); convert it to UTF-8 first",
                                 param_hint=param_hint) from None


def read_utf8(path: Path, flag: str) -> str:
    """The text of a prompt file, refused in one line when unreadable or not UTF-8."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise typer.BadParameter(f"cannot read {path} ({e.strerror})", param_hint=flag) from None
    return decode_utf8(data, str(path), flag)
