"""Batch sweep: what denoising several canvases in one forward pass buys.

A 256-token canvas already touches nearly every expert, so a step reads
nearly the whole model whatever the batch; more canvases per step share that
read. Each batch size runs the same fixed-step workload (adaptive stop and EOS
off, so every row does the same work) and reports total throughput and the
latency each request sees.
"""

import time
from dataclasses import asdict, dataclass
from typing import List, Sequence

import mlx.core as mx
import numpy as np

from mlx_diffgemma.generate import batch_generate
from mlx_diffgemma.memory import generation_plan


@dataclass(frozen=True)
class BatchRecord:
    batch: int
    seconds: float  # the whole batch, prompts included
    generated_tokens: int  # all rows together
    tokens_per_second: float  # generated_tokens / seconds
    request_latency_s: float  # each request waits for its whole batch
    logits_canvases: int  # canvases whose logits the memory planner let exist at once
    peak_memory_gb: float

    def to_dict(self) -> dict:
        return asdict(self)


def batch_sweep(model, tokenizer, batches: Sequence[int], prompt_tokens: int, gen_tokens: int, steps: int,
                seed: int = 0) -> List[BatchRecord]:
    """One warm-up, then each batch size once, largest last (so a slow machine shows the small ones first)."""
    rng = np.random.default_rng(seed)
    vocab = model.args.vocab_size
    fixed = dict(max_new_tokens=gen_tokens, max_denoising_steps=steps, confidence_threshold=0.0,
                 eos_token_id=[], seed=seed)

    def run(batch: int) -> BatchRecord:
        prompts = [rng.integers(3, vocab, prompt_tokens).tolist() for _ in range(batch)]
        _, logits_canvases = generation_plan(model, map(len, prompts), gen_tokens).batch(batch, batch)
        mx.reset_peak_memory()
        start = time.perf_counter()
        result = batch_generate(model, tokenizer, prompts, max_batch=batch, **fixed)
        seconds = time.perf_counter() - start
        tokens = sum(len(t) for t in result.tokens)
        return BatchRecord(batch, seconds, tokens, tokens / seconds, seconds, logits_canvases,
                           mx.get_peak_memory() / 1e9)

    run(1)
    return [run(b) for b in sorted(batches)]


def throughput_gains(records: List[BatchRecord]) -> dict:
    """Total tok/s of each batch size over batch 1's, from the same sweep."""
    single = next(r for r in records if r.batch == 1)
    return {r.batch: r.tokens_per_second / single.tokens_per_second for r in records}
