"""How an answer appears while it is generated.

``PlainView`` writes each committed block's text as it comes: all a pipe
gets. ``LiveView`` also shows, on a terminal, the canvas being denoised right
after the committed text, with a step counter below it. The canvas shown is
the model's current guess (each position's argmax); positions whose guess did
not change at the last step are drawn settled, the others still noisy.
"""

import sys
from typing import Optional

import numpy as np
from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from .engine import Draft

SETTLED = "bold"
NOISY = "dim yellow"
THINKING = "dim italic"
STATUS = "dim"


class PlainView:
    """Committed text to ``out``; thinking to ``err``, so that ``out`` holds the answer alone."""

    def __init__(self):
        self.out = sys.stdout
        self.err = sys.stderr
        self.ends_line = True

    def draft(self, event: Draft) -> None:
        pass

    def block(self, text: str, thinking: str) -> None:
        if thinking:
            self.err.write(thinking)
            self.err.flush()
        if text:
            self.out.write(text)
            self.out.flush()
            self.ends_line = text.endswith("\n")

    def close(self, end_line: bool = True) -> None:
        if end_line and not self.ends_line:
            self.out.write("\n")
            self.out.flush()
        self.ends_line = True


class QuietView(PlainView):
    """Nothing while generating (``--json`` prints the result at the end)."""

    def block(self, text: str, thinking: str) -> None:
        pass

    def close(self, end_line: bool = True) -> None:
        pass


class LiveView:
    """Committed text above, the canvas being denoised in place after it.

    Rich can only redraw what is still on the screen, so the live region holds
    just the unfinished last line of the answer plus the canvas: each line the
    answer completes is printed above it for good."""

    def __init__(self, console: Console, tokenizer, max_steps: int):
        self.console = console
        self.tokenizer = tokenizer
        self.max_steps = max_steps
        self.pending = Text()  # committed text of the line still being written
        self.previous: Optional[np.ndarray] = None  # the last step's canvas, within the block
        self.pieces = {}
        self.live: Optional[Live] = None

    def _piece(self, token: int) -> str:
        """A canvas position as text: special tokens as a dot, newlines visible."""
        if token not in self.pieces:
            text = self.tokenizer.decode([token], skip_special_tokens=True)
            self.pieces[token] = text.replace("\n", "\u21b5") if text else "\u00b7"
        return self.pieces[token]

    def _show(self, renderable, now: bool = False) -> None:
        if self.live is None:
            self.live = Live(renderable, console=self.console, transient=True, refresh_per_second=12)
            self.live.start(refresh=True)
        else:
            self.live.update(renderable, refresh=now)

    def draft(self, event: Draft) -> None:
        canvas = event.canvas[0]
        settled = np.zeros(len(canvas), bool) if self.previous is None else canvas == self.previous
        self.previous = canvas
        line = self.pending.copy()
        for token, still in zip(canvas.tolist(), settled):
            line.append(self._piece(token), SETTLED if still else NOISY)
        status = Text(f"block {event.row_blocks[0] + 1} \u00b7 step {event.step}/{self.max_steps} \u00b7 "
                      f"{int(settled.sum())}/{len(canvas)} settled \u00b7 "
                      f"{int(event.accepted[0])} accepted", STATUS)
        self._show(Group(line, status))

    def block(self, text: str, thinking: str) -> None:
        self.previous = None
        self.pending.append(thinking, THINKING)
        self.pending.append(text)
        lines = self.pending.wrap(self.console, self.console.width)
        self.pending = lines[-1] if lines else Text()
        # Printing redraws the live region as last drawn below the printed lines, so it must not
        # show them any more by then.
        self._show(self.pending, now=True)
        for line in lines[:-1]:
            self.console.print(line)

    def close(self, end_line: bool = True) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None
        if self.pending.plain:
            self.console.print(self.pending, end="\n" if end_line else "")
        self.pending = Text()
        self.previous = None


def make_view(tokenizer, max_steps: int, json_output: bool = False, no_live: bool = False, puzzle=None):
    """The live view on a terminal that can redraw, unless turned off; plain text otherwise.
    With a Sudoku ``puzzle`` the live view is its board."""
    if json_output:
        return QuietView()
    console = Console(highlight=False, soft_wrap=False)
    if no_live or not console.is_terminal or console.is_dumb_terminal:
        return PlainView()
    if puzzle is not None:
        from .sudoku.board import BoardView

        return BoardView(console, tokenizer, puzzle, max_steps)
    return LiveView(console, tokenizer, max_steps)
