"""The sampler's pieces on hand-made inputs whose answers are known."""

import json
import math

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_diffgemma.sampler import (
    MLXNoise,
    SamplerConfig,
    acceptance_mask,
    decide,
    empty_history,
    temper,
    temperatures,
)

BOUND = mx.array(0.1)
CONFIDENCE = mx.array(0.5)


def test_schedule_counts_down_and_never_reaches_t_min():
    t = temperatures(SamplerConfig(max_denoising_steps=4, t_min=0.4, t_max=0.8))
    np.testing.assert_allclose(t, [0.8, 0.7, 0.6, 0.5], rtol=1e-6)
    default = temperatures(SamplerConfig())
    assert len(default) == 48 and default[0] == np.float32(0.8)
    assert default[-1] == pytest.approx(0.4 + 0.4 / 48) and np.all(np.diff(default) < 0)


@pytest.mark.parametrize("t_min, t_max, steps", [(0.4, 0.8, 48), (0.1, 0.9, 7), (0.05, 2.0, 33)])
def test_schedule_matches_the_reference_bit_for_bit(t_min, t_max, steps):
    # The reference divides an int32 step tensor by N, so every operation rounds to float32.
    ours = temperatures(SamplerConfig(max_denoising_steps=steps, t_min=t_min, t_max=t_max))
    for i, t in enumerate(range(steps, 0, -1)):
        reference = t_min + (t_max - t_min) * (torch.tensor(t, dtype=torch.int32) / steps)
        assert ours[i] == np.float32(reference.item()), t


def test_temper_divides_and_measures_entropy_in_nats():
    V = 16
    logits = mx.array(np.stack([np.zeros(V), np.eye(V)[3] * 100.0])[None], dtype=mx.float32)
    processed, entropy, argmax = temper(logits, mx.array(0.5))
    np.testing.assert_allclose(np.array(processed), np.array(logits) / 0.5)
    np.testing.assert_allclose(np.array(entropy)[0], [math.log(V), 0.0], atol=1e-5)
    assert np.array(argmax)[0, 1] == 3


def test_temper_entropy_of_two_equal_tokens_is_log_two():
    logits = mx.array([[[5.0, 5.0, -1e4, -1e4]]])
    _, entropy, _ = temper(logits, mx.array(1.0))
    assert float(entropy[0, 0]) == pytest.approx(math.log(2), abs=1e-6)


def mask(entropies, bound):
    return np.array(acceptance_mask(mx.array([entropies], dtype=mx.float32), mx.array(bound)))[0].tolist()


def test_acceptance_keeps_lowest_entropies_within_the_bound():
    # Ascending 0.01, 0.02, 0.05, 0.2, 0.3; the sums before each are 0, 0.01, 0.03, 0.08, 0.28.
    entropies = [0.3, 0.01, 0.05, 0.2, 0.02]
    assert mask(entropies, 0.1) == [False, True, True, True, True]
    assert mask(entropies, 0.05) == [False, True, True, False, True]
    assert mask(entropies, 0.001) == [False, True, False, False, False]


def test_acceptance_always_keeps_the_most_certain_position():
    assert mask([5.0, 3.0, 4.0], 1e-6) == [False, True, False]


def test_acceptance_keeps_everything_under_a_large_bound():
    assert mask([5.0, 3.0, 4.0], 100.0) == [True, True, True]


def run_decide(entropy, argmax, history, bound=BOUND, confidence=CONFIDENCE):
    entropy = mx.array(entropy, dtype=mx.float32)
    B, L = entropy.shape
    proposal = mx.full((B, L), 7, dtype=mx.int32)
    noise = mx.full((B, L), 9, dtype=mx.int32)
    canvas, accepted, stop, history = decide(entropy, mx.array(argmax, dtype=mx.uint32), proposal, noise,
                                             history, bound, confidence)
    return np.array(canvas), np.array(accepted), np.array(stop), history


def test_decide_keeps_proposals_where_accepted_and_renoises_the_rest():
    history = empty_history(SamplerConfig(), 1, 3)
    # Ascending 0.01, 0.1, 0.3: the sums before them are 0, 0.01 and 0.11 against a bound of 0.1.
    canvas, accepted, _, _ = run_decide([[0.3, 0.01, 0.1]], [[1, 2, 3]], history)
    assert canvas.tolist() == [[9, 7, 7]] and accepted.tolist() == [2]


def test_first_step_never_stops_and_a_repeated_confident_argmax_does():
    config = SamplerConfig(stability_threshold=1)
    confident = [[0.01, 0.02, 0.03]]
    *_, stop, history = run_decide(confident, [[1, 2, 3]], empty_history(config, 1, 3))
    assert stop.tolist() == [False]  # nothing to compare with yet
    *_, stop, history = run_decide(confident, [[1, 2, 3]], history)
    assert stop.tolist() == [True]
    *_, stop, _ = run_decide(confident, [[1, 2, 4]], history)
    assert stop.tolist() == [False]  # changed argmax


def test_stable_but_unsure_rows_go_on():
    history = mx.array([[[1, 2, 3], [1, 2, 3]]], dtype=mx.int32)
    entropy = [[0.01, 0.02, 0.03], [0.9, 0.8, 0.7]]  # means 0.02 and 0.8 against a threshold of 0.5
    *_, stop, _ = run_decide(entropy, [[1, 2, 3], [1, 2, 3]], history)
    assert stop.tolist() == [True, False]


def test_stability_threshold_two_needs_two_repeats():
    config = SamplerConfig(stability_threshold=2)
    history = empty_history(config, 1, 2)
    stops = []
    for _ in range(3):
        *_, stop, history = run_decide([[0.0, 0.0]], [[4, 5]], history)
        stops.append(bool(stop[0]))
    assert stops == [False, False, True]
    assert np.array(history).tolist() == [[[4, 5]], [[4, 5]]]


def test_stability_threshold_zero_stops_on_confidence_alone():
    history = empty_history(SamplerConfig(stability_threshold=0), 2, 2)
    *_, stop, history = run_decide([[0.1, 0.1], [0.9, 0.9]], [[1, 2], [3, 4]], history)
    assert stop.tolist() == [True, False] and history.shape == (0, 2, 2)


def test_config_defaults_are_the_references():
    c = SamplerConfig()
    assert (c.max_new_tokens, c.max_denoising_steps, c.entropy_bound, c.t_min, c.t_max,
            c.stability_threshold, c.confidence_threshold) == (256, 48, 0.1, 0.4, 0.8, 1, 0.005)
    assert c.eos_token_id is None and c.pad_token_id is None


def test_config_reads_a_released_generation_config():
    released = {"max_new_tokens": 256, "max_denoising_steps": 48, "t_min": 0.4, "t_max": 0.8,
                "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.25},
                "stability_threshold": 1, "confidence_threshold": 0.005, "eos_token_id": [1, 106, 50],
                "pad_token_id": 0, "bos_token_id": 2, "transformers_version": "5.24.0"}
    c = SamplerConfig.from_dict(released)
    assert c.entropy_bound == 0.25 and c.eos_token_id == (1, 106, 50) and c.pad_token_id == 0


def test_config_treats_nulls_as_missing(tmp_path):
    # What save_pretrained writes for a model built from a config.
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"confidence_threshold": None, "max_denoising_steps": None, "sampler_config": None, "t_max": None}))
    assert SamplerConfig.from_checkpoint(tmp_path) == SamplerConfig()
    assert SamplerConfig.from_checkpoint(tmp_path / "missing") == SamplerConfig()


def test_config_overrides_and_validation():
    c = SamplerConfig().override(max_denoising_steps=5, eos_token_id=7, t_min=None)
    assert SamplerConfig(confidence_threshold=0.0).confidence_threshold == 0.0  # fixed-step runs
    assert c.max_denoising_steps == 5 and c.eos_token_id == (7,) and c.t_min == 0.4
    for bad in [dict(t_min=0.9), dict(max_denoising_steps=0), dict(entropy_bound=-0.1),
                dict(stability_threshold=-1), dict(confidence_threshold=-0.1), dict(max_new_tokens=1.5)]:
        with pytest.raises(ValueError):
            SamplerConfig().override(**bad)
    with pytest.raises(ValueError):
        SamplerConfig.from_dict({"sampler_config": {"_cls_name": "SomethingElse"}})


def test_mlx_noise_is_reproducible_per_seed():
    def draws(seed):
        noise = MLXNoise(seed)
        logits = mx.zeros((2, 4, 50))
        return np.concatenate([np.array(noise.canvas([0, 1], 4, 50, block=0, step=0)),
                               np.array(noise.proposal(logits, [0, 1], block=0, step=1))])

    assert np.array_equal(draws(1), draws(1))
    assert not np.array_equal(draws(1), draws(2))


def test_mlx_noise_proposals_follow_the_logits():
    logits = mx.array(np.where(np.arange(10) == 6, 0.0, -1e4)[None, None].repeat(3, axis=1), dtype=mx.float32)
    assert np.array(MLXNoise(0).proposal(logits, [0], block=0, step=1)).tolist() == [[6, 6, 6]]


def test_constant_temperature_is_both_ends_of_the_schedule():
    from mlx_diffgemma.sampler import constant_temperature

    assert constant_temperature(0.7) == {"t_min": 0.7, "t_max": 0.7}
    assert constant_temperature(None, 0.2, None) == {"t_min": 0.2, "t_max": None}
    with pytest.raises(ValueError, match="^--temp sets both"):
        constant_temperature(0.7, None, 0.9, name="--temp")
    with pytest.raises(ValueError, match="must be above 0"):
        constant_temperature(0.0)
