"""``python -m mlx_diffgemma`` runs ``mlxdg``."""

from .cli import app

app(prog_name="mlxdg")
