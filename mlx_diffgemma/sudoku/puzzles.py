"""Seeded 9x9 Sudoku puzzles with unique solutions, a solver, a checker and
the text layout the packaged model reads and writes.

A grid is a tuple of 81 ints in row order, 0 for a blank. A puzzle comes from
a random solved grid (a backtracking fill in random digit order) by blanking
cells in random order, down to the requested number of givens, while the
solution stays unique: after each blank the solver looks for a second
solution, and a cell whose blanking would allow one is kept.
"""

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

from ..errors import UserError

Grid = Tuple[int, ...]

CELLS = 81
ALL = 0x3FE  # bits 1..9
_ROW = [i // 9 for i in range(CELLS)]
_COL = [i % 9 for i in range(CELLS)]
_BOX = [(i // 27) * 3 + (i % 9) // 3 for i in range(CELLS)]
# The 20 cells that share a row, column or box with each cell.
PEERS = [
    sorted({j for j in range(CELLS) if j != i and (_ROW[j] == _ROW[i] or _COL[j] == _COL[i] or _BOX[j] == _BOX[i])})
    for i in range(CELLS)
]
UNITS = ([[r * 9 + c for c in range(9)] for r in range(9)]
         + [[r * 9 + c for r in range(9)] for c in range(9)]
         + [[(b // 3) * 27 + (b % 3) * 3 + (k // 3) * 9 + k % 3 for k in range(9)] for b in range(9)])
_DIGIT = {1 << d: d for d in range(1, 10)}


class PuzzleError(UserError, ValueError):
    """Text that is not a 9x9 puzzle, said in one line."""


def _candidates(grid: Sequence[int]) -> Optional[List[int]]:
    """Each cell's candidate bitmask after the givens; None if two givens clash."""
    cand = [ALL] * CELLS
    for i, d in enumerate(grid):
        if d:
            bit = 1 << d
            if not cand[i] & bit:
                return None
            cand[i] = bit
            for j in PEERS[i]:
                cand[j] &= ~bit
    return cand


def _search(cand: List[int], limit: int, order: Optional[random.Random]) -> List[List[int]]:
    """Up to ``limit`` solutions (as candidate lists with one bit per cell),
    by depth-first search on the cell with the fewest candidates. ``order``
    shuffles the digits tried (to fill random grids)."""
    solutions = []
    stack = [cand]
    while stack and len(solutions) < limit:
        cand = stack.pop()
        # Propagate: place every cell with one candidate, until nothing changes.
        placed = [False] * CELLS
        ok = True
        changed = True
        while changed and ok:
            changed = False
            for i in range(CELLS):
                c = cand[i]
                if c == 0:
                    ok = False
                    break
                if not placed[i] and c & (c - 1) == 0:
                    placed[i] = True
                    for j in PEERS[i]:
                        if cand[j] & c:
                            cand[j] &= ~c
                            changed = True
        if not ok:
            continue
        best, best_count = -1, 10
        for i in range(CELLS):
            c = cand[i]
            if c & (c - 1):
                n = bin(c).count("1")
                if n < best_count:
                    best, best_count = i, n
                    if n == 2:
                        break
        if best < 0:
            solutions.append(cand)
            continue
        digits = [d for d in range(1, 10) if cand[best] >> d & 1]
        if order is not None:
            order.shuffle(digits)
        # The stack pops last first: push in reverse so the first digit is tried first.
        for d in reversed(digits):
            child = list(cand)
            child[best] = 1 << d
            stack.append(child)
    return solutions


def solve(grid: Sequence[int], limit: int = 2) -> List[Grid]:
    """Up to ``limit`` solutions of ``grid``."""
    cand = _candidates(grid)
    if cand is None:
        return []
    return [tuple(_DIGIT[c] for c in s) for s in _search(cand, limit, None)]


def random_solution(rng: random.Random) -> Grid:
    """A random solved grid."""
    return tuple(_DIGIT[c] for c in _search([ALL] * CELLS, 1, rng)[0])


def make_puzzle(rng: random.Random, givens: int) -> Tuple[Grid, Grid]:
    """A puzzle with exactly ``givens`` givens and a unique solution, and that solution."""
    if not 17 <= givens <= CELLS:
        raise ValueError(f"givens must be 17..81, got {givens}")
    while True:
        solution = random_solution(rng)
        grid = list(solution)
        order = list(range(CELLS))
        rng.shuffle(order)
        count = CELLS
        for i in order:
            if count == givens:
                return tuple(grid), solution
            grid[i] = 0
            # Blanking keeps the solution unique unless a second one appears.
            if count <= 60 and len(solve(grid, 2)) > 1:
                grid[i] = solution[i]
            else:
                count -= 1
        # Too few cells could be blanked (rare below about 25 givens): start again.


def is_solution(puzzle: Sequence[int], answer: Sequence[int]) -> bool:
    """Whether ``answer`` is a full valid grid that keeps every given of ``puzzle``."""
    if len(answer) != CELLS or any(not 1 <= d <= 9 for d in answer):
        return False
    if any(p and p != a for p, a in zip(puzzle, answer)):
        return False
    return all(len({answer[i] for i in unit}) == 9 for unit in UNITS)


def conflicts(answer: Sequence[int]) -> dict:
    """Rows, columns and boxes whose digits are not all different."""
    names = ("rows", "columns", "boxes")
    return {name: sum(len({answer[i] for i in unit}) != 9 for unit in UNITS[k * 9:(k + 1) * 9])
            for k, name in enumerate(names)}


# ---------------------------------------------------------------- text

def parse(text: str) -> Grid:
    """81 cells in row order: digits 1-9, ``0`` or ``.`` for a blank; spaces and newlines ignored."""
    cells = [ch for ch in text if not ch.isspace()]
    bad = sorted({ch for ch in cells if ch not in "0123456789."})
    if bad:
        raise PuzzleError(f"a Sudoku puzzle holds digits 1-9 and 0 or . for blanks, not {''.join(bad)!r}")
    if len(cells) != CELLS:
        raise PuzzleError(f"a Sudoku puzzle has 81 cells, this has {len(cells)}")
    return tuple(0 if ch == "." else int(ch) for ch in cells)


def format_grid(grid: Sequence[int]) -> str:
    """9 lines of 9 digits (0 for a blank), no final newline."""
    return "\n".join("".join(str(d) for d in grid[r * 9:(r + 1) * 9]) for r in range(9))


def read_answer(text: str) -> Optional[Grid]:
    """The first 81 digits of a model's answer, or None if it has fewer."""
    digits = [int(ch) for ch in text if ch.isdigit()]
    return tuple(digits[:CELLS]) if len(digits) >= CELLS else None


# ---------------------------------------------------------------- data sets

def parse_givens(text: str) -> Tuple[int, int]:
    """``45-50`` (or one number) as an inclusive range of givens."""
    low, _, high = text.partition("-")
    try:
        givens = (int(low), int(high or low))
    except ValueError:
        raise ValueError(f"--givens takes a range such as 45-50, not {text!r}") from None
    if not 17 <= givens[0] <= givens[1] <= CELLS:
        raise ValueError(f"--givens must lie within 17-81, low first; got {text!r}")
    return givens



@dataclass(frozen=True)
class Puzzle:
    puzzle: Grid
    solution: Grid

    @property
    def givens(self) -> int:
        return sum(1 for d in self.puzzle if d)

    def record(self) -> dict:
        """One line of fine-tuning data: the puzzle as the prompt, the solution as the completion."""
        return {"prompt": format_grid(self.puzzle), "completion": format_grid(self.solution)}


def puzzles(seed: int, count: int, givens: Tuple[int, int]) -> Iterator[Puzzle]:
    """``count`` puzzles from ``seed``, each with a number of givens drawn
    uniformly from the inclusive range ``givens``; the same seed gives the same puzzles."""
    low, high = givens
    rng = random.Random(seed)
    for _ in range(count):
        puzzle, solution = make_puzzle(rng, rng.randint(low, high))
        yield Puzzle(puzzle, solution)


def write_jsonl(path: Path, items: Sequence[Puzzle]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for item in items:
            f.write(json.dumps(item.record()) + "\n")


def read_jsonl(path: Path) -> List[Puzzle]:
    out = []
    with open(path) as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                out.append(Puzzle(parse(record["prompt"]), parse(record["completion"])))
    return out


def write_dataset(out: Path, seed: int, train: int, valid: int, test: int, givens: Tuple[int, int]) -> dict:
    """``train.jsonl``, ``valid.jsonl`` and ``test.jsonl`` under ``out`` (the
    layout ``mlxdg lora --data`` reads), each split from its own seed
    (``seed``, ``seed + 1``, ``seed + 2``) so that growing one split leaves the
    others as they were. Returns what was written."""
    sizes = {"train": train, "valid": valid, "test": test}
    for k, (name, count) in enumerate(sizes.items()):
        write_jsonl(Path(out) / f"{name}.jsonl", list(puzzles(seed + k, count, givens)))
    return {"seed": seed, "givens": list(givens), **sizes}


def warn_if_unsolved(puzzle: Sequence[int], text: str) -> bool:
    """Say on stderr when a model's answer is not a solution of ``puzzle``; whether it is one."""
    import sys

    answer = read_answer(text)
    if answer is not None and is_solution(puzzle, answer):
        return True
    if answer is None:
        why = "it has fewer than 81 digits"
    else:
        broken = sum(1 for p, a in zip(puzzle, answer) if p and p != a)
        found = conflicts(answer)
        why = (f"{found['rows']} rows, {found['columns']} columns and {found['boxes']} boxes repeat a digit, "
               f"{broken} givens changed")
    sys.stderr.write(f"mlxdg: the answer is not a solution ({why}); try another --seed\n")
    return False
