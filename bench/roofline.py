"""Roofline model: bytes and FLOPs of an autoregressive token, a denoising step
and a block commit, and the crossover step count s* below which block
diffusion decodes faster than autoregression.

Costs: a step's time is bounded by
``max(bytes / bandwidth, flops / throughput)``; an AR token reads the active
weights and the KV cache once; a denoising step reads the non-expert weights,
every expert its 256 canvas rows route to, the embedding twice (LM head and
self-conditioning) and the cache.
"""

from dataclasses import asdict, dataclass

from mlx_diffgemma.model import ModelArgs

LOGIT_BYTES_PER_ELEMENT = 4  # the logits are float32
# A step writes the logits once and reads them back once (sampler, self-conditioning).
LOGIT_PASSES = 2


def expected_distinct_experts(num_experts: int, top_k: int, tokens: int) -> float:
    """Experts hit by ``tokens`` independent tokens routed uniformly to top-k of n:
    each token misses a given expert with probability (n - k) / n."""
    return num_experts * (1 - (1 - top_k / num_experts) ** tokens)


@dataclass(frozen=True)
class ParameterCounts:
    attention: int  # all layers
    dense_mlp: int
    router: int
    expert: int  # one expert of one layer
    embedding: int
    self_conditioning: int
    layers: int
    experts_per_layer: int
    top_k: int

    @classmethod
    def of(cls, args: ModelArgs) -> "ParameterCounts":
        H = args.hidden_size
        attention = sum(H * (2 * shape.q_dims + shape.kv_dims * (2 if shape.has_values else 1))
                        for shape in args.attention_layers())
        L = args.num_hidden_layers
        return cls(
            attention=attention,
            dense_mlp=L * 3 * H * args.intermediate_size,
            router=L * H * args.num_experts,
            expert=3 * H * args.moe_intermediate_size,
            embedding=args.vocab_size * H,
            self_conditioning=3 * H * args.intermediate_size,
            layers=L,
            experts_per_layer=args.num_experts,
            top_k=args.top_k_experts,
        )

    @property
    def non_expert(self) -> int:
        return self.attention + self.dense_mlp + self.router

    @property
    def total(self) -> int:
        return self.non_expert + self.layers * self.experts_per_layer * self.expert + self.embedding + self.self_conditioning

    @property
    def active_per_token(self) -> int:
        """Weights one token touches, the tied LM head included."""
        return self.non_expert + self.layers * self.top_k * self.expert + self.embedding


def kv_read_bytes(args: ModelArgs, kv_tokens: int, dtype_bytes: int = 2) -> int:
    """KV bytes a query reads from the cache after ``kv_tokens`` encoded
    tokens (a sliding layer keeps the last ``window - 1`` of them)."""
    return sum(shape.kv_bytes_per_position(dtype_bytes) * shape.kept_positions(kv_tokens)
               for shape in args.attention_layers())


def attention_flops(args: ModelArgs, queries: int, kv_tokens: int, causal: bool) -> float:
    """Score and value matmuls of ``queries`` new tokens after ``kv_tokens`` cached ones."""
    total = 0.0
    for shape in args.attention_layers():
        keys = shape.kept_positions(kv_tokens) + (queries / 2 if causal else queries)
        total += 2 * 2 * queries * shape.q_dims * keys
    return total


@dataclass(frozen=True)
class Costs:
    bytes: float
    flops: float

    def seconds(self, bandwidth: float, flops_per_second: float) -> float:
        return max(self.bytes / bandwidth, self.flops / flops_per_second)

    def bound(self, bandwidth: float, flops_per_second: float) -> str:
        return "bandwidth" if self.bytes / bandwidth >= self.flops / flops_per_second else "compute"


def ar_token(args: ModelArgs, bits_per_weight: float, kv_tokens: int, kv_dtype_bytes: int = 2) -> Costs:
    p = ParameterCounts.of(args)
    return Costs(
        bytes=p.active_per_token * bits_per_weight / 8 + kv_read_bytes(args, kv_tokens, kv_dtype_bytes),
        flops=2 * p.active_per_token + attention_flops(args, 1, kv_tokens, causal=False),
    )


def denoise_step(args: ModelArgs, bits_per_weight: float, kv_tokens: int, distinct_experts: float = None,
                 kv_dtype_bytes: int = 2) -> Costs:
    p = ParameterCounts.of(args)
    T = args.canvas_length
    if distinct_experts is None:
        distinct_experts = expected_distinct_experts(p.experts_per_layer, p.top_k, T)
    weights = p.non_expert + p.self_conditioning + distinct_experts * p.layers * p.expert + 2 * p.embedding
    logits = LOGIT_PASSES * T * args.vocab_size * LOGIT_BYTES_PER_ELEMENT
    body = p.non_expert + p.self_conditioning + p.layers * p.top_k * p.expert
    return Costs(
        bytes=weights * bits_per_weight / 8 + kv_read_bytes(args, kv_tokens, kv_dtype_bytes) + logits,
        # body, then the LM head and the self-conditioning soft embedding: two [T, V] x [V, H] products
        flops=2 * T * body + 2 * 2 * T * args.vocab_size * args.hidden_size
        + attention_flops(args, T, kv_tokens, causal=False),
    )


def commit(args: ModelArgs, bits_per_weight: float, kv_tokens: int, kv_dtype_bytes: int = 2) -> Costs:
    """Causal encoding of one committed block (no LM head, no self-conditioning)."""
    p = ParameterCounts.of(args)
    T = args.canvas_length
    distinct = expected_distinct_experts(p.experts_per_layer, p.top_k, T)
    weights = p.non_expert + distinct * p.layers * p.expert
    return Costs(
        bytes=weights * bits_per_weight / 8 + kv_read_bytes(args, kv_tokens, kv_dtype_bytes),
        flops=2 * T * (p.non_expert + p.layers * p.top_k * p.expert) + attention_flops(args, T, kv_tokens, causal=True),
    )


def crossover_steps(ar_tokens_per_second: float, step_seconds: float, commit_seconds: float,
                    block: int = 256) -> float:
    """s*: diffusion is faster than AR when a block takes fewer steps than this."""
    return (block / ar_tokens_per_second - commit_seconds) / step_seconds


@dataclass(frozen=True)
class Roofline:
    ar_tokens_per_second: float
    step_ms: float
    step_bound: str
    commit_ms: float
    crossover_steps: float

    def diffusion_tokens_per_second(self, steps: float, block: int = 256) -> float:
        return block / ((steps * self.step_ms + self.commit_ms) / 1e3)

    def to_dict(self) -> dict:
        return asdict(self)


def roofline(args: ModelArgs, bits_per_weight: float, kv_tokens: int, bandwidth: float, flops_per_second: float,
             distinct_experts: float = None) -> Roofline:
    """Bounds on this machine (``bandwidth`` in bytes/s, ``flops_per_second``)."""
    ar = ar_token(args, bits_per_weight, kv_tokens).seconds(bandwidth, flops_per_second)
    step = denoise_step(args, bits_per_weight, kv_tokens, distinct_experts)
    step_s = step.seconds(bandwidth, flops_per_second)
    commit_s = commit(args, bits_per_weight, kv_tokens).seconds(bandwidth, flops_per_second)
    return Roofline(
        ar_tokens_per_second=1 / ar,
        step_ms=step_s * 1e3,
        step_bound=step.bound(bandwidth, flops_per_second),
        commit_ms=commit_s * 1e3,
        crossover_steps=crossover_steps(1 / ar, step_s, commit_s, args.canvas_length),
    )
