"""Run Google's DiffusionGemma block-diffusion language model with MLX."""

__version__ = "0.1.0"

from .loader import load

__all__ = ["load", "__version__"]
