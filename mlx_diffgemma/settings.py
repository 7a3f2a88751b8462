"""The options ``mlxdg generate`` and ``mlxdg chat`` share, and their checks.

Light on purpose (no MLX, no mlx-lm): ``cli`` builds its options from it, and
``mlxdg --help`` should not wait for the model code to import.
"""

import math
import os
from dataclasses import dataclass
from typing import Optional

import typer

DEFAULT_MODEL = "mlx-community/diffusiongemma-26B-A4B-it-4bit"
MODEL_ENV = "MLXDG_MODEL"

# How quantized matrices are held on MLX's CPU backend (see ``cpu.prepare_weights``).
CPU_DEQUANTIZE_MODES = ("auto", "always", "never")


@dataclass(frozen=True)
class Settings:
    """The options ``generate`` and ``chat`` both take (see ``cli``)."""

    model: Optional[str] = None
    max_tokens: Optional[int] = None
    steps: Optional[int] = None
    entropy_bound: Optional[float] = None
    temp: Optional[float] = None
    t_min: Optional[float] = None
    t_max: Optional[float] = None
    seed: Optional[int] = None
    system: Optional[str] = None
    think: bool = False
    verbose: bool = False
    no_live: bool = False
    cpu_dequantize: str = "auto"
    memory_limit: Optional[str] = None
    exact: bool = True
    sc_top_k: Optional[int] = None
    canvas: str = "full"
    adapter_path: Optional[str] = None
    debug: bool = False

    @property
    def model_ref(self) -> str:
        return self.model or os.environ.get(MODEL_ENV) or DEFAULT_MODEL

    @property
    def path(self) -> dict:
        """The engine's path options, as ``stream_generate`` takes them."""
        return {"exact": self.exact, "top_k": self.sc_top_k, "canvas": self.canvas}

    def sampler_overrides(self) -> dict:
        """The sampler settings these options override; ``--temp`` is both temperatures."""
        from .sampler import constant_temperature

        try:
            temperatures = constant_temperature(self.temp, self.t_min, self.t_max, name="--temp")
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--temp") from None
        return dict(max_new_tokens=self.max_tokens, max_denoising_steps=self.steps,
                    entropy_bound=self.entropy_bound, **temperatures)


def memory_limit_option(value: Optional[str]) -> Optional[str]:
    """Typer callback: a size ``memory.parse_size`` reads, checked at parse time."""
    if value is not None:
        from .memory import parse_size

        try:
            parse_size(value)
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
    return value


# Steps per block the CLI accepts: the checkpoints use up to 48; far more only burns time.
MAX_STEPS = 1024
MAX_SEED = 2**64 - 1  # MLX's seeds are unsigned 64-bit


def finite_option(value: Optional[float]) -> Optional[float]:
    """Typer callback: a temperature or entropy bound, a finite number >= 0."""
    if value is not None and not (0 <= value < math.inf):
        raise typer.BadParameter(f"{value} is not in the range 0 <= x < inf")
    return value


def int_range_option(low: int, high: int):
    """A Typer callback that keeps an integer option within [low, high], saying so."""
    def check(value: Optional[int]) -> Optional[int]:
        if value is not None and not low <= value <= high:
            raise typer.BadParameter(f"{value} is not in the range {low} <= x <= {high}")
        return value
    return check
