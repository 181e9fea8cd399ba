"""Every OpenCL op against the NumPy reference backend, and batch invariance.

Each test calls the same op on both backends with the same inputs, on every OpenCL device
present (tests/opencl_runtimes.py: Intel's CPU runtime and PoCL in CI, by name; a runtime
that failed its probe is skipped with the reason; SPECSERVE_OPENCL_DEVICE picks one). Every
test runs under two kernel tunings: the device's own, and "nvidia" (lanes splitting K, tree
reductions in local memory), so the GPU code paths are exercised on a CPU runtime too.

Tolerances (the dot products and sums run in a different order from BLAS / NumPy, and the
dequantisers may fuse a multiply-add that the reference rounds twice):
  matmul, attention, rms_norm: rtol = atol = 1e-4 on outputs of order one (measured: ~4e-7
  relative); embed of quantised tables: rtol = atol = 1e-6; swiglu (exp may differ by an ulp):
  rtol = atol = 1e-5; rope: 1e-6; add, gather, kv store (f32, and f16 rounded to nearest
  even), embed of f32/f16/bf16 tables: exact. Batch invariance and the fused launches
  are checked for exact equality.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

cl = pytest.importorskip("pyopencl")
gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402

from compute.backend import BufferSpec, Proj  # noqa: E402
from compute.numpy_backend import NumpyBackend  # noqa: E402
from compute.opencl.backend import KERNEL_DIR, MAT_ROWS, CLArray, OpenCLBackend, _tile_rows  # noqa: E402
from tests.opencl_runtimes import device_params  # noqa: E402

pytestmark = pytest.mark.opencl
if not device_params():
    pytest.skip("no OpenCL device", allow_module_level=True)


@pytest.fixture(scope="module", params=device_params())
def cl_device(request) -> int:
    """Every OpenCL device present (its index), by runtime name."""
    return request.param

TOL = dict(rtol=1e-4, atol=1e-4)
QK = {T.Q4_0: 32, T.Q4_1: 32, T.Q8_0: 32, T.Q5_0: 32, T.Q5_1: 32, T.Q4_K: 256, T.Q5_K: 256, T.Q6_K: 256,
      T.Q2_K: 256, T.Q3_K: 256, T.F16: 1, T.F32: 1, T.BF16: 1}
NATIVE = [T.Q4_0, T.Q4_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K, T.F16, T.F32]
ON_LOAD = [T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K, T.BF16]


@pytest.fixture(scope="module", params=["native", "nvidia"])
def be(request, cl_device):
    """The backend inside one long `forward` over a planned parameter scratch (the ops stage
    their host parameters there), sized for every test's calls: up to 64 rows, rope_dim 128."""
    be = OpenCLBackend(device=cl_device,
                       tuning=None if request.param == "native" else request.param)
    alloc = param_scratch(be, n_batch=64, n_outputs_max=64, rope_dim=128)
    with be.forward(alloc.array):
        yield be
    be.release(alloc)


def param_scratch(be: OpenCLBackend, n_batch: int, n_outputs_max: int, rope_dim: int):
    """A compute scratch of only the backend's parameter arrays, allocated as the planner's would be."""
    from types import SimpleNamespace

    from compute.llama import layout_nbytes
    lay = be.param_layout(SimpleNamespace(rope_dim=rope_dim, n_swa=0), n_batch, n_outputs_max)
    return be.allocate("test", BufferSpec("target", "compute", "scratch", "device", layout_nbytes(lay)), lay)


@pytest.fixture(scope="module")
def ref():
    return NumpyBackend(row_tile=1)  # one gemv per row: needs no pad scratch


# ---- helpers ----
def dev(be: OpenCLBackend, a: np.ndarray) -> CLArray:
    """A device copy of a host array (test scaffolding; the graph uses planned buffers)."""
    a = np.ascontiguousarray(a)
    buf = cl.Buffer(be.context, cl.mem_flags.READ_WRITE | cl.mem_flags.COPY_HOST_PTR, hostbuf=a)
    return CLArray(buf, 0, a.shape, a.dtype)


def offset_dev(be: OpenCLBackend, a: np.ndarray, pad_rows: int = 3) -> CLArray:
    """Like dev(), but the array starts pad_rows rows into its buffer (offsets are kernel arguments)."""
    a = np.ascontiguousarray(a)
    padded = np.concatenate([np.full((pad_rows,) + a.shape[1:], 7, a.dtype), a])
    buf = cl.Buffer(be.context, cl.mem_flags.READ_WRITE | cl.mem_flags.COPY_HOST_PTR, hostbuf=padded)
    return CLArray(buf, pad_rows * math.prod(a.shape[1:]), a.shape, a.dtype)


def empty(be: OpenCLBackend, shape, dtype=np.float32) -> CLArray:
    return dev(be, np.full(shape, np.nan, dtype))


def host(be: OpenCLBackend, a: CLArray) -> np.ndarray:
    return be.to_host(a, a.shape[0])


def load(backend, ggml_type, shape, raw):
    """A weight loaded the way the factory does it: allocate the planned bytes, then load_weight."""
    spec = BufferSpec("target", "weights", "w", "device", backend.weight_nbytes(ggml_type, shape))
    return backend.load_weight(backend.allocate("test", spec), ggml_type, shape, raw)


def f16_bytes(rng, n, lo, hi):
    return rng.uniform(lo, hi, n).astype(np.float16).view(np.uint8).reshape(n, 2)


def random_raw(rng, ggml_type, shape) -> np.ndarray:
    """File bytes of a random tensor: gguf.quants for the types it quantises, hand-built valid
    blocks (random codes, sane f16 scales) for the K types it cannot."""
    rows, K = math.prod(shape[:-1]), shape[-1]
    if ggml_type == T.F32:
        return rng.standard_normal(shape).astype(np.float32)
    if ggml_type == T.F16:
        return rng.standard_normal(shape).astype(np.float16)
    if ggml_type in (T.Q4_0, T.Q4_1, T.Q8_0, T.Q5_0, T.Q5_1, T.BF16):
        return gguf.quants.quantize(rng.standard_normal(shape).astype(np.float32), ggml_type)
    nb = rows * K // 256
    u8 = lambda k: rng.integers(0, 256, (nb, k), dtype=np.uint8)  # noqa: E731
    if ggml_type == T.Q4_K:  # d, dmin, scales[12], qs[128]
        parts = [f16_bytes(rng, nb, 1e-3, 2e-2), f16_bytes(rng, nb, 1e-3, 2e-2), u8(12), u8(128)]
    elif ggml_type == T.Q5_K:  # d, dmin, scales[12], qh[32], qs[128]
        parts = [f16_bytes(rng, nb, 1e-3, 2e-2), f16_bytes(rng, nb, 1e-3, 2e-2), u8(12), u8(32), u8(128)]
    elif ggml_type == T.Q6_K:  # ql[128], qh[64], scales[16] (int8), d
        parts = [u8(128), u8(64), u8(16), f16_bytes(rng, nb, 1e-4, 2e-3)]
    elif ggml_type == T.Q2_K:  # scales[16], qs[64], d, dmin
        parts = [u8(16), u8(64), f16_bytes(rng, nb, 1e-3, 2e-2), f16_bytes(rng, nb, 1e-3, 2e-2)]
    elif ggml_type == T.Q3_K:  # hmask[32], qs[64], scales[12], d
        parts = [u8(32), u8(64), u8(12), f16_bytes(rng, nb, 1e-3, 2e-2)]
    else:
        raise AssertionError(ggml_type)
    raw = np.concatenate(parts, axis=1)
    assert raw.shape[1] == gguf.GGML_QUANT_SIZES[ggml_type][1]
    return raw.reshape(rows, -1)


def k_for(ggml_type, rng) -> int:
    q = QK[ggml_type]
    if q == 1:
        return int(rng.choice([16, 50, 77, 576]))  # f16/f32: tails below 16 included
    return q * int(rng.integers(1, 4 if q == 256 else 20))


# ---- matmul ----
@pytest.mark.parametrize("ggml_type", NATIVE + ON_LOAD, ids=lambda t: t.name)
def test_matmul_matches_numpy(be, ref, ggml_type):
    rng = np.random.default_rng(int(ggml_type))
    for N, n in [(37, 1), (100, 3), (257, 5), (64, 17)]:
        K = k_for(ggml_type, rng)
        raw = random_raw(rng, ggml_type, (N, K))
        w_cl, w_np = load(be, ggml_type, (N, K), raw), load(ref, ggml_type, (N, K), raw)
        x = (rng.standard_normal((n, K)) / math.sqrt(K)).astype(np.float32)
        scale = float(np.abs(w_np).max()) or 1.0  # outputs of order one
        out = empty(be, (n, N))
        be.matmul(dev(be, x / scale), w_cl, out)
        expect = np.empty((n, N), np.float32)
        ref.matmul(x / scale, w_np, expect)
        np.testing.assert_allclose(host(be, out), expect, **TOL, err_msg=f"N={N} K={K} n={n}")


def test_matmul_bias_and_offsets(be, ref):
    rng = np.random.default_rng(1)
    N, K, n = 45, 96, 6
    raw = random_raw(rng, T.Q8_0, (N, K))
    w_cl, w_np = load(be, T.Q8_0, (N, K), raw), load(ref, T.Q8_0, (N, K), raw)
    x = (rng.standard_normal((n, K)) * 0.05).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    out = offset_dev(be, np.zeros((n, N), np.float32), 2)
    b2 = offset_dev(be, bias[None, :], 1)  # (1, N) one row into its buffer
    be.matmul(offset_dev(be, x), w_cl, out, bias=CLArray(b2.buf, b2.off, (N,), np.float32))
    expect = np.empty((n, N), np.float32)
    ref.matmul(x, w_np, expect, bias=bias)
    np.testing.assert_allclose(host(be, out), expect, **TOL)


@pytest.mark.parametrize("mat_rows,x_tile", [(None, False), (3, False), (None, True)])
@pytest.mark.parametrize("ggml_type", NATIVE, ids=lambda t: t.name)
def test_matmul_batch_invariant(be, cl_device, ggml_type, mat_rows, x_tile):
    """A row's output is bit-identical whether it is computed alone (mat-vec) or in any batch
    (mat-mat, with the device's tile, an odd one, and the x-tile cap of prompt chunks: 4 rows)."""
    if mat_rows is not None or x_tile:
        be = OpenCLBackend(device=cl_device, tuning=be.tuning, mat_rows=mat_rows or (8 if x_tile else None))
    rng = np.random.default_rng(100 + int(ggml_type))
    N, K = 70, 2 * QK[ggml_type] if QK[ggml_type] > 1 else 77
    if x_tile:
        be.x_tile_bytes = 4 * K * 4  # x of 4 rows fits, of 8 not: batches of 10+ rows take 4-row tiles
        assert [_tile_rows(n, be.mat_rows, K, be.x_tile_bytes) for n in (9, 10, 17)] == [9, 4, 4]
    w = load(be, ggml_type, (N, K), random_raw(rng, ggml_type, (N, K)))
    x = rng.standard_normal((17, K)).astype(np.float32)
    xd = dev(be, x)
    full = empty(be, (17, N))
    be.matmul(xd, w, full)
    full = host(be, full)
    for n in range(1, 18):
        out = empty(be, (n, N))
        be.matmul(xd[:n], w, out)
        assert np.array_equal(host(be, out), full[:n]), f"n={n}"
    for i in (0, 5, 16):  # each row alone, at its own buffer position
        out = empty(be, (1, N))
        be.matmul(dev(be, x[i:i + 1]), w, out)
        assert np.array_equal(host(be, out)[0], full[i]), f"row {i} alone"


def test_tile_rows_cap_only_for_prompt_chunks():
    """The L1 cap on the mat-mat tile (_tile_rows) leaves decode and verify batches alone, takes
    prompt chunks to the largest power-of-two tile of 4+ rows whose x fits, and is off on GPUs."""
    l1 = 32 << 10
    assert [_tile_rows(n, 8, 2048, l1) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 9]  # as without the cap
    assert [_tile_rows(n, 8, 2048, l1) for n in (10, 16, 64)] == [4, 4, 4]  # 4 rows of 2048 floats fit 32 KiB
    assert [_tile_rows(64, 8, K, l1) for K in (576, 1536, 5632)] == [8, 4, 8]  # 8 fit; 4 fit; not even 4: as before
    assert _tile_rows(64, 8, 2048, 0) == 8  # no cap (GPUs)


@pytest.mark.parametrize("ggml_type", [T.Q4_0, T.Q4_1], ids=lambda t: t.name)
def test_nibble_table_dequant_is_bit_identical(cl_device, ref, ggml_type, monkeypatch):
    """The 4-bit table dequantiser (NIBBLE_LUT, common.clh) gives the same bits as the arithmetic
    one, mat-vec and mat-mat: a table entry is the same fma of the code with the block's scale."""
    from compute.opencl import programs

    monkeypatch.setattr(programs, "host_has_avx512", lambda: False)
    be = OpenCLBackend(device=cl_device)
    assert "-DNIBBLE_LUT=1" not in be.build_options
    rng = np.random.default_rng(7 + int(ggml_type))
    N, K = 70, 8 * QK[ggml_type]
    raw = random_raw(rng, ggml_type, (N, K))
    w = load(be, ggml_type, (N, K), raw)
    x = (rng.standard_normal((9, K)) / math.sqrt(K)).astype(np.float32)
    xd = dev(be, x)

    def run():
        outs = []
        for n in (1, 9):
            out = empty(be, (n, N))
            be.matmul(xd[:n], w, out)
            outs.append(host(be, out))
        return outs

    arithmetic = run()
    be.kernel = lambda fname, **d: be.kernels.kernel(fname, **d, NIBBLE_LUT=1)
    table = run()
    for a, t in zip(arithmetic, table):
        assert np.array_equal(a, t)
    expect = np.empty((9, N), np.float32)
    ref.matmul(x, load(ref, ggml_type, (N, K), raw), expect)
    np.testing.assert_allclose(table[1], expect, **TOL)


def test_nibble_table_only_where_it_pays(cl_device):
    """The native profile turns the table dequantiser on for Intel's CPU runtime on an AVX-512 host, only."""
    from compute.opencl import programs

    be = OpenCLBackend(device=cl_device)
    want = be.is_cpu and "-DVENDOR_INTEL=1" in be.build_options and programs.host_has_avx512()
    assert ("-DNIBBLE_LUT=1" in be.build_options) == want


# ---- embedding / gather ----
@pytest.mark.parametrize("ggml_type", NATIVE + [T.Q5_1, T.BF16], ids=lambda t: t.name)
def test_embed_matches_numpy(be, ref, ggml_type):
    rng = np.random.default_rng(200 + int(ggml_type))
    V, E = 53, k_for(ggml_type, rng)
    raw = random_raw(rng, ggml_type, (V, E))
    t_cl = load(be, ggml_type, (V, E), raw)
    t_np = load(ref, ggml_type, (V, E), raw)
    ids = rng.integers(0, V, 11).astype(np.int32)
    ids[:2] = [0, V - 1]
    out = empty(be, (11, E))
    be.embed(t_cl, ids, out)
    expect = np.empty((11, E), np.float32)
    ref.embed(t_np, ids, expect)
    if ggml_type in (T.F32, T.F16, T.BF16):
        assert np.array_equal(host(be, out), expect)
    else:
        np.testing.assert_allclose(host(be, out), expect, rtol=1e-6, atol=1e-6)


def test_embed_rejects_out_of_range_ids(be):
    rng = np.random.default_rng(4)
    table = load(be, T.Q8_0, (10, 32), random_raw(rng, T.Q8_0, (10, 32)))
    with pytest.raises(IndexError):
        be.embed(table, np.array([3, 10], np.int32), empty(be, (2, 32)))
    with pytest.raises(IndexError):
        be.embed(table, np.array([-1], np.int32), empty(be, (1, 32)))


def test_gather_rows(be, ref):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((9, 77)).astype(np.float32)
    rows = np.array([8, 0, 3, 3], np.int32)
    out = empty(be, (4, 77))
    be.gather_rows(offset_dev(be, x), rows, out)
    expect = np.empty((4, 77), np.float32)
    ref.gather_rows(x, rows, expect)
    assert np.array_equal(host(be, out), expect)


# ---- element-wise and row ops ----
@pytest.mark.parametrize("n,E", [(1, 576), (5, 100), (17, 16), (3, 7)])
def test_rms_norm(be, ref, n, E):
    rng = np.random.default_rng(n * E)
    x = rng.standard_normal((n, E)).astype(np.float32) * 3
    w = rng.standard_normal(E).astype(np.float32)
    out = empty(be, (n, E))
    be.rms_norm(offset_dev(be, x), dev(be, w), 1e-5, out)
    expect = np.empty((n, E), np.float32)
    ref.rms_norm(x, w, 1e-5, expect)
    np.testing.assert_allclose(host(be, out), expect, **TOL)


@pytest.mark.parametrize("total_shape", [(1, 576), (3, 1536), (7, 13)])
def test_add_and_swiglu(be, ref, total_shape):
    rng = np.random.default_rng(7)
    a = rng.standard_normal(total_shape).astype(np.float32) * 4
    b = rng.standard_normal(total_shape).astype(np.float32)
    ad, bd = offset_dev(be, a), dev(be, b)
    be.add(ad, bd, ad)  # in place, as the graph does
    assert np.array_equal(host(be, ad), a + b)
    gd, ud = dev(be, a), dev(be, b)
    be.swiglu(gd, ud, gd)
    expect = a.copy()
    ref.swiglu(expect, b, expect)
    np.testing.assert_allclose(host(be, gd), expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("neox", [False, True])
@pytest.mark.parametrize("n_heads,head_dim,rope_dim", [(9, 64, 64), (3, 64, 32), (2, 16, 16)])
def test_rope(be, ref, neox, n_heads, head_dim, rope_dim):
    rng = np.random.default_rng(head_dim + rope_dim)
    n = 6
    x = rng.standard_normal((n, n_heads * head_dim)).astype(np.float32)
    theta = rng.uniform(0, 100, (n, rope_dim // 2))
    cos, sin = np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)
    xd = offset_dev(be, x)
    be.rope(xd, cos, sin, n_heads, head_dim, rope_dim, neox)
    expect = x.copy()
    ref.rope(expect, cos, sin, n_heads, head_dim, rope_dim, neox)
    np.testing.assert_allclose(host(be, xd), expect, rtol=1e-6, atol=1e-6)
    # the staged tables are refreshed when they change
    be.rope(xd[:2], cos[:2] * 0 + 1, sin[:2] * 0, n_heads, head_dim, rope_dim, neox)
    np.testing.assert_allclose(host(be, xd), expect, rtol=1e-6, atol=1e-6)


# ---- KV cache and attention ----
def _caches(be, ref, n_layer, n_slots, n_ctx, E, kv):
    shape = (n_layer, n_slots, n_ctx, E)
    dt = np.float16 if kv == "f16" else np.float32
    return (dev(be, np.zeros(shape, dt)), dev(be, np.zeros(shape, dt)), np.zeros(shape, dt), np.zeros(shape, dt))


@pytest.mark.parametrize("kv", ["f32", "f16"])
@pytest.mark.parametrize("n_head,n_head_kv,head_dim", [(9, 3, 64), (4, 4, 32), (8, 2, 16), (6, 2, 40), (2, 1, 8)])
def test_kv_store_and_attention(be, ref, kv, n_head, n_head_kv, head_dim):
    rng = np.random.default_rng(n_head * head_dim)
    n_layer, n_slots, n_ctx = 2, 3, 40
    E = n_head_kv * head_dim
    kc, vc, kh, vh = _caches(be, ref, n_layer, n_slots, n_ctx, E, kv)
    # fill slots with a prefix (prefill), then decode/verify rows across slots
    fills = {0: 37, 1: 5, 2: 17}
    for layer in range(n_layer):
        for slot, L in fills.items():
            k = rng.standard_normal((L, E)).astype(np.float32)
            v = rng.standard_normal((L, E)).astype(np.float32)
            sl, pos = np.full(L, slot, np.int32), np.arange(L, dtype=np.int32)
            be.kv_store(kc, vc, layer, sl, pos, offset_dev(be, k), dev(be, v))
            ref.kv_store(kh, vh, layer, sl, pos, k, v)
    for layer in range(n_layer):
        for slot, L in fills.items():
            kr, vr = be.kv_read(kc, vc, layer, slot, L)
            ek, ev = ref.kv_read(kh, vh, layer, slot, L)
            assert np.array_equal(kr, ek) and np.array_equal(vr, ev), "kv_store is exact (f16: round to nearest even)"
    slots = np.array([0, 0, 1, 2, 2, 2, 1], np.int32)
    positions = np.array([35, 36, 0, 14, 15, 16, 4], np.int32)
    q = rng.standard_normal((7, n_head * head_dim)).astype(np.float32)
    out = empty(be, (7, n_head * head_dim))
    be.attention(kc, vc, 1, offset_dev(be, q), slots, positions, n_head, n_head_kv, head_dim, out)
    expect = np.empty((7, n_head * head_dim), np.float32)
    ref.attention(kh, vh, 1, q, slots, positions, n_head, n_head_kv, head_dim, expect)
    got = host(be, out)
    np.testing.assert_allclose(got, expect, **TOL)
    # batch invariance: every row alone gives the same bits
    for i in range(7):
        o1 = empty(be, (1, n_head * head_dim))
        be.attention(kc, vc, 1, dev(be, q[i:i + 1]), slots[i:i + 1], positions[i:i + 1], n_head, n_head_kv,
                     head_dim, o1)
        assert np.array_equal(host(be, o1)[0], got[i]), f"row {i}"
    for n in range(2, 8):
        on = empty(be, (n, n_head * head_dim))
        be.attention(kc, vc, 1, dev(be, q[:n]), slots[:n], positions[:n], n_head, n_head_kv, head_dim, on)
        assert np.array_equal(host(be, on), got[:n]), f"n={n}"


# ---- sizes and allocation ----
def test_weight_nbytes_and_allocation(be):
    from compute.quants import tensor_nbytes

    for t in NATIVE:
        k = QK[t] if QK[t] > 1 else 16
        assert be.weight_nbytes(t, (10, 2 * k)) == tensor_nbytes(t, (10, 2 * k))
    for t in ON_LOAD:
        assert be.weight_nbytes(t, (10, 256)) == 10 * 256 * 4
    assert be.weight_nbytes(T.F16, (576,)) == 576 * 4  # vectors are held as float32
    layout = {"a": ((3, 5), "f32"), "b": ((2, 3), "f16"), "c": ((4,), "f32")}
    spec = BufferSpec("target", "compute", "scratch", "device", 3 * 5 * 4 + 2 * 3 * 2 + 4 * 4)
    before = be.ledger.total_bytes()
    alloc = be.allocate("p", spec, layout)
    assert be.ledger.total_bytes() == before + spec.nbytes
    assert alloc.array["a"].shape == (3, 5) and alloc.array["b"].dtype == np.float16
    assert alloc.array["c"].off == (3 * 5 * 4 + 2 * 3 * 2) // 4
    assert alloc.array["a"][:2].shape == (2, 5)
    be.release(alloc)
    assert be.ledger.total_bytes() == before
    mem = be.device_memory()
    assert mem.total_bytes > 0 and 0 < mem.free_bytes <= mem.total_bytes
    assert mem.has_host == (not be.is_cpu)


# ---- fused launches: the same bits as the ops one at a time ----
class Launches:
    """Counts the kernels the backend enqueues inside a `with` block."""

    def __init__(self, be: OpenCLBackend):
        self.be, self.n = be, 0

    def __enter__(self) -> "Launches":
        real = self.be.kernels.enqueue

        def counting(*a, **k):
            self.n += 1
            return real(*a, **k)

        self.be.kernels.enqueue = counting
        return self

    def __exit__(self, *exc) -> None:
        del self.be.kernels.enqueue


def test_fused_matmuls_of_one_x(be):
    """q, k, v (and gate, up) share x: one launch; each output equals its own launch bit for bit."""
    rng = np.random.default_rng(11)
    K = 96
    ws = [load(be, T.Q4_1, (N, K), random_raw(rng, T.Q4_1, (N, K))) for N in (37, 100, 16)]
    bias = dev(be, rng.standard_normal(100).astype(np.float32))
    for n in (1, 6):
        xd = dev(be, rng.standard_normal((n, K)).astype(np.float32))
        for group in (3, 2):
            outs = [empty(be, (n, w.shape[0])) for w in ws[:group]]
            with Launches(be) as launched:
                be.matmuls(xd, [Proj(w, o, bias if i == 1 else None) for i, (w, o) in enumerate(zip(ws, outs))])
            assert launched.n == 1
            fused = [host(be, o) for o in outs]
            for i, (w, o) in enumerate(zip(ws, outs)):
                alone = empty(be, o.shape)
                be.matmul(xd, w, alone, bias=bias if i == 1 else None)
                assert np.array_equal(host(be, alone), fused[i]), (n, group, i)


def test_fused_add_rms_norm(be, ref):
    rng = np.random.default_rng(12)
    for n, E in ((1, 576), (5, 100)):
        a = rng.standard_normal((n, E)).astype(np.float32)
        b = rng.standard_normal((n, E)).astype(np.float32)
        w = rng.standard_normal(E).astype(np.float32)
        ad, out = dev(be, a), empty(be, (n, E))
        bd, wd = dev(be, b), dev(be, w)
        with Launches(be) as launched:
            be.add_rms_norm(ad, bd, ad, wd, 1e-5, out)  # the add fused with the norm of its result
        assert launched.n == 1
        fused_x, fused = host(be, ad), host(be, out)
        assert np.array_equal(fused_x, a + b)
        alone = empty(be, (n, E))
        be.rms_norm(dev(be, a + b), dev(be, w), 1e-5, alone)
        assert np.array_equal(host(be, alone), fused)
        expect = np.empty((n, E), np.float32)
        ref.rms_norm(a + b, w, 1e-5, expect)
        np.testing.assert_allclose(fused, expect, **TOL)


def test_fused_rope_pair(be):
    rng = np.random.default_rng(13)
    n, hd = 4, 64
    q = rng.standard_normal((n, 9 * hd)).astype(np.float32)
    k = rng.standard_normal((n, 3 * hd)).astype(np.float32)
    theta = rng.uniform(0, 50, (n, hd // 2))
    cos, sin = np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)
    qd, kd = dev(be, q), dev(be, k)
    with Launches(be) as launched:
        be.rope_qk(qd, kd, cos, sin, 9, 3, hd, hd, False)
    assert launched.n == 1
    q1, k1 = dev(be, q), dev(be, k)
    be.rope(q1, cos, sin, 9, hd, hd, False)
    host(be, q1)
    be.rope(k1, cos, sin, 3, hd, hd, False)
    assert np.array_equal(host(be, qd), host(be, q1)) and np.array_equal(host(be, kd), host(be, k1))


@pytest.mark.parametrize("kv", ["f32", "f16"])
@pytest.mark.parametrize("neox,n_head,n_head_kv,head_dim,rope_dim", [(False, 9, 3, 64, 64), (True, 4, 2, 32, 32),
                                                                     (False, 6, 2, 40, 24), (True, 4, 4, 16, 8)])
def test_fused_rope_kv_store(be, kv, neox, n_head, n_head_kv, head_dim, rope_dim):
    """rope_kv_store is one launch and gives q and both caches bit for bit as rope_qk then kv_store,
    partial rotary dimensions and both KV types included; rows land at their (slot, position)."""
    rng = np.random.default_rng(head_dim + rope_dim + int(neox))
    n, n_layer, n_slots, n_ctx = 5, 2, 3, 12
    E = n_head_kv * head_dim
    q = rng.standard_normal((n, n_head * head_dim)).astype(np.float32)
    k = rng.standard_normal((n, E)).astype(np.float32)
    v = rng.standard_normal((n, E)).astype(np.float32)
    theta = rng.uniform(0, 50, (n, rope_dim // 2))
    cos, sin = np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)
    slots, positions = np.array([0, 2, 2, 1, 0], np.int32), np.array([3, 0, 1, 11, 4], np.int32)
    runs = []
    for fused in (True, False):
        kc, vc, _, _ = _caches(be, None, n_layer, n_slots, n_ctx, E, kv)
        qd, kd, vd = offset_dev(be, q), dev(be, k), offset_dev(be, v)
        with Launches(be) as launched:
            if fused:
                be.rope_kv_store(qd, kd, vd, cos, sin, n_head, n_head_kv, head_dim, rope_dim, neox, kc, vc, 1,
                                 slots, positions)
            else:
                be.rope_qk(qd, kd, cos, sin, n_head, n_head_kv, head_dim, rope_dim, neox)
                be.kv_store(kc, vc, 1, slots, positions, kd, vd)
        assert launched.n == (1 if fused else 2)
        runs.append((host(be, qd), *(host(be, c) for c in (kc, vc))))
    for a, b in zip(*runs):
        assert np.array_equal(a, b)
    _, kcache, vcache = runs[0]
    stored = v.astype(np.float16 if kv == "f16" else np.float32).astype(np.float32)  # read back as float32
    assert np.array_equal(vcache[1, slots, positions], stored)  # each row at its cell
    assert not kcache[0].any() and not vcache[0].any()  # other layers untouched


@pytest.mark.parametrize("tuning", ["nvidia", "amd", "intel", "generic"])
def test_gpu_tunings_fit_common_gpu_limits(cl_device, tuning):
    """Every kernel of a GPU tuning builds, and its work-group (<= 256 work-items) and local
    memory (<= 16 KiB) fit any current GPU: a profile that only PoCL's 4096 accepts fails here."""
    be = OpenCLBackend(device=cl_device, tuning=tuning)
    builds = []
    for f in sorted(p.name for p in KERNEL_DIR.glob("*.cl")):
        if f.startswith("mul_mv_"):  # the largest local memory: the mat-mat tile, three segments
            builds.append((f, dict(NR=MAT_ROWS["gpu"], SEGS=3)))
        elif f == "attn_f32.cl":
            builds += [(f, dict(HEAD_DIM=128, KV_F16=kv)) for kv in (0, 1)]
        elif f in ("kv_store_f32.cl", "rope_kv_store_f32.cl"):
            builds += [(f, dict(KV_F16=kv)) for kv in (0, 1)]
        else:
            builds.append((f, {}))
    for f, defines in builds:
        k, lws = be.kernel(f, **defines)
        assert math.prod(lws) <= 256, (f, defines, lws)
        local = k.get_work_group_info(cl.kernel_work_group_info.LOCAL_MEM_SIZE, be.device)
        assert local <= 16 * 1024, (f, defines, local)
