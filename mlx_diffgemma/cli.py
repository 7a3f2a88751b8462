"""The ``mlxdg`` command line."""

import typer

from . import __version__

app = typer.Typer(
    name="mlxdg",
    help="Run Google's DiffusionGemma block-diffusion language model with MLX.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def main():
    """Run Google's DiffusionGemma block-diffusion language model with MLX."""


@app.command()
def version():
    """Print the versions of mlx-diffgemma and MLX."""
    import mlx.core as mx

    typer.echo(f"mlx-diffgemma {__version__}, mlx {mx.__version__}")
