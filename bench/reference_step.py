"""transformers' ``diffusion_gemma`` (the reference) at a synthetic shape, for the
side-by-side table's first column: the decoder forward without and with
self-conditioning (logits included) and the commit of one canvas-long block.

    python -m mlx_diffgemma.bench.reference_step [--shape 26b-a4b] [--layers 2] [--rounds 3]

It runs in its own process (a second float32 copy of the weights would not fit
beside ours at the real widths) without our OpenBLAS preload, with torch's
default threads; random weights from transformers' own init, a 128-token
prompt. Needs torch and transformers.
"""

import argparse
import copy
import json
import os
import statistics
import sys
from dataclasses import asdict

from mlx_diffgemma.bench.sidebyside import run_rounds
from mlx_diffgemma.bench.synthetic import synthetic_args
from mlx_diffgemma.sudoku.checkpoint import VISION_CONFIG  # a tiny vision tower; the text model never runs it

# Fields of our ModelArgs that are not entries of the reference's text config.
NOT_TEXT_CONFIG = ("model_type", "canvas_length")


def reference_model(shape: str, layers: int):
    """The reference model at our ``synthetic_args`` shape (a tiny vision tower it never runs)."""
    import torch
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    args = synthetic_args(shape, layers)
    text = {k: v for k, v in asdict(args).items() if k not in NOT_TEXT_CONFIG}
    V = args.vocab_size
    config = DiffusionGemmaConfig(text_config=text, vision_config=VISION_CONFIG, canvas_length=args.canvas_length,
                                  image_token_id=V - 1, boi_token_id=V - 3, eoi_token_id=V - 2)
    torch.manual_seed(0)
    return DiffusionGemmaForBlockDiffusion(config).eval(), args


def measure(shape: str, layers: int, rounds: int, prompt_tokens: int = 128, progress=lambda line: None) -> dict:
    """Seconds of each measurement per round, after one untimed round."""
    import torch
    from transformers import DynamicCache

    model, args = reference_model(shape, layers)
    V, L = args.vocab_size, args.canvas_length
    g = torch.Generator().manual_seed(1)
    prompt, canvas, block = (torch.randint(0, V, (1, n), generator=g) for n in (prompt_tokens, L, L))
    cache = DynamicCache(config=model.config.text_config)
    with torch.no_grad():
        model(input_ids=prompt, cache=cache, decoder_input_ids=canvas)  # the prompt into the cache
        previous = model(cache=cache, decoder_input_ids=canvas).logits

        def commit():
            grown = copy.deepcopy(cache)
            model.model.encoder(input_ids=block, cache=grown)
            assert grown.get_seq_length() == prompt_tokens + L

        times = run_rounds({
            "forward, no self-conditioning": lambda: model(cache=cache, decoder_input_ids=canvas),
            "forward with self-conditioning":
                lambda: model(cache=cache, decoder_input_ids=canvas, self_conditioning_logits=previous),
            "commit (encode one block)": commit,
        }, rounds, progress)
    return {"shape": shape, "layers": layers, "rounds": rounds, "torch_threads": torch.get_num_threads(),
            "seconds": times, "median_seconds": {k: statistics.median(v) for k, v in times.items()}}


def main(argv=None):
    from mlx_diffgemma.blas import OPT_OUT_ENV

    if os.environ.get(OPT_OUT_ENV) != "1":
        # Our OpenBLAS preload slows torch here (it binds torch's BLAS calls too): measure it as a plain
        # torch process runs it, in a fresh interpreter without the preload.
        os.execve(sys.executable, [sys.executable, "-m", __spec__.name, *(sys.argv[1:] if argv is None else argv)],
                  {**os.environ, OPT_OUT_ENV: "1"})
    parser = argparse.ArgumentParser(description="transformers' diffusion_gemma step costs at a synthetic shape.")
    parser.add_argument("--shape", default="26b-a4b")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after one untimed one")
    parser.add_argument("--json", help="also write the per-round seconds here")
    opts = parser.parse_args(argv)
    result = measure(opts.shape, opts.layers, opts.rounds, progress=print)
    for name, seconds in result["median_seconds"].items():
        print(f"transformers {name}: median {seconds:.3f} s")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
