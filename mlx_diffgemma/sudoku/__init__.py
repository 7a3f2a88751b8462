"""Sudoku by block diffusion: seeded puzzles, the packaged model that solves
them, and what ``mlxdg generate`` and ``mlxdg bench --task sudoku`` need of them.

Nothing here imports MLX or torch, so resolving the built-in name stays cheap.
"""

from pathlib import Path

# The packaged checkpoint, which ``--model sudoku`` names.
MODEL_DIR = Path(__file__).parent / "model"
BUILTIN_MODELS = {"sudoku": MODEL_DIR}
# The config.json entry that marks a checkpoint as a Sudoku solver: its prompt is a puzzle.
TASK_KEY, TASK = "mlxdg_task", "sudoku"


def is_sudoku(config: dict) -> bool:
    return config.get(TASK_KEY) == TASK
