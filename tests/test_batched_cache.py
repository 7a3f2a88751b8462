"""Several prompts of different lengths in one batch give each row exactly what
it gets alone: padding never changes a result."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_diffgemma.cache import BatchedCache
from mlx_diffgemma.loader import load_model

LENGTHS = [3, 11, 7]  # shorter and longer than the sliding window


@pytest.fixture(scope="module")
def model(make_checkpoint):
    return load_model(make_checkpoint("four_layer"))[0]


def test_padded_batch_matches_rows_alone(model):
    rng = np.random.default_rng(0)
    V, L = model.args.vocab_size, model.args.canvas_length
    prompts = [rng.integers(0, V, (1, n)) for n in LENGTHS]
    canvas = mx.array(rng.integers(0, V, (len(LENGTHS), L)))
    block = mx.array(rng.integers(0, V, (len(LENGTHS), L)))
    processed = mx.array(rng.normal(size=(len(LENGTHS), L, V)).astype(np.float32))

    alone = []
    for row, prompt in enumerate(prompts):
        cache = model.make_cache()
        model.encode(mx.array(prompt), cache)
        first = model.denoise(canvas[row : row + 1], cache)
        second = model.denoise(canvas[row : row + 1], cache, processed[row : row + 1])
        model.encode(block[row : row + 1], cache)
        after_commit = model.denoise(canvas[row : row + 1], cache)
        alone.append([np.array(a[0]) for a in (first, second, after_commit)])

    rows = []
    for prompt in prompts:
        cache = model.make_cache()
        model.encode(mx.array(prompt), cache)
        rows.append(cache)
    caches = BatchedCache(rows)
    assert caches.valid[1] is not None  # the full layer really is padded
    first = model.denoise(canvas, caches)
    second = model.denoise(canvas, caches, processed)
    model.encode(block, caches)  # commit: each row appends its own block
    assert [r[0].offset for r in rows] == [n + L for n in LENGTHS]
    after_commit = model.denoise(canvas, BatchedCache(rows))

    for row in range(len(LENGTHS)):
        for stage, ours in enumerate((first, second, after_commit)):
            np.testing.assert_allclose(np.array(ours[row]), alone[row][stage], rtol=0, atol=2e-5,
                                       err_msg=f"row {row}, stage {stage}")


def test_single_row_context_is_the_plain_cache(model):
    rng = np.random.default_rng(1)
    cache = model.make_cache()
    model.encode(mx.array(rng.integers(0, 100, (1, 9))), cache)
    canvas = mx.array(rng.integers(0, 100, (1, model.args.canvas_length)))
    caches = BatchedCache([cache])
    assert all(v is None for v in caches.valid)
    np.testing.assert_array_equal(np.array(model.denoise(canvas, caches)), np.array(model.denoise(canvas, cache)))
