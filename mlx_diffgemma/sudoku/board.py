"""The Sudoku board as the model denoises it, for ``mlxdg generate`` on a terminal.

Each step draws the canvas's current guess on a 9x9 board: the puzzle's
givens, the cells whose guess held since the last step (settled), and the
cells still changing (noisy). The finished answer is then printed as 9 lines
of 9 digits, as a pipe gets it.
"""

from typing import Dict, Optional, Sequence

import numpy as np
from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from ..live import NOISY, SETTLED, STATUS, PlainView
from .puzzles import CELLS

GIVEN = "bold cyan"
# Canvas position of each cell: rows of 9 digits, each followed by a newline.
CELL_POSITIONS = np.array([r * 10 + c for r in range(9) for c in range(9)])


def digit_table(tokenizer) -> Dict[int, str]:
    """Token id -> the digit it spells, for the ten digit tokens."""
    vocab = tokenizer.get_vocab()
    return {vocab[str(d)]: str(d) for d in range(10) if str(d) in vocab}


def render(cells: Sequence[str], styles: Sequence[str]) -> Text:
    """A 9x9 board with box rules from 81 one-character cells and their styles."""
    text = Text()
    rule = "+-------+-------+-------+\n"
    for r in range(9):
        if r % 3 == 0:
            text.append(rule, STATUS)
        for c in range(9):
            if c % 3 == 0:
                text.append("| ", STATUS)
            i = r * 9 + c
            text.append(cells[i], styles[i])
            text.append(" ")
        text.append("|\n", STATUS)
    text.append(rule.rstrip("\n"), STATUS)
    return text


class BoardView(PlainView):
    """The board in place while denoising (rich ``Live``, transient), the answer as text after it."""

    def __init__(self, console: Console, tokenizer, puzzle: Sequence[int], max_steps: int):
        super().__init__()
        self.console = console
        self.digits = digit_table(tokenizer)
        self.puzzle = list(puzzle)
        self.max_steps = max_steps
        self.previous: Optional[np.ndarray] = None
        self.live: Optional[Live] = None

    def board(self, canvas: np.ndarray, settled: np.ndarray) -> Text:
        cells, styles = [], []
        for i in range(CELLS):
            if self.puzzle[i]:
                cells.append(str(self.puzzle[i]))
                styles.append(GIVEN)
                continue
            position = CELL_POSITIONS[i]
            token = int(canvas[position]) if position < len(canvas) else -1
            cells.append(self.digits.get(token, "\u00b7"))
            styles.append(SETTLED if settled[position] else NOISY)
        return render(cells, styles)

    def draft(self, event) -> None:
        canvas = event.canvas[0]
        settled = np.zeros(len(canvas), bool) if self.previous is None else canvas == self.previous
        self.previous = canvas
        blanks = [CELL_POSITIONS[i] for i in range(CELLS) if not self.puzzle[i]]
        status = Text(f"step {event.step}/{self.max_steps} \u00b7 {int(settled[blanks].sum())}/{len(blanks)} "
                      f"blank cells settled \u00b7 {int(event.accepted[0])} positions accepted", STATUS)
        group = Group(self.board(canvas, settled), status)
        if self.live is None:
            self.live = Live(group, console=self.console, transient=True, refresh_per_second=12)
            self.live.start(refresh=True)
        else:
            self.live.update(group)

    def block(self, text: str, thinking: str) -> None:
        self.previous = None
        if self.live is not None:
            self.live.stop()
            self.live = None
        super().block(text, thinking)

    def close(self, end_line: bool = True) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None
        super().close(end_line)
