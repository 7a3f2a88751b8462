"""Run Google's DiffusionGemma block-diffusion language model with MLX."""

__version__ = "0.1.0"

# Before anything imports MLX: on Linux this is what gives MLX a real BLAS.
from . import blas

blas.setup()

from .generate import batch_generate, generate, stream_blocks, stream_generate  # noqa: E402
from .loader import load  # noqa: E402

__all__ = ["load", "generate", "stream_generate", "batch_generate", "stream_blocks", "__version__"]
