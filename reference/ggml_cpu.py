"""llama.cpp's CPU arithmetic, rounding step by rounding step, as a NumPy backend.

`GgmlCpuBackend` runs OUR graph (compute/llama.py, unchanged) with each op computed the way
ggml's CPU backend computes it in the llama.cpp that llama-cpp-python 0.3.36 vendors (ggml
0.25.3), built for this machine (x86-64, AVX-512, GCC 12, -march=native). It exists to answer
one question: when our tokens part from llama.cpp's, is the graph wrong, or is it only that
llama.cpp rounds differently? With the rounding emulated the two must agree exactly.

What ggml does that the NumPy backend does not (file and function in ggml/src/ggml-cpu):
  - quantised matmuls (arch/x86/quants.c): the activation row is first quantised to Q8_1
    (Q4_1 weights) or Q8_0 (Q8_0 weights) in blocks of 32, scale d = amax/127 stored as f16,
    q = round-half-even(x * 127/amax), and for Q8_1 s = f16(d * sum q); the dot product is
    per block an exact integer sum of 4 products per lane (8 lanes), accumulated with one FMA
    per block and lane, then summed across lanes (hsum_float_8), plus, for Q4_1, a scalar sum
    of m*s over the blocks. ggml_vec_dot_q4_1_q8_1, ggml_vec_dot_q8_0_q8_0.
  - attention (ops.cpp, vec.cpp, llamafile/sgemm.cpp; flash attention off, the f16 KV cache):
    q and the softmax probabilities are rounded to f16 before their matmuls with K and V; a
    matmul with one row uses ggml_vec_dot_f16 (4 accumulators of 16 f32 lanes), one with two
    rows or more uses llamafile's tinyBLAS (16 lanes, one FMA chain); the softmax takes exp
    from ggml_v_expf (a polynomial) and sums in double per 16 lanes.
  - rms_norm sums x*x in double, in order; SwiGLU uses ggml_v_expf; RoPE builds its angles
    by repeated float multiplication with libm's cosf/sinf.
Which path a matmul takes depends, as in llama.cpp, on the number of rows of the decode
call. The reference tokens (tests/data/llama_reference.json) come from the prompt in one
call and then one token per call; decode the same way to reproduce them.

This is test support, not a product backend: it is slow (about a second per token), and it
is exact only for the x86 AVX-512 build it describes. Only the tensor types of the packaged
model (Q4_1, Q8_0, F32 norms) are emulated; anything else is refused.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math

import gguf
import numpy as np

from compute.numpy_backend import NumpyBackend

F32, F64 = np.float32, np.float64
_libm = ctypes.CDLL(ctypes.util.find_library("m"))
for _f in ("cosf", "sinf", "powf"):
    getattr(_libm, _f).restype = ctypes.c_float
_libm.cosf.argtypes = _libm.sinf.argtypes = [ctypes.c_float]
_libm.powf.argtypes = [ctypes.c_float, ctypes.c_float]


# ---- exact single-precision building blocks ----

def fma32(a, b, c) -> np.ndarray:
    """float32 fused multiply-add, rounded once (as _mm512_fmadd_ps), for float32 inputs.

    a*b is exact in double (24+24 bits); the double sum is made round-to-odd from its exact
    error (TwoSum), so the final rounding to float32 is the single correct one."""
    p = np.multiply(a, b, dtype=F64)
    c = np.asarray(c, dtype=F64)
    s = p + c
    bb = s - p
    err = (p - (s - bb)) + (c - bb)  # s + err == p + c exactly
    bits = s.view(np.int64)
    fix = (err != 0) & ((bits & 1) == 0)  # inexact and even: step to the odd neighbour toward err
    if fix.any():
        s = np.where(fix, np.nextafter(s, np.where(err > 0, np.inf, -np.inf)), s)
    return s.astype(F32)


def hsum8(v) -> np.ndarray:
    """hsum_float_8 over the last axis (8 lanes): (l0+l4 + l2+l6) + (l1+l5 + l3+l7)."""
    t = v[..., 4:8] + v[..., 0:4]
    return (t[..., 0] + t[..., 2]) + (t[..., 1] + t[..., 3])


def reduce16(v) -> np.ndarray:
    """GCC's _mm512_reduce_add_ps over the last axis (16 lanes)."""
    t = v[..., 8:16] + v[..., 0:8]
    t = t[..., 4:8] + t[..., 0:4]
    return (t[..., 0] + t[..., 2]) + (t[..., 1] + t[..., 3])


def f16(x) -> np.ndarray:
    """Round float32 to f16 (F16C, nearest-even) and back."""
    return np.asarray(x, F32).astype(np.float16).astype(F32)


_C = [F32(float.fromhex(h)) for h in
      ("0x1.8p23", "0x1.715476p+0", "0x1.62e4p-1", "0x1.7f7d1cp-20", "0x1.0e4020p-7", "0x1.573e2ep-5",
       "0x1.555e66p-3", "0x1.fffdb6p-2", "0x1.ffffecp-1")]


def v_expf(x) -> np.ndarray:
    """ggml_v_expf (vec.h, AVX-512 version): exp by range reduction and a degree-5 polynomial."""
    r, l2e, ln2hi, ln2lo, c5, c4, c3, c2, c1 = _C
    x = np.asarray(x, F32)
    with np.errstate(invalid="ignore", over="ignore"):
        z = fma32(x, l2e, r)
        n = z - r
        b = fma32(-n, ln2lo, fma32(-n, ln2hi, x))
        u = b * b
        j = fma32(fma32(fma32(c5, b, c4), u, fma32(c3, b, c2)), u, fma32(c1, b, F32(1)))
        big = np.abs(n) > 192
        res = np.ldexp(j, np.where(big, 0, n).astype(np.int32)).astype(F32)
        alt = np.where(n <= 0, F32(0), F32(np.inf))
    return np.where(big, alt, res).astype(F32)


# ---- activation quantisation (quantize_row_q8_0 / quantize_row_q8_1, AVX2 path) ----

def quantize_q8(x: np.ndarray):
    """x (n, K) -> q (n, nb, 32) integer-valued float32, d (n, nb) f16-rounded scale, s (n, nb) f16 d*sum(q)."""
    n, k = x.shape
    b = x.reshape(n, k // 32, 32).astype(F32)
    amax = np.abs(b).max(axis=-1)
    d = amax / F32(127)
    with np.errstate(divide="ignore"):
        idv = np.where(amax != 0, F32(127) / amax, F32(0)).astype(F32)
    q = np.rint(b * idv[..., None])
    s = f16(d * q.sum(axis=-1, dtype=F32))  # the int32 sum is exact in float32 (|sum| <= 4064)
    return q.astype(F32), f16(d), s


class _QuantWeight:
    """A Q4_1 or Q8_0 matrix as ggml holds it: per block f16 d (and m), the integer quants."""

    def __init__(self, ggml_type, shape, raw):
        out, k = shape
        nb = k // 32
        blk = np.asarray(raw).view(np.uint8).reshape(out, nb, -1)
        self.type = ggml_type
        self.d = blk[..., 0:2].copy().view(np.float16)[..., 0].astype(F32)  # (out, nb)
        if ggml_type == gguf.GGMLQuantizationType.Q4_1:
            self.m = blk[..., 2:4].copy().view(np.float16)[..., 0].astype(F32)
            qs = blk[..., 4:20]
            q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # element j<16: low nibble of byte j
        else:  # Q8_0
            self.m = None
            q = blk[..., 2:34].view(np.int8)
        # (G, 4, out) with G = nb*8 lanes of 4 consecutive elements: the integer dot products as
        # one batched float32 matmul (every partial sum is an integer below 2^24: exact)
        self.q = np.ascontiguousarray(q.astype(F32).reshape(out, nb * 8, 4).transpose(1, 2, 0))
        self.nb = nb


def quant_matmul(x: np.ndarray, w: _QuantWeight) -> np.ndarray:
    """ggml_vec_dot_q4_1_q8_1 / ggml_vec_dot_q8_0_q8_0 for each row of x against each row of w."""
    n = x.shape[0]
    q, dx, sx = quantize_q8(x)
    nb = w.nb
    xy = np.matmul(q.reshape(n, nb * 8, 4).transpose(1, 0, 2), w.q)  # (G, n, out)
    xy = xy.reshape(nb, 8, n, -1)
    acc = np.zeros((8, n, w.q.shape[2]), F32)
    for b in range(nb):
        dd = dx[:, b][:, None] * w.d[:, b][None, :]  # f16*f16: exact in float32
        acc = fma32(dd[None], xy[b], acc)
    out = hsum8(np.moveaxis(acc, 0, -1))
    if w.m is not None:
        summs = np.zeros_like(out)
        for b in range(nb):
            summs = summs + w.m[:, b][None, :] * sx[:, b][:, None]
        out = out + summs
    return out


# ---- f16 dot products of the attention ----

def dot_f16_vec(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """ggml_vec_dot_f16 (AVX-512, one result per call): sum over the last axis of a*b, f16 inputs.

    4 accumulators x 16 f32 lanes, 64 elements per step (element e: accumulator (e//16)%4,
    lane e%16), reduced (acc0+acc2)+(acc1+acc3), then across lanes. Length: a multiple of 64."""
    k = a.shape[-1]
    assert k % 64 == 0, k
    a = a.reshape(a.shape[:-1] + (k // 64, 4, 16))
    b = b.reshape(b.shape[:-1] + (k // 64, 4, 16))
    a, b = np.broadcast_arrays(a, b)
    acc = np.zeros(a.shape[:-3] + (4, 16), F32)
    for it in range(k // 64):
        acc = fma32(a[..., it, :, :], b[..., it, :, :], acc)
    v = (acc[..., 0, :] + acc[..., 2, :]) + (acc[..., 1, :] + acc[..., 3, :])
    return reduce16(v)


def dot_f16_tiny(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """llamafile tinyBLAS<16, __m512> on f16: one FMA chain per lane (element e: lane e%16), then
    _mm512_reduce_add_ps. Length: a multiple of 16."""
    k = a.shape[-1]
    assert k % 16 == 0, k
    a = a.reshape(a.shape[:-1] + (k // 16, 16))
    b = b.reshape(b.shape[:-1] + (k // 16, 16))
    a, b = np.broadcast_arrays(a, b)
    acc = np.zeros(a.shape[:-2] + (16,), F32)
    for it in range(k // 16):
        acc = fma32(a[..., it, :], b[..., it, :], acc)
    return reduce16(acc)


def softmax_row(kq: np.ndarray, scale: float) -> np.ndarray:
    """ggml_compute_forward_soft_max_f32 over the last axis, masked cells given as -inf.

    Length: a multiple of 16 (llama.cpp's n_kv is padded to 256)."""
    w = kq.astype(F32) * F32(scale)
    mx = w.max(axis=-1, keepdims=True)
    e = v_expf(w - mx)
    k = e.shape[-1]
    sums = reduce16(e.reshape(e.shape[:-1] + (k // 16, 16))).astype(F64)  # (..., k//16)
    total = np.zeros(e.shape[:-1], F64)
    for c in range(k // 16):
        total = total + sums[..., c]
    inv = (1.0 / total).astype(F32)
    return e * inv[..., None]


class GgmlCpuBackend(NumpyBackend):
    """The NumPy backend with every op rounded as ggml's x86 AVX-512 CPU backend rounds it."""

    name = "numpy-ggml-cpu"

    def __init__(self, **kw):
        kw.setdefault("row_tile", 1)
        super().__init__(**kw)
        self._quant: dict[int, _QuantWeight] = {}
        self._rows = 0  # rows of the current decode call: picks llama.cpp's matmul path

    def load_weight(self, alloc, ggml_type, shape, raw):
        h = super().load_weight(alloc, ggml_type, shape, raw)
        if len(shape) == 2:
            if ggml_type not in (gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q8_0):
                raise NotImplementedError(f"ggml emulation covers Q4_1 and Q8_0 matrices, not {ggml_type.name}")
            self._quant[id(h)] = _QuantWeight(ggml_type, shape, raw)
        return h

    def rope_tables(self, positions, rope_dim, base, scale):
        """ggml_rope_cache_init: theta = p, then theta *= powf(base, -2/n_dims) per pair; cosf, sinf."""
        assert scale == 1.0, "freq_scale != 1 not emulated"
        theta_scale = _libm.powf(F32(base), F32(-2.0 / rope_dim))
        n, half = len(positions), rope_dim // 2
        cos, sin = np.empty((n, half), F32), np.empty((n, half), F32)
        for r, p in enumerate(positions):
            theta = F32(int(p))
            for i in range(half):
                cos[r, i], sin[r, i] = _libm.cosf(theta), _libm.sinf(theta)
                theta = F32(theta * F32(theta_scale))
        return cos, sin

    def embed(self, table, ids, out):
        self._rows = len(ids)  # the first op of every decode call
        super().embed(table, ids, out)

    def rms_norm(self, x, w, eps, out):
        sq = np.square(x, dtype=F32).astype(F64)
        total = np.cumsum(sq, axis=-1)[:, -1]  # in order, in double
        mean = (total / x.shape[1]).astype(F32)
        scale = F32(1) / np.sqrt(mean + F32(eps))
        np.multiply(x, scale[:, None], out=out)
        np.multiply(out, w, out=out)

    def matmul(self, x, w, out, bias=None, pad=None):
        assert bias is None, "biases not emulated"
        out[...] = quant_matmul(np.asarray(x, F32), self._quant[id(w)])

    def rope(self, x, cos, sin, n_heads, head_dim, rope_dim, neox):
        assert not neox, "NeoX RoPE not emulated"
        n = x.shape[0]
        h = x.reshape(n, n_heads, head_dim)
        c, s = cos[:, None, :], sin[:, None, :]
        a, b = h[..., 0:rope_dim:2].copy(), h[..., 1:rope_dim:2].copy()
        # rotate_pairs: x0*cos - x1*sin and x0*sin + x1*cos, GCC contracting the first product
        h[..., 0:rope_dim:2] = fma32(a, c, -(b * s))
        h[..., 1:rope_dim:2] = fma32(a, s, b * c)

    def attention(self, k_cache, v_cache, layer, q, slots, positions, n_head, n_head_kv, head_dim, out,
                  scale=None, window=0):
        if window:
            raise NotImplementedError("the ggml numerics emulation has no sliding-window attention")
        g = n_head // n_head_kv
        scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
        batched = self._rows >= 2  # llamafile_sgemm declines n < 2: ggml_vec_dot_f16 then
        for i in range(q.shape[0]):
            L = int(positions[i]) + 1
            kv = -(-L // 64) * 64  # zero cells past L change no sum (their probability is 0)
            K = np.zeros((kv, n_head_kv, head_dim), F32)
            V = np.zeros((kv, n_head_kv, head_dim), F32)
            K[:L] = k_cache[layer, slots[i], :L].astype(F32).reshape(L, n_head_kv, head_dim)
            V[:L] = v_cache[layer, slots[i], :L].astype(F32).reshape(L, n_head_kv, head_dim)
            qh = f16(q[i]).reshape(n_head_kv, g, 1, head_dim)
            Kt = K.transpose(1, 0, 2)[:, None]  # (n_head_kv, 1, kv, hd)
            dot = dot_f16_tiny if batched else dot_f16_vec
            kq = dot(qh, Kt)  # (n_head_kv, g, kv)
            kq[..., L:] = -np.inf
            p = f16(softmax_row(kq, scale))  # (n_head_kv, g, kv)
            Vt = V.transpose(1, 2, 0)[:, None]  # (n_head_kv, 1, hd, kv)
            o = dot(p[:, :, None, :], Vt)  # (n_head_kv, g, hd)
            out[i] = o.reshape(-1)

    def swiglu(self, gate, up, out):
        x = np.asarray(gate, F32)
        silu = x / (F32(1) + v_expf(F32(0) - x))
        np.multiply(silu, up, out=out)
