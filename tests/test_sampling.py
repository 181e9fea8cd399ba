"""Sampling filters and the sampler."""

from __future__ import annotations

import numpy as np
import pytest

from service.engine.request import SamplingParams
from service.engine.sampling import apply_repeat_penalty, logits_to_probs, sample

LOGITS = np.log(np.array([0.05, 0.4, 0.3, 0.15, 0.1], dtype=np.float64)).astype(np.float32)


def sp(**kw):
    base = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0)
    base.update(kw)
    return SamplingParams(**base)


def test_greedy_is_a_point_mass_on_the_argmax():
    p = logits_to_probs(LOGITS, sp(temperature=0.0))
    assert p[1] == 1.0 and p.sum() == 1.0


def test_temperature_one_reproduces_softmax():
    p = logits_to_probs(LOGITS, sp())
    np.testing.assert_allclose(p, [0.05, 0.4, 0.3, 0.15, 0.1], rtol=1e-6)


def test_temperature_sharpens():
    p = logits_to_probs(LOGITS, sp(temperature=0.5))
    q = np.array([0.05, 0.4, 0.3, 0.15, 0.1]) ** 2
    np.testing.assert_allclose(p, q / q.sum(), rtol=1e-6)


def test_top_k_keeps_the_k_largest():
    p = logits_to_probs(LOGITS, sp(top_k=2))
    np.testing.assert_allclose(p, [0, 0.4 / 0.7, 0.3 / 0.7, 0, 0], rtol=1e-6)


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    p = logits_to_probs(LOGITS, sp(top_p=0.75))  # 0.4 + 0.3 = 0.7 < 0.75 -> also 0.15
    np.testing.assert_allclose(p, np.array([0, 0.4, 0.3, 0.15, 0]) / 0.85, rtol=1e-6)


def test_min_p_drops_tokens_below_a_share_of_the_top():
    p = logits_to_probs(LOGITS, sp(min_p=0.3))  # threshold 0.12
    np.testing.assert_allclose(p, np.array([0, 0.4, 0.3, 0.15, 0]) / 0.85, rtol=1e-6)


def test_repeat_penalty_as_llama_cpp():
    logits = np.array([2.0, -1.0, 0.5], np.float32)
    out = apply_repeat_penalty(logits, [0, 1], 2.0, 64)
    np.testing.assert_allclose(out, [1.0, -2.0, 0.5])
    assert apply_repeat_penalty(logits, [0], 1.0, 64) is logits


def test_seeded_sampling_is_reproducible_and_follows_the_distribution():
    p = logits_to_probs(LOGITS, sp())
    a = [sample(p, np.random.default_rng(7)) for _ in range(3)]
    b = [sample(p, np.random.default_rng(7)) for _ in range(3)]
    assert a == b
    rng = np.random.default_rng(0)
    counts = np.bincount([sample(p, rng) for _ in range(20000)], minlength=5) / 20000
    np.testing.assert_allclose(counts, p, atol=0.015)


@pytest.mark.parametrize("k", [1, 3])
def test_filters_never_return_an_empty_distribution(k):
    logits = np.zeros(100, np.float32)
    p = logits_to_probs(logits, sp(top_k=k, top_p=0.1, min_p=0.9))
    assert p.sum() == pytest.approx(1.0) and (p > 0).sum() >= 1
