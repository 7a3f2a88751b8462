"""Run Google's DiffusionGemma block-diffusion language model with MLX."""

import importlib
import sys
import types

__version__ = "0.1.0"

# Before anything imports MLX: on Linux this is what gives MLX a real BLAS.
from . import blas  # noqa: E402

blas.setup()

# The API, imported on first use: ``mlxdg --help`` need not load mlx-lm and transformers.
_API = {"load": "loader", "generate": "generate", "stream_generate": "generate", "batch_generate": "generate",
        "stream_blocks": "generate"}

__all__ = ["load", "generate", "stream_generate", "batch_generate", "stream_blocks", "__version__"]


class _Package(types.ModuleType):
    def __getattr__(self, name):
        if name not in _API:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
        setattr(self, name, value)
        return value

    def __setattr__(self, name, value):
        # Importing the submodule generate.py sets it here under its name; the
        # package's ``generate`` stays the function, as in mlx-lm.
        if isinstance(value, types.ModuleType) and _API.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
