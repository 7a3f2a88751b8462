"""How often the fast path commits what the reference path commits, on the tiny checkpoints.

    python tests/fast_path_agreement.py [--json out.json]

A measurement, not a test (no trained model exists to judge quality by). For
each checkpoint, prompt and seed, the share of committed tokens (argmax of
each block) that agree position by position between:

* exact vs fast with the same draws: the fast path fed the reference path's
  categorical proposals (a noise source without ``uniform``), so only the
  top-K self-conditioning differs;
* exact vs fast with its own draws: the fast path as it runs (inverse-CDF
  proposals from uniforms), so the random numbers differ too;
* exact vs exact with another seed: what different random numbers alone do,
  the floor the second comparison is to be read against.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import mlx_diffgemma  # noqa: F401  (before MLX: it chooses MLX's BLAS)

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from tiny_checkpoints import write_checkpoint  # noqa: E402

from mlx_diffgemma import batch_generate, load  # noqa: E402
from mlx_diffgemma.sampler import MLXNoise  # noqa: E402

CHECKPOINTS = (("two_layer", 0.3), ("four_layer", 0.2), ("two_layer", None), ("four_layer", None))
SAMPLER = dict(max_new_tokens=24, max_denoising_steps=8, eos_token_id=[])


class CategoricalOnly:
    """MLX's draws without ``uniform``: the fast path then proposes from them as the reference path does."""

    def __init__(self, seed):
        self.noise = MLXNoise(seed)

    def canvas(self, *args, **kwargs):
        return self.noise.canvas(*args, **kwargs)

    def proposal(self, *args, **kwargs):
        return self.noise.proposal(*args, **kwargs)


def agreement(a, b) -> float:
    a, b = np.array(a), np.array(b)
    return float((a == b).mean())


def measure(top_ks=(4, 8, 32), seeds=range(4), prompts=3) -> list:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for config, damping in CHECKPOINTS:
            path = write_checkpoint(Path(tmp) / f"{config}-{damping}", config, "float32", 0, None, damping)
            model, tokenizer = load(path)
            rng = np.random.default_rng(0)
            batch = [rng.integers(3, model.args.vocab_size, 9).tolist() for _ in range(prompts)]
            tokens = lambda noise, **path: batch_generate(model, tokenizer, batch, noise=noise, **path,  # noqa: E731
                                                          **SAMPLER).tokens
            exact = {s: tokens(MLXNoise(s)) for s in seeds}
            floor = np.mean([agreement(exact[s], exact[s + 1]) for s in seeds if s + 1 in exact])
            for k in top_ks:
                same = [agreement(exact[s], tokens(CategoricalOnly(s), exact=False, top_k=k)) for s in seeds]
                own = [agreement(exact[s], tokens(MLXNoise(s), exact=False, top_k=k)) for s in seeds]
                rows.append({"checkpoint": config, "settling": damping, "vocab": model.args.vocab_size, "top_k": k,
                             "same_draws": float(np.mean(same)), "own_draws": float(np.mean(own)),
                             "exact_other_seed": float(floor), "tokens": len(seeds) * prompts * SAMPLER["max_new_tokens"]})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    opts = parser.parse_args()
    rows = measure()
    print("| checkpoint | vocab | K | exact vs fast, same draws | exact vs fast, own draws | exact vs exact, other seed |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        name = r["checkpoint"] + (f" (settling {r['settling']})" if r["settling"] else " (plain random)")
        print(f"| {name} | {r['vocab']} | {r['top_k']} | {r['same_draws']:.1%} | {r['own_draws']:.1%} | "
              f"{r['exact_other_seed']:.1%} |")
    if opts.json:
        Path(opts.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
