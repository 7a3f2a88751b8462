"""Per-step costs of our engine and mlx-vlm's, side by side in one process, on the same weights.

    python -m mlx_diffgemma.bench.sidebyside [--shape real-2L|small] [--rounds 5] [--json out.json]

Every measurement runs once per round, the rounds one after the other
(A B C ... A B C ...), after one untimed round, so that drift on a shared
machine hits them alike; the report gives medians and each one's ratio to
our bare forward. mlx-vlm's model is built on our very arrays (its parameter
tree has our names and shapes), so both read the same weights and the same
BLAS. Its engine step is the body of ``stream_diffusion_generate``'s loop
with the entropy-bound sampler, composed from its own functions, sampling at
temperature 1 as the reference does (its default 0 would take the argmax).
Nothing here is a test.
"""

import argparse
import json
import statistics
import time
from dataclasses import asdict, replace
from typing import Callable, Dict, List

import mlx_diffgemma  # noqa: F401  (before MLX: it chooses MLX's BLAS)

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from rich.console import Console
from rich.table import Table

from mlx_diffgemma.bench.synthetic import build_diffusion_model, synthetic_args
from mlx_diffgemma.cpu import on_cpu
from mlx_diffgemma.engine import Denoiser, Row
from mlx_diffgemma.sampler import (DEFAULT_SELF_CONDITIONING_TOP_K, MLXNoise, SamplerConfig, empty_history, one_pass,
                                   temperatures)

# The two shapes: the real per-layer widths with 2 of 30 layers, and a small one where per-step
# overhead shows.
SHAPES = {
    "real-2L": synthetic_args("26b-a4b", 2),
    "small": replace(synthetic_args("small", 4), vocab_size=4096, hidden_size=256, intermediate_size=192,
                     moe_intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                     global_head_dim=128, canvas_length=64),
}


BASE = "ours: forward, no self-conditioning"


def mlx_vlm_model(ours):
    """mlx-vlm's DiffusionGemma on ``ours``' arrays (no copy), or None without mlx-vlm."""
    try:
        from mlx_vlm.models.diffusion_gemma import Model, ModelConfig
        from mlx_vlm.models.diffusion_gemma.config import TextConfig
    except ImportError:
        return None
    text = {k: v for k, v in asdict(ours.args).items() if k in TextConfig.__dataclass_fields__}
    theirs = Model(ModelConfig(text_config=TextConfig(**text), vision_config=None,
                               canvas_length=ours.args.canvas_length))
    # The same quantization, module by module, so that the arrays fit.
    quantized = {path: {"group_size": m.group_size, "bits": m.bits, "mode": getattr(m, "mode", "affine")}
                 for path, m in ours.named_modules() if hasattr(m, "scales")}
    if quantized:
        nn.quantize(theirs, class_predicate=lambda path, module: quantized.get(path, False))
    theirs.load_weights(tree_flatten(ours.parameters()))
    mx.clear_cache()  # its own random init, now replaced by our arrays, would stay in MLX's buffer cache
    return theirs


def compare(model, rounds: int, prompt_tokens: int, seed: int, progress=lambda line: None) -> dict:
    """``mlxdg bench --vs mlx-vlm``: every measurement's seconds per round and their medians."""
    theirs = mlx_vlm_model(model)
    times = run_rounds(measurements(model, theirs, prompt_tokens, DEFAULT_SELF_CONDITIONING_TOP_K, seed), rounds,
                       progress)
    return {"rounds": rounds, "seconds": times, "median_seconds": {k: statistics.median(v) for k, v in times.items()}}


def _mlx_vlm_step(theirs, cache, mask, context, config: SamplerConfig, temperature: float):
    """One step of mlx-vlm's entropy-bound loop: returns a function of (canvas, self-conditioning, previous argmax)."""
    from mlx_vlm.generate.diffusion import (_diffusion_entropy_transfer_mask, _diffusion_initialize_canvas,
                                            _diffusion_sample_canvas, _diffusion_stable_and_confident,
                                            _diffusion_token_entropy)

    stopping = {"stability_threshold": config.stability_threshold,
                "confidence_threshold": config.confidence_threshold}

    def step(canvas, self_conditioning, previous_argmax):
        B, L = canvas.shape
        processed = theirs.diffusion_decoder_logits(canvas, cache, self_conditioning, mask) / temperature
        argmax = mx.argmax(processed, axis=-1).astype(canvas.dtype)
        proposal = _diffusion_sample_canvas(processed, canvas.dtype, 1.0)
        entropy = _diffusion_token_entropy(processed)
        next_sc = theirs.diffusion_self_conditioning(processed, context)
        accept = _diffusion_entropy_transfer_mask(entropy, config.entropy_bound)
        accepted = mx.where(accept, proposal, canvas)
        renoised = mx.where(accept, accepted,
                            _diffusion_initialize_canvas(B, L, theirs.config.text_config.vocab_size, canvas.dtype))
        _diffusion_stable_and_confident(argmax, processed, [previous_argmax], stopping)
        mx.eval(renoised, next_sc, argmax)

    return step


def ungrouped(fn: Callable[[], None]) -> Callable[[], None]:
    """``fn`` with the CPU's expert grouping off (every expert through GatherMM)."""
    from mlx_diffgemma import model as model_module

    def run():
        size, model_module.GROUPED_EXPERT_SIZE = model_module.GROUPED_EXPERT_SIZE, float("inf")
        try:
            fn()
        finally:
            model_module.GROUPED_EXPERT_SIZE = size

    return run


def measurements(model, theirs, prompt_tokens: int, top_k: int, seed: int, gathermm: bool = False
                 ) -> Dict[str, Callable[[], None]]:
    args = model.args
    L, V = args.canvas_length, args.vocab_size
    config = SamplerConfig()
    schedule = temperatures(config)
    noise = MLXNoise(seed)
    prompt = mx.random.randint(0, V, (1, prompt_tokens), key=mx.random.key(seed))
    canvas = noise.canvas([0], L, V, block=0, step=0)
    block = mx.random.randint(0, V, (1, L), key=mx.random.key(seed + 1))

    cache, commits = model.make_cache(), model.make_cache()
    model.encode(prompt, cache)
    model.encode(prompt, commits)
    previous = model.denoise(canvas, cache) / float(schedule[0])  # processed logits of a first step
    fast = one_pass(previous * float(schedule[0]), float(schedule[0]), mx.zeros((1, L)), top_k, model.dtype)
    exact_soft = model.soft_embeddings(previous)
    fast_soft = model.top_k_soft_embeddings(fast.top_ids, fast.top_weights)
    # No argmax before this one: a step whose row stopped would skip the next step's self-conditioning.
    history = empty_history(config, 1, L)
    mx.eval(previous, exact_soft, fast_soft, history)
    t = float(schedule[1])

    def forward(soft=None):
        # As the engine computes it: on the CPU the softcap by NumPy (Model.host_logits).
        hidden = model.hidden_states(canvas, cache, soft)
        return model.host_logits(hidden) if on_cpu() else mx.eval(model.logits(hidden))

    def step(soft, **path):
        denoiser = Denoiser(model, config, noise, **path)

        def run():
            out = denoiser.step(cache, canvas, soft, history, [Row(0)], step=2, temperature=t)
            assert not out.stop.any(), "a stopped row's step is not a whole one (no next self-conditioning)"
        return run

    out = {
        "ours: forward, no self-conditioning": forward,
        "ours: forward with self-conditioning": lambda: forward(model.soft_embeddings(previous)),
        "ours: engine step, exact": step(exact_soft),
        f"ours: engine step, fast (top-{top_k})": step(fast_soft, exact=False, top_k=top_k),
        "ours: commit (encode one block)": lambda: model.encode(block, commits),
    }
    if on_cpu():  # what the NumPy softcap saves there
        out["ours: forward, no self-conditioning, MLX softcap"] = \
            lambda: mx.eval(model.logits(model.hidden_states(canvas, cache)))
    if on_cpu() and gathermm:  # what grouping the experts by expert saves there
        out["ours: forward, no self-conditioning, GatherMM experts"] = ungrouped(forward)
        out["ours: commit, GatherMM experts"] = ungrouped(lambda: model.encode(block, commits))
    if theirs is None:
        return out
    prefill = dict(attention_mask=None, pixel_values=None, mm_token_type_ids=None, prefill_step_size=None,
                   chunk_prefill=False)
    their_cache = theirs.diffusion_prefill_cache(prompt, cache=theirs.make_cache(), **prefill)
    their_commits = [theirs.diffusion_prefill_cache(prompt, cache=theirs.make_cache(), **prefill)]
    mx.eval([c.state for c in their_cache + their_commits[0]])
    mask = theirs.diffusion_decoder_masks(canvas, their_cache, None)
    context = theirs.diffusion_prepare_self_conditioning()
    their_step = _mlx_vlm_step(theirs, their_cache, mask, context, config, t)
    their_soft = theirs.diffusion_self_conditioning(previous, context)
    mx.eval(their_soft)

    def their_commit():
        their_commits[0] = theirs.diffusion_update_cache(block, cache=their_commits[0])
        mx.eval([c.state for c in their_commits[0]])

    out.update({
        "mlx-vlm: forward, no self-conditioning":
            lambda: mx.eval(theirs.diffusion_decoder_logits(canvas, their_cache, None, mask)),
        "mlx-vlm: forward with self-conditioning": lambda: mx.eval(theirs.diffusion_decoder_logits(
            canvas, their_cache, theirs.diffusion_self_conditioning(previous, context), mask)),
        "mlx-vlm: engine step": lambda: their_step(canvas, their_soft, fast.argmax.astype(canvas.dtype)),
        "mlx-vlm: commit (encode one block)": their_commit,
    })
    return out


def short_answers(model, prompt_tokens: int, max_tokens: int, steps: int, seed: int) -> Dict[str, Callable[[], None]]:
    """Time to a whole answer of ``max_tokens`` tokens (prefill included), full canvas against
    ``canvas="auto"``, on each path, at ``steps`` fixed steps per block (no early stop, no EOS)."""
    from mlx_diffgemma.bench.engines import SyntheticTokenizer
    from mlx_diffgemma.generate import batch_generate

    prompt = np.random.default_rng(seed).integers(0, model.args.vocab_size, prompt_tokens).tolist()
    fixed = dict(max_tokens=max_tokens, max_denoising_steps=steps, stability_threshold=steps + 1, eos_token_id=(),
                 seed=seed)
    return {f"answer of {max_tokens} tokens, {canvas} canvas, {path} ({steps} steps)":
            (lambda canvas=canvas, exact=path == "exact":
             batch_generate(model, SyntheticTokenizer(), prompt, canvas=canvas, exact=exact, **fixed))
            for path in ("fast", "exact") for canvas in ("full", "auto")}


def run_rounds(work: Dict[str, Callable[[], None]], rounds: int, progress=lambda line: None) -> Dict[str, List[float]]:
    """Seconds of each measurement per round, after one untimed round."""
    times = {name: [] for name in work}
    for r in range(rounds + 1):
        for name, fn in work.items():
            start = time.perf_counter()
            fn()
            if r:
                times[name].append(time.perf_counter() - start)
                progress(f"  {name}: {times[name][-1]:.3f} s")  # each figure as it comes, for a run cut short
            mx.clear_cache()
        progress(f"round {r}/{rounds} done" + (" (warm-up)" if r == 0 else ""))
    return times


def report(shape: str, args, times: Dict[str, List[float]], console: Console) -> None:
    base = statistics.median(times[BASE])
    vlm = times.get("mlx-vlm: engine step")
    table = Table(title=f"{shape}: hidden {args.hidden_size}, {args.num_hidden_layers} layers, vocab "
                        f"{args.vocab_size}, canvas {args.canvas_length}, float32, {mx.default_device()}; medians "
                        f"of {len(next(iter(times.values())))} interleaved rounds", title_justify="left")
    for column in ("", "median s", "min s", "x our bare forward", "mlx-vlm step / this"):
        table.add_column(column, justify="left" if not column else "right")
    for name, values in times.items():
        median = statistics.median(values)
        speedup = f"{statistics.median(vlm) / median:.2f}" if vlm and "engine step" in name else ""
        table.add_row(name, f"{median:.3f}", f"{min(values):.3f}", f"{median / base:.2f}", speedup)
    console.print(table)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Our engine step and mlx-vlm's, side by side, same weights.")
    parser.add_argument("--shape", default="small", choices=sorted(SHAPES))
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds after one untimed one")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=DEFAULT_SELF_CONDITIONING_TOP_K)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--short-answer", type=int, metavar="TOKENS",
                        help="also time a whole answer of this many tokens, full canvas against --canvas auto")
    parser.add_argument("--short-answer-steps", type=int, default=8)
    parser.add_argument("--gathermm", action="store_true",
                        help="also time the forward and commit with the CPU's expert grouping off")
    parser.add_argument("--only", help="comma-separated: time only the rows whose names contain one of these "
                        "(our bare forward, every ratio's base, always)")
    parser.add_argument("--json", help="also write the per-round seconds here")
    opts = parser.parse_args(argv)
    console = Console(width=150)
    args = SHAPES[opts.shape]
    console.print(f"[dim]building {opts.shape} (float32 random weights)[/dim]")
    model = build_diffusion_model(args, dtype=mx.float32, seed=opts.seed)
    theirs = mlx_vlm_model(model)
    if theirs is None:
        console.print("[dim]mlx-vlm is not installed: our rows only[/dim]")
    work = measurements(model, theirs, opts.prompt_tokens, opts.top_k, opts.seed, opts.gathermm)
    if opts.short_answer:
        work.update(short_answers(model, opts.prompt_tokens, opts.short_answer, opts.short_answer_steps, opts.seed))
    if opts.only:
        wanted = [w.strip() for w in opts.only.split(",")]
        work = {name: fn for name, fn in work.items() if name == BASE or any(w in name for w in wanted)}
    times = run_rounds(work, opts.rounds, lambda line: console.print(f"[dim]{line}[/dim]"))
    report(opts.shape, args, times, console)
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"shape": opts.shape, "args": asdict(args), "rounds": opts.rounds, "top_k": opts.top_k,
                       "device": str(mx.default_device()), "seconds": times}, f, indent=2)


if __name__ == "__main__":
    main()
