"""``mlxdg chat``: a conversation that keeps its encoder KV cache between turns.

The conversation is kept as token ids, exactly as the model saw or wrote
them (``transcript``); the cache holds a prefix of it. Generation leaves the
last committed block out of the cache, so each turn encodes what the cache
lacks of the transcript and then the new turn's tokens, and nothing else:
a turn gives what a fresh run on the whole transcript would give.

An answer enters the transcript up to its end-of-sequence token; the next
turn then starts with the chat template's own end of the model's turn, so an
answer that ended on ``<eos>``, ran out of tokens or was stopped is closed the
same way as one that ended on the end-of-turn token.
"""

import signal
import sys
from typing import Callable, List, Optional

from .commands import CommandAnswer, Settings, SoftInterrupt, encode_prompt, open_checkpoint, require_stdout, run_answer
from .errors import error_line
from .generate import resolve_config
from .live import make_view
from .loader import Checkpoint, ContextTooLong, check_chat_template
from .memory import InsufficientMemory
from .sudoku import is_sudoku
from .sudoku.puzzles import PuzzleError, format_grid, parse as parse_puzzle

# Stands for a model answer when the template renders a conversation, to find where the answer ends.
_ANSWER = "MLXDG-ANSWER-MARKER"

HELP = "/reset starts over, /exit or Ctrl-D leaves, Ctrl-C stops an answer"


class ChatSession:
    """The transcript and the cache of one conversation, and the model that extends them."""

    def __init__(self, checkpoint: Checkpoint, model, settings: Settings):
        self.checkpoint = checkpoint
        self.model = model
        self.tokenizer = checkpoint.tokenizer
        self.settings = settings
        self.sampler = resolve_config(model, self.tokenizer, checkpoint.sampler, {})
        self.reset()

    def reset(self) -> None:
        self.transcript: List[int] = []
        self.cache: Optional[list] = None

    def turn_tokens(self, message: str) -> List[int]:
        """The tokens that add the user's ``message`` and open the model's answer."""
        if not self.transcript:
            return encode_prompt(self.settings, self.tokenizer, message, use_template=True).tolist()
        conversation = [{"role": "user", "content": "."}, {"role": "assistant", "content": _ANSWER},
                        {"role": "user", "content": message}]
        text = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False,
                                                  enable_thinking=self.settings.think)
        return self.tokenizer.encode(text[text.index(_ANSWER) + len(_ANSWER):], add_special_tokens=False)

    def ask(self, message: str, view, interrupt: SoftInterrupt) -> CommandAnswer:
        """Answer ``message``. Raises ContextTooLong or InsufficientMemory,
        leaving the conversation as it was, when the turn cannot fit."""
        if is_sudoku(self.checkpoint.config):
            message = format_grid(parse_puzzle(message))  # one line of 81 cells, as the model reads them
        if self.cache is None:
            self.cache = self.model.make_cache()
        turn = self.turn_tokens(message)
        cached = self.cache[0].offset
        prompt = self.transcript[cached:] + turn
        self.checkpoint.check_positions(cached, len(prompt), "/reset starts a new conversation")
        answer = run_answer(self.model, self.tokenizer, prompt, self.sampler, self.settings, view, interrupt,
                            cache=self.cache)
        self.transcript += turn + self._kept(answer.tokens)
        if answer.cache_broken:
            self.cache = None  # rebuilt from the transcript on the next turn
        return answer

    def _kept(self, tokens: List[int]) -> List[int]:
        """An answer's tokens before its end-of-sequence token."""
        eos = set(self.sampler.eos_token_id or ())
        return next((tokens[:i] for i, t in enumerate(tokens) if t in eos), tokens)


def repl(session: ChatSession, make_view: Callable[[], object]) -> None:
    """Read messages until /exit or end of input; errors of one turn do not end the session."""
    error_line(f"chatting with {session.checkpoint.path}: {HELP}")
    while True:
        try:
            message = input(">>> ").strip()
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print()
            continue
        except UnicodeDecodeError as e:
            error_line(f"that message is not valid UTF-8 (byte {e.start}); type it again")
            continue
        if not sys.stdin.isatty():
            print(message)  # what a terminal would have echoed, so that a piped session reads as one
        if message == "/exit":
            return
        if message == "/reset":
            session.reset()
            error_line("conversation cleared")
            continue
        if message.startswith("/"):
            error_line(f"unknown command {message.split()[0]}: {HELP}")
            continue
        if not message:
            continue
        try:
            with SoftInterrupt() as interrupt:
                answer = session.ask(message, make_view(), interrupt)
        except (ContextTooLong, InsufficientMemory, PuzzleError) as e:
            error_line(str(e))
            continue
        if interrupt.signal_number == signal.SIGTERM:
            error_line("terminated")
            raise SystemExit(interrupt.exit_code)
        if answer.finish_reason == "interrupted":
            error_line("answer stopped")


def chat_command(settings: Settings) -> None:
    """``mlxdg chat``."""
    require_stdout()
    checkpoint = open_checkpoint(settings)
    tokenizer = checkpoint.tokenizer
    check_chat_template(tokenizer, checkpoint.path, advice="chat needs one; mlxdg generate "
                        "--ignore-chat-template answers a prompt as it is")
    opening = encode_prompt(settings, tokenizer, "", use_template=True)
    checkpoint.check_memory([len(opening)])
    session = ChatSession(checkpoint, checkpoint.load(), settings)
    if sys.stdin.isatty():
        import readline  # noqa: F401  (line editing and history for input())

    steps = checkpoint.sampler.max_denoising_steps
    repl(session, lambda: make_view(tokenizer, steps, no_live=settings.no_live))
