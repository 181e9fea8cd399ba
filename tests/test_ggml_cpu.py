"""The building blocks of reference/ggml_cpu.py (llama.cpp's CPU rounding) checked against exact arithmetic.

The whole emulation is checked end to end in tests/test_reference.py (it reproduces llama.cpp's
tokens and logits); these pin down the pieces so that a failure there can be located."""

from __future__ import annotations

from fractions import Fraction

import numpy as np

from reference.ggml_cpu import dot_f16_tiny, dot_f16_vec, fma32, quantize_q8, reduce16, v_expf

F32 = np.float32


def _round_to_f32(x: Fraction) -> np.float32:
    """x correctly rounded to float32 (nearest, ties to even), by exact comparison."""
    r = F32(float(x))
    best = None
    for c in (np.nextafter(r, F32(-np.inf)), r, np.nextafter(r, F32(np.inf))):
        d = abs(Fraction(float(c)) - x)
        even = (np.array(c, F32).view(np.int32) & 1) == 0
        if best is None or d < best[0] or (d == best[0] and even):
            best = (d, c)
    return best[1]


def test_fma32_rounds_once_like_hardware_fma():
    rng = np.random.default_rng(0)
    a = rng.standard_normal(3000).astype(F32)
    b = (rng.standard_normal(3000) * np.exp2(rng.integers(-30, 30, 3000))).astype(F32)
    c = (rng.standard_normal(3000) * np.exp2(rng.integers(-40, 40, 3000))).astype(F32)
    # adversarial: c = -round(a*b) leaves only the product's low bits; c at half an ulp of a*b
    # makes a double-rounding midpoint that a plain float64 sum rounds the wrong way
    p32 = (a[:500] * b[:500]).astype(F32)
    c[:500] = -p32
    ulp = np.spacing(np.abs(p32[500 // 2:])).astype(F32)
    c[250:500] = (ulp / 2).astype(F32)
    got = fma32(a, b, c)
    want = np.array([_round_to_f32(Fraction(float(x)) * Fraction(float(y)) + Fraction(float(z)))
                     for x, y, z in zip(a, b, c)], F32)
    assert np.array_equal(got.view(np.int32), want.view(np.int32))


def test_v_expf_is_within_two_ulp_of_exp_and_flushes_like_ggml():
    x = np.linspace(-103.0, 88.0, 200001, dtype=F32)
    got = v_expf(x).astype(np.float64)
    want = np.exp(x.astype(np.float64))
    ok = want > np.finfo(F32).tiny  # ulps are meaningless among subnormals
    ulps = np.abs(got - want)[ok] / np.spacing(want[ok].astype(F32)).astype(np.float64)
    # ggml's comment says 1.45 ulp plus 0.5 of rounding; measured here 2.16 ulp at most (and
    # 0 differences from llama.cpp's own softmax and SwiGLU outputs, bench/ggml_ops_check.py)
    assert ulps.max() <= 2.5, ulps.max()
    assert v_expf(np.array([-np.inf, -200.0, 0.0], F32)).tolist() == [0.0, 0.0, 1.0]
    assert np.isinf(v_expf(np.array([200.0], F32))[0])


def test_q8_quantisation_is_within_half_a_step():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((4, 128)) * 3).astype(F32)
    x[0, :32] = 0.0  # an all-zero block: scale 0, quants 0
    q, d, s = quantize_q8(x)
    assert np.abs(q).max() <= 127 and np.array_equal(q, np.rint(q))
    back = (q * d[..., None]).reshape(4, 128)
    assert np.all(np.abs(back - x) <= d.repeat(32, axis=1) * 0.5 * 1.01 + 1e-6)
    assert np.all(q[0, 0] == 0) and d[0, 0] == 0 and s[0, 0] == 0
    assert np.allclose(s, d * q.sum(-1), rtol=1e-3)  # s is f16(d * sum q) with the unrounded d


def test_f16_dot_products_sum_the_same_terms_in_their_own_order():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((5, 256)).astype(np.float16).astype(F32)
    b = rng.standard_normal((5, 256)).astype(np.float16).astype(F32)
    exact = (a.astype(np.float64) * b).sum(-1)
    for dot in (dot_f16_vec, dot_f16_tiny):
        got = dot(a, b)
        assert np.allclose(got, exact, rtol=0, atol=1e-4), dot.__name__
    assert not np.array_equal(dot_f16_vec(a, b), dot_f16_tiny(a, b))  # the orders do differ
    v = np.arange(16, dtype=F32)[None]
    assert reduce16(v)[0] == 120.0
