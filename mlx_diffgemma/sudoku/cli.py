"""``mlxdg sudoku ...``: the Sudoku model's data and checkpoint tools."""

from pathlib import Path
from typing import List

import typer

app = typer.Typer(help="Sudoku puzzles as fine-tuning data, and the Sudoku model's checkpoint.",
                  no_args_is_help=True)


@app.command()
def data(
    out: Path = typer.Argument(..., help="Directory for train.jsonl, valid.jsonl and test.jsonl."),
    train: int = typer.Option(3000, "--train", min=1, help="Training puzzles."),
    valid: int = typer.Option(200, "--valid", min=1, help="Validation puzzles."),
    test: int = typer.Option(200, "--test", min=1, help="Test puzzles."),
    givens: str = typer.Option("36-46", "--givens", help="Givens per puzzle, a range, drawn uniformly."),
    seed: int = typer.Option(0, "--seed", help="Seed of the training split; valid and test use the next two."),
):
    """Write unique-solution puzzles as JSON Lines of {"prompt": puzzle, "completion": solution}, the layout `mlxdg lora --data` reads."""
    from .puzzles import parse_givens, write_dataset

    try:
        given_range = parse_givens(givens)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--givens") from None
    typer.echo(write_dataset(out, seed, train, valid, test, given_range))


@app.command()
def init(
    out: Path = typer.Argument(..., help="Directory to write the checkpoint to."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random init."),
    set_: List[str] = typer.Option([], "--set", metavar="KEY=JSON", help="Override an entry of the text config "
                                   "(an architecture probe), e.g. --set num_hidden_layers=4; repeatable."),
):
    """Write the Sudoku model's architecture from a random init (needs torch and transformers): what `mlxdg lora --fine-tune-type full` starts from."""
    from .checkpoint import parse_overrides, write_init

    try:
        overrides = parse_overrides(set_)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--set") from None
    typer.echo(write_init(out, seed, **overrides))
