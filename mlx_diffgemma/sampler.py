"""The entropy-bound sampler that DiffusionGemma checkpoints ship with.

Each denoising step divides the logits by a temperature that falls linearly
from ``t_max`` towards ``t_min``, draws a proposal token for every position,
keeps the proposals at the lowest-entropy positions while their entropies,
minus the largest of them, sum to at most ``entropy_bound``, and replaces
every other position with a uniformly random token. A block stops early once
its argmax has not changed for ``stability_threshold`` steps and the mean
entropy is below ``confidence_threshold``; the argmax is what gets committed.
"""

import json
from dataclasses import dataclass, fields, replace
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, Dict, Optional, Protocol, Sequence, Tuple, Union

import mlx.core as mx
import numpy as np

GENERATION_CONFIG_FILE = "generation_config.json"


@dataclass(frozen=True)
class SamplerConfig:
    """Generation settings; ``from_checkpoint`` reads a checkpoint's
    ``generation_config.json``, and the defaults are the reference's own."""

    max_new_tokens: int = 256
    max_denoising_steps: int = 48
    entropy_bound: float = 0.1
    t_min: float = 0.4
    t_max: float = 0.8
    stability_threshold: int = 1
    confidence_threshold: float = 0.005
    eos_token_id: Optional[Tuple[int, ...]] = None
    pad_token_id: Optional[int] = None

    def __post_init__(self):
        if isinstance(self.eos_token_id, int):
            object.__setattr__(self, "eos_token_id", (self.eos_token_id,))
        elif self.eos_token_id is not None:
            object.__setattr__(self, "eos_token_id", tuple(int(i) for i in self.eos_token_id))
        for name in ("max_new_tokens", "max_denoising_steps"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not _is_int(self.stability_threshold) or self.stability_threshold < 0:
            raise ValueError(f"stability_threshold must be an integer >= 0, got {self.stability_threshold!r}")
        # 0 is meaningful for both: only the most certain position is accepted;
        # no block ever stops early (fixed-step runs).
        for name in ("entropy_bound", "confidence_threshold"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        # t_min = t_max is a constant temperature; t_max 0 would divide the logits by 0.
        if not (0 <= self.t_min <= self.t_max and self.t_max > 0):
            raise ValueError(f"need 0 <= t_min <= t_max and t_max > 0, got t_min={self.t_min!r}, t_max={self.t_max!r}")

    @classmethod
    def from_dict(cls, config: Dict[str, Any]) -> "SamplerConfig":
        """Settings from a ``generation_config.json`` dictionary; ``null`` and
        missing entries keep the defaults, keys this sampler does not use are ignored."""
        values = {f.name: config.get(f.name) for f in fields(cls)}
        sampler = config.get("sampler_config") or {}
        if sampler.get("_cls_name", "EntropyBoundSamplerConfig") != "EntropyBoundSamplerConfig":
            raise ValueError(f"unsupported sampler {sampler['_cls_name']!r}")
        values["entropy_bound"] = sampler.get("entropy_bound")
        return cls(**{k: v for k, v in values.items() if v is not None})

    @classmethod
    def from_checkpoint(cls, path) -> "SamplerConfig":
        """Settings from ``path/generation_config.json``; the defaults if there is none."""
        file = Path(path) / GENERATION_CONFIG_FILE
        if not file.is_file():
            return cls()
        try:
            return cls.from_dict(json.loads(file.read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"{file} is not valid JSON ({e})") from None

    def override(self, **overrides) -> "SamplerConfig":
        """A copy with every override that is not ``None`` applied."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


def constant_temperature(temperature: Optional[float], t_min: Optional[float] = None,
                         t_max: Optional[float] = None, *, name: str = "temperature") -> Dict[str, Optional[float]]:
    """``t_min`` and ``t_max`` as overrides, where ``temperature`` (spelled
    ``name`` on the surface that took it) is a constant temperature: both ends
    of the schedule at it. Given beside either end, or not above 0, it is a
    ValueError."""
    if temperature is None:
        return {"t_min": t_min, "t_max": t_max}
    if t_min is not None or t_max is not None:
        raise ValueError(f"{name} sets both t_min and t_max; give it or them")
    if not temperature > 0:
        raise ValueError(f"{name} must be above 0, got {temperature!r}: each step samples from the tempered logits "
                         "(the committed block is their argmax already)")
    return {"t_min": temperature, "t_max": temperature}


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def temperatures(config: SamplerConfig) -> np.ndarray:
    """The temperature of each step, first step first.

    Step ``s`` (1-based) has ``t = N - s + 1`` steps remaining and temperature
    ``t_min + (t_max - t_min) * t / N``. Each operation is rounded to float32,
    as the reference computes it, so the processed logits match it bit for bit.
    """
    N = config.max_denoising_steps
    remaining = np.arange(N, 0, -1, dtype=np.float32)
    fraction = remaining / np.float32(N)
    return np.float32(config.t_min) + np.float32(config.t_max - config.t_min) * fraction


@mx.compile
def temper(logits: mx.array, temperature: mx.array) -> Tuple[mx.array, mx.array, mx.array]:
    """Processed logits, per-position entropy (nats) and argmax for one step."""
    processed = logits / temperature
    logprobs = processed - mx.logsumexp(processed, axis=-1, keepdims=True)
    entropy = -(mx.exp(logprobs) * logprobs).sum(axis=-1)
    return processed, entropy, mx.argmax(processed, axis=-1)


def acceptance_mask(entropy: mx.array, entropy_bound: mx.array) -> mx.array:
    """Positions whose proposals are kept [B, L].

    In ascending order of entropy, position ``k`` is kept while the entropies
    before it sum to at most the bound, so the most certain one always is.
    """
    order = mx.argsort(entropy, axis=-1)
    ascending = mx.take_along_axis(entropy, order, axis=-1)
    keep = (mx.cumsum(ascending, axis=-1) - ascending) <= entropy_bound
    return mx.put_along_axis(mx.zeros_like(keep), order, keep, axis=-1)


@mx.compile
def decide(
    entropy: mx.array,
    argmax: mx.array,
    proposal: mx.array,
    noise: mx.array,
    history: mx.array,
    entropy_bound: mx.array,
    confidence_threshold: mx.array,
) -> Tuple[mx.array, mx.array, mx.array, mx.array]:
    """Everything after the proposal: the next canvas, how many positions were
    accepted, whether each row stops, and the updated argmax history.

    ``history`` [stability_threshold, B, L] holds the previous argmaxes, -1 where
    there is none yet; with ``stability_threshold`` 0 it is empty and every row
    counts as stable.
    """
    accepted = acceptance_mask(entropy, entropy_bound)
    canvas = mx.where(accepted, proposal, noise)
    stable = (history == argmax[None]).all(axis=(0, 2))
    confident = entropy.mean(axis=-1) < confidence_threshold
    history = mx.concatenate([history, argmax[None].astype(history.dtype)])[1:]
    return canvas, accepted.sum(axis=-1), stable & confident, history


# Tokens whose probabilities feed the fast path's self-conditioning input.
DEFAULT_SELF_CONDITIONING_TOP_K = 32


def vocabulary_chunk(vocab_size: int) -> int:
    """The chunk length of the fast path's two-level passes over the vocabulary:
    the power of two nearest below sqrt(vocab) that divides it (512 for 262,144)."""
    chunk = 1 << max(0, (vocab_size.bit_length() - 1) // 2)
    while vocab_size % chunk:
        chunk //= 2
    return chunk


@mx.compile
def _exponentials(logits: mx.array, top: mx.array, inverse_temperature: mx.array) -> Tuple[mx.array, mx.array]:
    # One fused pass: exp of the centred processed logits and its product with them (for the entropy).
    centred = (logits - top) * inverse_temperature
    e = mx.exp(centred)
    return e, e * centred


def _first_reaching(cumulative: mx.array, target: mx.array) -> mx.array:
    """Per row, the first index whose (inclusive) cumulative sum exceeds ``target``,
    so zero-probability entries are never picked; clipped to the last index."""
    count = (cumulative <= target[..., None]).sum(axis=-1)
    return mx.minimum(count, cumulative.shape[-1] - 1).astype(mx.uint32)


def _one_pass(logits, inverse_temperature, uniform, top_k: int, chunk: int, dtype):
    B, L, V = logits.shape
    n = V // chunk
    blocks = logits.reshape(B, L, n, chunk)
    chunk_max = blocks.max(axis=-1)  # [B, L, n]: the centring, the argmax and the top-K all start here
    best = mx.argmax(chunk_max, axis=-1, keepdims=True)
    top = mx.take_along_axis(chunk_max, best, axis=-1)  # [B, L, 1]
    within = mx.argmax(mx.take_along_axis(blocks, best[..., None], axis=2).squeeze(2), axis=-1)
    argmax = best.squeeze(-1).astype(mx.uint32) * chunk + within.astype(mx.uint32)

    e, ez = _exponentials(blocks, top[..., None], inverse_temperature)
    chunk_sum = e.sum(axis=-1)
    total = chunk_sum.sum(axis=-1)
    entropy = mx.log(total) - ez.sum(axis=(-2, -1)) / total

    # Inverse CDF in two levels: the chunk the uniform falls in, then the token inside it.
    target = uniform * total
    cumulative = mx.cumsum(chunk_sum, axis=-1)
    j = _first_reaching(cumulative, target)
    before = mx.take_along_axis(cumulative - chunk_sum, j[..., None], axis=-1).squeeze(-1)
    inside = mx.take_along_axis(e, j[..., None, None], axis=2).squeeze(2)
    k = _first_reaching(before[..., None] + mx.cumsum(inside, axis=-1), target)
    proposal = j * chunk + k
    if not top_k:
        return entropy, argmax, proposal

    # The K largest logits lie in the K chunks with the largest maxima.
    kc = min(top_k, n)
    chunks = mx.argpartition(-chunk_max, kth=kc - 1, axis=-1)[..., :kc]
    candidates = mx.take_along_axis(blocks, chunks[..., None], axis=2).reshape(B, L, kc * chunk)
    pick = mx.argpartition(-candidates, kth=top_k - 1, axis=-1)[..., :top_k]
    ids = (chunks[..., None].astype(mx.uint32) * chunk + mx.arange(chunk, dtype=mx.uint32)).reshape(B, L, -1)
    ids = mx.take_along_axis(ids, pick, axis=-1)
    # As the reference's self-conditioning: processed logits rounded to the embedding dtype, fp32 softmax.
    values = (mx.take_along_axis(candidates, pick, axis=-1) * inverse_temperature).astype(dtype)
    weights = mx.softmax(values.astype(mx.float32), axis=-1)
    return entropy, argmax, proposal, ids, weights


# Rows of logits the host path reads at a time: a few MB, so each row's passes run in cache.
HOST_BLOCK_BYTES = 1 << 20


def _one_pass_host(x: np.ndarray, inverse_temperature: np.float32, uniform: np.ndarray, top_k: int, chunk: int):
    """``_one_pass`` in NumPy over ``x`` [N, V] and ``uniform`` [N]; the top K's
    logits rather than their weights. The same arithmetic, a few rows at a time."""
    N, V = x.shape
    n = V // chunk
    entropy = np.empty(N, np.float32)
    argmax = np.empty(N, np.uint32)
    proposal = np.empty(N, np.uint32)
    top_ids = np.empty((N, top_k), np.uint32)
    top_logits = np.empty((N, top_k), np.float32)
    R = max(1, min(N, HOST_BLOCK_BYTES // (4 * V)))
    # Working buffers reused block after block: fresh ones would page-fault on every block.
    centred_buffer, e_buffer = np.empty((R, V), np.float32), np.empty((R, V), np.float32)
    for start in range(0, N, R):
        rows = x[start : start + R]
        r, at = len(rows), slice(start, start + len(rows))
        every = np.arange(r)
        blocks = rows.reshape(r, n, chunk)
        chunk_max = blocks.max(axis=-1)
        best = chunk_max.argmax(axis=-1)
        argmax[at] = best * chunk + blocks[every, best].argmax(axis=-1)
        centred = np.subtract(rows, chunk_max[every, best][:, None], out=centred_buffer[:r])
        centred *= inverse_temperature
        e = np.exp(centred, out=e_buffer[:r])
        chunk_sum = e.reshape(r, n, chunk).sum(axis=-1)
        total = chunk_sum.sum(axis=-1)
        entropy[at] = np.log(total) - np.einsum("ij,ij->i", e, centred) / total

        target = uniform[at] * total
        cumulative = np.cumsum(chunk_sum, axis=-1)
        j = np.minimum((cumulative <= target[:, None]).sum(axis=-1), n - 1)
        before = cumulative[every, j] - chunk_sum[every, j]
        inside = before[:, None] + np.cumsum(e.reshape(r, n, chunk)[every, j], axis=-1)
        proposal[at] = j * chunk + np.minimum((inside <= target[:, None]).sum(axis=-1), chunk - 1)
        if not top_k:
            continue
        kc = min(top_k, n)
        chunks = np.argpartition(-chunk_max, kc - 1, axis=-1)[:, :kc]
        candidates = blocks[every[:, None], chunks].reshape(r, kc * chunk)
        pick = np.argpartition(-candidates, top_k - 1, axis=-1)[:, :top_k]
        ids = (chunks[..., None] * chunk + np.arange(chunk)).reshape(r, -1)
        top_ids[at] = np.take_along_axis(ids, pick, axis=-1)
        top_logits[at] = np.take_along_axis(candidates, pick, axis=-1)
    return entropy, argmax, proposal, top_ids, top_logits


@lru_cache(maxsize=None)
def _compiled_one_pass(top_k: int, chunk: int, dtype: mx.Dtype):
    return mx.compile(partial(_one_pass, top_k=top_k, chunk=chunk, dtype=dtype))


@dataclass(frozen=True)
class OnePass:
    """What the fast path needs from one step's logits [B, L, V]."""

    entropy: mx.array  # [B, L] nats of softmax(logits / temperature)
    argmax: mx.array  # [B, L]
    proposal: mx.array  # [B, L] drawn from softmax(logits / temperature) by the uniforms
    top_ids: Optional[mx.array] = None  # [B, L, K] the K most likely tokens (in no order); None for K = 0
    top_weights: Optional[mx.array] = None  # [B, L, K] their probabilities renormalised over the K


def one_pass(logits: Union[mx.array, np.ndarray], temperature: float, uniform: mx.array,
             top_k: int = DEFAULT_SELF_CONDITIONING_TOP_K, dtype: mx.Dtype = mx.float32,
             host: Optional[bool] = None) -> OnePass:
    """The fast path's sampler in one compiled graph over the logits: tempering,
    log-normaliser, entropy, argmax, the proposal and the top-K self-conditioning
    weights, without a second softmax, without materialising the processed
    logits and without a host round trip.

    The vocabulary is read in chunks (``vocabulary_chunk``): the per-chunk maxima
    give the centring, the argmax and the candidates for the top K; one fused
    exponential pass gives the normaliser and the entropy; the proposal is an
    inverse-CDF draw of one ``uniform`` [B, L] per position, chunk first, then
    token, which samples the same distribution as the reference's categorical
    draw from far fewer random numbers (one per position, not one per token).
    ``dtype`` is the embedding dtype the reference rounds the self-conditioning
    logits to. ``top_k`` 0 skips the top K (a caller that takes the whole
    vocabulary's self-conditioning instead); above the vocabulary it is clipped to it.

    ``host`` (by default: on the CPU backend, or when ``logits`` is a NumPy
    array, as ``Model.host_logits`` gives it) runs the same arithmetic in NumPy,
    whose exp is vectorised where MLX's CPU exp is not: over 256 x 262,144
    logits 0.2 s instead of 1.4 s on a Xeon. It evaluates its inputs.
    """
    V = logits.shape[-1]
    top_k, chunk = min(top_k, V), vocabulary_chunk(V)
    inverse = 1.0 / float(temperature)
    if host or (host is None and (isinstance(logits, np.ndarray) or mx.default_device().type == mx.cpu)):
        uniform = uniform.astype(mx.float32)
        mx.eval(uniform, *(() if isinstance(logits, np.ndarray) else (logits,)))
        x = np.asarray(logits)
        entropy, argmax, proposal, ids, top = _one_pass_host(x.reshape(-1, V), np.float32(inverse),
                                                             np.asarray(uniform).reshape(-1), top_k, chunk)
        shape = x.shape[:-1]
        out = [mx.array(a.reshape(shape)) for a in (entropy, argmax, proposal)]
        if not top_k:
            return OnePass(*out)
        # The top K's weights as ``_one_pass`` computes them, from their logits.
        values = (mx.array(top.reshape(*shape, top_k)) * mx.array(inverse, dtype=mx.float32)).astype(dtype)
        return OnePass(*out, mx.array(ids.reshape(*shape, top_k)), mx.softmax(values.astype(mx.float32), axis=-1))
    run = _compiled_one_pass(top_k, chunk, dtype)
    return OnePass(*run(logits, mx.array(inverse, dtype=mx.float32), uniform.astype(mx.float32)))


def empty_history(config: SamplerConfig, batch: int, length: int) -> mx.array:
    return mx.full((config.stability_threshold, batch, length), -1, dtype=mx.int32)


class NoiseSource(Protocol):
    """Every random draw of generation goes through one of these.

    ``rows`` are the batch rows (indices into the original batch) the draw is
    for; rows that finished are not asked for. ``block`` counts committed
    blocks from 0. ``step`` 0 is the block's initial canvas, step ``s >= 1``
    the proposal of denoising step ``s`` and the renoising that follows it.
    Per block the calls come in the reference's order: ``canvas`` at step 0,
    then ``proposal`` and ``canvas`` at each step.
    """

    def canvas(self, rows: Sequence[int], length: int, vocab_size: int, *, block: int, step: int) -> mx.array:
        """Token ids [len(rows), length], uniform over the whole vocabulary."""

    def proposal(self, logits: mx.array, rows: Sequence[int], *, block: int, step: int) -> mx.array:
        """One token id per position [len(rows), length], drawn from softmax(logits)."""

    # The fast path (``one_pass``) draws its proposals from this instead of
    # ``proposal``; a source without it gets ``proposal`` on the fast path too.
    def uniform(self, rows: Sequence[int], length: int, *, block: int, step: int) -> mx.array:
        """One float32 in [0, 1) per position [len(rows), length]."""


class MLXNoise:
    """MLX's random numbers: a private key chain from ``seed``, or MLX's global
    generator (``mx.random.seed``) when ``seed`` is None."""

    def __init__(self, seed: Optional[int] = None):
        self._key = None if seed is None else mx.random.key(seed)

    def _next_key(self) -> Optional[mx.array]:
        if self._key is None:
            return None
        self._key, key = mx.random.split(self._key)
        return key

    def canvas(self, rows, length, vocab_size, *, block, step):
        return mx.random.randint(0, vocab_size, (len(rows), length), key=self._next_key())

    def proposal(self, logits, rows, *, block, step):
        return mx.random.categorical(logits, key=self._next_key())

    def uniform(self, rows, length, *, block, step):
        return mx.random.uniform(shape=(len(rows), length), key=self._next_key())
