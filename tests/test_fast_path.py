"""The fast path's pieces against the reference path's, on inputs whose answers are known."""

import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_diffgemma.bench.synthetic import build_diffusion_model, synthetic_args
from mlx_diffgemma.sampler import MLXNoise, one_pass, temper, vocabulary_chunk


# one_pass's two implementations: MLX's (Metal, CUDA) and NumPy's (the CPU backend's default).
BOTH_PATHS = pytest.mark.parametrize("host", [False, True], ids=["mlx", "numpy"])


def host_one_pass(host):
    return lambda *args, **kwargs: one_pass(*args, host=host, **kwargs)


def logits(shape, scale=4.0, seed=0):
    return mx.array(np.random.default_rng(seed).normal(size=shape).astype(np.float32) * scale)


def test_vocabulary_chunk_divides_the_vocabulary():
    assert vocabulary_chunk(262144) == 512 and vocabulary_chunk(4096) == 64 and vocabulary_chunk(512) == 16
    for vocab in (1, 7, 1000, 262143, 3 * 2**10):
        chunk = vocabulary_chunk(vocab)
        assert vocab % chunk == 0 and chunk <= max(1, math.isqrt(vocab))


@pytest.mark.parametrize("vocab", [512, 1000, 7])
@pytest.mark.parametrize("temperature", [0.4, 0.8, 1.3])
@BOTH_PATHS
def test_entropy_and_argmax_are_the_reference_paths(vocab, temperature, host):
    x = logits((2, 16, vocab))
    processed, entropy, argmax = temper(x, mx.array(temperature))
    fast = host_one_pass(host)(x, temperature, mx.zeros((2, 16)), top_k=4)
    np.testing.assert_allclose(np.array(fast.entropy), np.array(entropy), atol=1e-5)
    assert np.array_equal(np.array(fast.argmax), np.array(argmax))


@BOTH_PATHS
def test_proposal_is_the_inverse_cdf_of_its_uniform(host):
    x = logits((3, 64, 1000), scale=3.0, seed=1)
    u = mx.array(np.random.default_rng(2).random((3, 64)).astype(np.float32))
    fast = host_one_pass(host)(x, 0.6, u)
    probs = np.exp(np.array(x, dtype=np.float64) / 0.6)
    cdf = np.cumsum(probs, axis=-1)
    cdf /= cdf[..., -1:]
    expected = (cdf <= np.array(u)[..., None]).sum(axis=-1)
    assert np.array_equal(np.array(fast.proposal), expected)


@BOTH_PATHS
def test_proposal_never_picks_an_impossible_token(host):
    x = np.zeros((1, 4, 64), dtype=np.float32)
    x[..., :5] = -1e30  # probability 0 in float32
    u = mx.array([[0.0, 1e-9, 0.5, 0.9999999]])
    proposal = np.array(host_one_pass(host)(mx.array(x), 1.0, u).proposal)[0]
    assert proposal.min() >= 5 and proposal.max() < 64 and proposal[0] == 5


@BOTH_PATHS
def test_proposals_follow_the_tempered_distribution(host):
    V, n = 12, 20000
    base = np.random.default_rng(3).normal(size=V).astype(np.float32) * 2
    x = mx.array(np.broadcast_to(base, (1, n, V)).copy())
    u = MLXNoise(seed=4).uniform(range(1), n, block=0, step=1)
    counts = np.bincount(np.array(host_one_pass(host)(x, 0.7, u).proposal)[0], minlength=V)
    p = np.exp(base / 0.7)
    p /= p.sum()
    sigma = np.sqrt(n * p * (1 - p))
    assert np.all(np.abs(counts - n * p) < 5 * sigma + 1)


@BOTH_PATHS
def test_top_k_are_the_largest_with_their_renormalised_probabilities(host):
    x = logits((2, 8, 4096), seed=5)
    fast = host_one_pass(host)(x, 0.5, mx.zeros((2, 8)), top_k=32, dtype=mx.bfloat16)
    ids = np.sort(np.array(fast.top_ids), axis=-1)
    assert np.array_equal(ids, np.sort(np.argsort(-np.array(x), axis=-1)[..., :32], axis=-1))
    # The reference rounds the processed logits to the embedding dtype before its float32 softmax.
    values = np.array((mx.take_along_axis(x, fast.top_ids.astype(mx.int32), axis=-1) / 0.5)
                      .astype(mx.bfloat16).astype(mx.float32), dtype=np.float64)
    expected = np.exp(values - values.max(-1, keepdims=True))
    np.testing.assert_allclose(np.array(fast.top_weights), expected / expected.sum(-1, keepdims=True), atol=1e-6)


@BOTH_PATHS
def test_top_k_larger_than_the_vocabulary_takes_all_of_it(host):
    fast = host_one_pass(host)(logits((1, 2, 20)), 1.0, mx.zeros((1, 2)), top_k=64)
    assert fast.top_ids.shape == (1, 2, 20)
    assert np.array_equal(np.sort(np.array(fast.top_ids), axis=-1)[0, 0], np.arange(20))


@pytest.fixture(scope="module")
def tiny_model():
    return build_diffusion_model(synthetic_args("tiny"), dtype=mx.float32)


def test_top_k_soft_embeddings_over_the_whole_vocabulary_are_the_reference_ones(tiny_model):
    V = tiny_model.args.vocab_size
    x = logits((2, tiny_model.args.canvas_length, V), scale=2.0, seed=6)
    fast = one_pass(x, 0.8, mx.zeros(x.shape[:2]), top_k=V, dtype=tiny_model.dtype)
    reference = tiny_model.soft_embeddings(x / 0.8)
    got = tiny_model.top_k_soft_embeddings(fast.top_ids, fast.top_weights)
    np.testing.assert_allclose(np.array(got), np.array(reference), atol=1e-5)


def test_top_k_of_the_whole_vocabulary_is_the_reference_self_conditioning_bit_for_bit(tiny_model):
    """K >= vocab (the Sudoku model has 23 tokens, the default K is 32): the fast step's
    self-conditioning is the exact step's, bit for bit; a K below the vocabulary is not."""
    from mlx_diffgemma.cache import BatchedCache
    from mlx_diffgemma.engine import Denoiser, Row
    from mlx_diffgemma.sampler import SamplerConfig, empty_history, temperatures

    V, L = tiny_model.args.vocab_size, tiny_model.args.canvas_length
    config = SamplerConfig()
    cache = tiny_model.make_cache()
    tiny_model.encode(mx.array([[1, 2, 3, 4, 5]]), cache)
    canvas = mx.random.randint(0, V, (1, L), key=mx.random.key(3))

    def soft(exact, top_k):
        denoiser = Denoiser(tiny_model, config, MLXNoise(0), exact=exact, top_k=top_k)
        out = denoiser.step(BatchedCache([cache]), canvas, None, empty_history(config, 1, L), [Row(0)], step=1,
                            temperature=temperatures(config)[0])
        return np.array(out.soft_embeddings)

    reference = soft(True, V)
    assert np.array_equal(soft(False, V), reference) and np.array_equal(soft(False, V + 9), reference)
    assert not np.array_equal(soft(False, 2), reference)


@BOTH_PATHS
def test_one_pass_without_top_k_leaves_it_out(host):
    fast = host_one_pass(host)(logits((1, 3, 64)), 0.7, mx.zeros((1, 3)), top_k=0)
    assert fast.top_ids is None and fast.top_weights is None and fast.argmax.shape == (1, 3)


def test_host_logits_are_the_logits(tiny_model):
    assert tiny_model.args.final_logit_softcapping  # the softcap is what the host computes
    hidden = mx.random.normal((2, 8, tiny_model.args.hidden_size), key=mx.random.key(8)) * 30
    host = tiny_model.host_logits(hidden)
    assert isinstance(host, np.ndarray) and host.dtype == np.float32
    np.testing.assert_allclose(host, np.array(tiny_model.logits(hidden)), rtol=1e-6, atol=1e-5)


def test_a_few_tokens_carry_a_peaked_distribution(tiny_model):
    V = tiny_model.args.vocab_size
    x = logits((1, 8, V), scale=0.5, seed=7)
    x = x + 30.0 * mx.array(np.eye(V, dtype=np.float32)[np.arange(8) * 3])[None]  # one dominant token a position
    reference = np.array(tiny_model.soft_embeddings(x / 0.8))
    few = one_pass(x, 0.8, mx.zeros((1, 8)), top_k=4, dtype=tiny_model.dtype)
    got = np.array(tiny_model.top_k_soft_embeddings(few.top_ids, few.top_weights))
    assert np.abs(got - reference).max() < 1e-3 * np.abs(reference).max()


def test_uniform_draws_are_seeded():
    a = MLXNoise(seed=1).uniform([0, 1], 8, block=0, step=1)
    b = MLXNoise(seed=1).uniform([0, 1], 8, block=0, step=1)
    assert a.shape == (2, 8) and a.dtype == mx.float32 and mx.array_equal(a, b)
    assert float(a.min()) >= 0 and float(a.max()) < 1


def test_experts_grouped_by_expert_give_the_gathered_result(monkeypatch):
    from mlx_diffgemma import model as model_module
    from mlx_diffgemma.model import Experts

    monkeypatch.setattr(model_module, "GROUPED_EXPERT_SIZE", 0)
    grouped_calls = []
    original = Experts._grouped
    monkeypatch.setattr(Experts, "_grouped", lambda self, *a: grouped_calls.append(1) or original(self, *a))
    args = synthetic_args("tiny")
    experts = Experts(args)
    mx.random.seed(0)
    experts.update({name: {"weight": mx.random.normal(getattr(experts, name).weight.shape) * 0.1}
                    for name in ("gate_up_proj", "down_proj")})
    x = mx.random.normal((2, 40, args.hidden_size))
    indices = mx.random.randint(0, args.num_experts, (2, 40, args.top_k_experts)).astype(mx.uint32)
    weights = mx.softmax(mx.random.normal(indices.shape), axis=-1)
    grouped = experts(x, indices, weights)
    assert grouped_calls == [1]
    monkeypatch.setattr(Experts, "_grouped", lambda self, x, indices: None)
    gathered = experts(x, indices, weights)
    np.testing.assert_allclose(np.array(grouped), np.array(gathered), atol=1e-5)


def test_experts_inside_compile_take_the_gathered_path(monkeypatch):
    from mlx_diffgemma import model as model_module
    from mlx_diffgemma.model import Experts

    monkeypatch.setattr(model_module, "GROUPED_EXPERT_SIZE", 0)
    args = synthetic_args("tiny")
    experts = Experts(args)
    x = mx.random.normal((1, 40, args.hidden_size))
    indices = mx.random.randint(0, args.num_experts, (1, 40, args.top_k_experts)).astype(mx.uint32)
    weights = mx.ones(indices.shape) / args.top_k_experts
    compiled = mx.compile(lambda x, i, w: experts(x, i, w))
    np.testing.assert_allclose(np.array(compiled(x, indices, weights)), np.array(experts(x, indices, weights)),
                               atol=1e-5)
