import json
import sys
from pathlib import Path

import pytest

# MLX binds its BLAS when it is first imported: mlx_diffgemma comes first so
# that the whole suite runs on OpenBLAS where it is installed.
import mlx_diffgemma  # noqa: F401

sys.path.insert(0, str(Path(__file__).parent))

from tiny_checkpoints import write_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory):
    """``make_checkpoint(config="two_layer", dtype="float32", seed=0, generation_config=None, damping=None)``:
    a tiny Hugging Face checkpoint written by transformers, made once per set of arguments."""
    made = {}

    def make(config="two_layer", dtype="float32", seed=0, generation_config=None, damping=None, **overrides):
        key = json.dumps([config, dtype, seed, generation_config, damping, overrides], sort_keys=True)
        if key not in made:
            out = tmp_path_factory.mktemp(f"{config}_{dtype}") / "checkpoint"
            made[key] = write_checkpoint(out, config, dtype, seed, generation_config, damping, **overrides)
        return made[key]

    return make
