"""The ggml backend: its K-quant mat-mul (on the file's rows and on weights repacked into tiles) against
dequantised NumPy and batch invariant to the bit, its compute buffer planned by ggml's allocator and
never grown, agreement with the NumPy reference on the real model, and its place in `--backend auto`."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from compute.ggml.graph import ScratchRef, WeightHandle
from compute.ggml.lib import MulMatArgs, QuantizeArgs
from compute.llama import Batch
from compute.numpy_backend import NumpyBackend
from compute.quants import dequantize
from compute.select import device_report, make_backend
from service.fit.factory import PairFactory, PairRequest
from service.fit.params import ContextParams, SpeculativeConfig
from tests.ggml_backend import make_ggml
from tests.models import packaged_model_path
from tests.tiny_gguf import tiny_vocab, write_tiny_llama

Q4_K, Q6_K = 12, 14
BLOCK_BYTES = {Q4_K: 144, Q6_K: 210}


@pytest.fixture(scope="module")
def be():
    return make_ggml()


def random_k_matrix(rng, ggml_type: int, n: int, k: int) -> np.ndarray:
    """(n, k) weights as K-quant blocks with random codes and scales and modest f16 super-scales."""
    nb = k // 256
    raw = rng.integers(0, 256, size=(n, nb, BLOCK_BYTES[ggml_type]), dtype=np.uint8)
    scales = rng.uniform(1e-3, 2e-2, size=(n, nb, 2)).astype(np.float16).view(np.uint8)
    if ggml_type == Q4_K:
        raw[:, :, 0:4] = scales  # d, dmin lead the block
    else:
        raw[:, :, 208:210] = scales[:, :, :2]  # d ends it
    return raw.reshape(-1)


def tiles_of(be, raw: np.ndarray, ggml_type: int, n: int, k: int) -> np.ndarray:
    """The matrix repacked into tiles of 16 rows, as load_weight does on a CPU with AVX-512 VNNI."""
    out = np.zeros_like(raw)
    assert be.libs.ops.specserve_repack_k(ggml_type, ctypes.c_void_p(raw.ctypes.data),
                                          ctypes.c_void_p(out.ctypes.data), ctypes.c_int64(n), ctypes.c_int64(k)) == 0
    return out


def run_matmul(be, raw: np.ndarray, ggml_type: int, n: int, k: int, x: np.ndarray, tiled: bool = False) -> np.ndarray:
    out = np.zeros((len(x), n), np.float32)
    w = WeightHandle(raw, ggml_type, (k, n), tiled=tiled)
    ref = ScratchRef("x", len(x))

    def build(r):
        r.set(ref, r.input("x", x))
        be.matmul(ref, w, out)

    be.run_once(build)
    return out


@pytest.mark.parametrize("ggml_type", [Q4_K, Q6_K], ids=["q4_k", "q6_k"])
def test_k_quant_matmul_matches_dequantised_weights_and_is_batch_invariant(be, ggml_type):
    rng = np.random.default_rng(ggml_type)
    n, k = 40, 512
    raw = random_k_matrix(rng, ggml_type, n, k)
    x = rng.standard_normal((16, k)).astype(np.float32)
    full = run_matmul(be, raw, ggml_type, n, k, x)
    ref = x.astype(np.float64) @ dequantize(raw, ggml_type, (n, k)).astype(np.float64).T
    # 8-bit activations: the error is that of rounding x to 1/127 of each block's largest value
    scale = np.abs(ref).max()
    assert np.abs(full - ref).max() < 0.02 * scale
    for rows in (1, 2, 3, 5, 9):  # every row alone or in smaller batches: the same bits
        for a in range(0, len(x), rows):
            assert np.array_equal(run_matmul(be, raw, ggml_type, n, k, x[a:a + rows]), full[a:a + rows]), rows


needs_vnni = pytest.mark.skipif(not make_ggml().libs.vnni, reason="tiles are used only on CPUs with AVX-512 VNNI; "
                                "this CPU runs the file's layout, which the test above covers")


@needs_vnni
@pytest.mark.parametrize("ggml_type", [Q4_K, Q6_K], ids=["q4_k", "q6_k"])
def test_tiled_matmul_matches_dequantised_weights_is_batch_invariant_and_equals_its_plain_c_twin(be, ggml_type):
    """Repacked into tiles of 16 rows: the same products as the file's rows within float rounding, each row's
    bits independent of its batch, and the VNNI kernel bit for bit the plain C kernel that spells out its
    arithmetic."""
    rng = np.random.default_rng(100 + ggml_type)
    n, k = 48, 768
    raw = random_k_matrix(rng, ggml_type, n, k)
    tiled = tiles_of(be, raw, ggml_type, n, k)
    assert not np.array_equal(tiled, raw)
    x = rng.standard_normal((16, k)).astype(np.float32)
    full = run_matmul(be, tiled, ggml_type, n, k, x, tiled=True)
    ref = x.astype(np.float64) @ dequantize(raw, ggml_type, (n, k)).astype(np.float64).T
    assert np.abs(full - ref).max() < 0.02 * np.abs(ref).max()
    rows_layout = run_matmul(be, raw, ggml_type, n, k, x)  # the same integer sums, another float order
    np.testing.assert_allclose(full, rows_layout, rtol=0, atol=1e-5 * np.abs(ref).max())
    for rows in (1, 2, 3, 4, 5, 9):
        for a in range(0, len(x), rows):
            assert np.array_equal(run_matmul(be, tiled, ggml_type, n, k, x[a:a + rows], tiled=True),
                                  full[a:a + rows]), rows
    # the plain C kernel on the same 8-bit activations
    ops, nb = be.libs.ops, k // 256
    xq = np.zeros(len(x) * nb * be.libs.q8_k_block_bytes, np.uint8)
    ops.specserve_quantize_q8_k(None, 0, 1, ctypes.byref(QuantizeArgs(x.ctypes.data, xq.ctypes.data, k, len(x))))
    plain = np.zeros((len(x), n), np.float32)
    ops.specserve_mul_mat_tiles_plain(ctypes.byref(MulMatArgs(tiled.ctypes.data, xq.ctypes.data, plain.ctypes.data,
                                                              n, k, len(x), ggml_type, 1)))
    assert np.array_equal(plain, full)


@needs_vnni
def test_tiled_models_plan_what_they_load_and_match_the_file_layout(tmp_path, be):
    """Whole models whose K-quant matrices (and, tied, the embedding table) are tiled: Fit's compute buffer
    holds every pass (the embedding of a tiled table is its own op), the ledger is the plan, a verify batch's
    rows equal the rows one at a time, and the logits match the same model in the file's layout."""
    from compute.ggml.backend import GgmlBackend

    for matrix, embd, tied in ((T.Q4_K, T.Q8_0, False), (T.Q6_K, T.Q6_K, True)):
        n_vocab = len(tiny_vocab()[0])  # padded to whole tiles: the tied table is tiled too
        path = write_tiny_llama(tmp_path / f"{matrix.name}.gguf", n_embd=256, n_head=4, n_head_kv=2, n_ff=512,
                                matrix_type=matrix, embd_type=embd, tied=tied, extra_tokens=-n_vocab % 16 + 16, seed=3)
        tokens = [3, 17, 200, 5, 5, 90, 31, 7, 8]
        n = len(tokens)
        got = {}
        for name, backend in (("tiles", be), ("rows", GgmlBackend(n_threads=2, tiles=False))):
            pair = PairFactory(backend, device_memory_bytes=1 << 34).load(
                PairRequest(target_path=path, params=ContextParams(n_ctx=64, n_batch=16, n_outputs_max=16),
                            speculative=SpeculativeConfig("none")))
            try:
                ctx = pair.target.context
                tiled = {nm: h.tiled for nm, h in ctx.w.t.items()}
                assert any(tiled.values()) == (name == "tiles")
                if name == "tiles":
                    assert tiled["token_embd.weight"] == tied
                before = backend.ledger.snapshot()
                got[name] = ctx.decode(Batch.make(tokens, range(n), [0] * n, range(n)))
                one = np.concatenate([ctx.decode(Batch.make([t], [i], [0], [0])) for i, t in enumerate(tokens)])
                assert np.array_equal(one, got[name])
                assert backend.ledger.snapshot() == before
            finally:
                pair.release()
        np.testing.assert_allclose(got["tiles"], got["rows"], rtol=0, atol=1e-3 * np.abs(got["rows"]).max())


def test_activation_quantisation_is_the_plain_c_one_to_the_byte(be):
    """8-bit activations (q8_K blocks) from the vector path and the plain C one: equal bytes, including blocks
    of zeros, blocks whose largest magnitude appears twice with both signs (the first one sets the sign), and
    values that round exactly to .5."""
    rng = np.random.default_rng(8)
    k, rows = 1024, 6
    x = rng.standard_normal((rows, k)).astype(np.float32) * rng.uniform(1e-3, 1e3, (rows, 1)).astype(np.float32)
    x[1, :256] = 0.0
    x[2, 10], x[2, 200] = -5e3, 5e3
    x[3, 300], x[3, 260] = 7e3, -7e3
    x[4, 512:768] = np.arange(256, dtype=np.float32) - 127.0  # scale 1: exact integers and ties
    x[4, 700] = 127.0
    out = {}
    ops, nbytes = be.libs.ops, rows * (k // 256) * be.libs.q8_k_block_bytes
    for name in ("vector", "plain"):
        out[name] = np.zeros(nbytes, np.uint8)
        args = QuantizeArgs(x.ctypes.data, out[name].ctypes.data, k, rows)
        if name == "vector":
            ops.specserve_quantize_q8_k(None, 0, 1, ctypes.byref(args))
        else:
            ops.specserve_quantize_q8_k_plain(ctypes.byref(args))
    assert out["vector"].any()
    assert np.array_equal(out["vector"], out["plain"])


def test_graph_matches_the_numpy_reference_on_tiny_models(tmp_path, be):
    """The whole graph (tied and untied heads, qkv bias) against NumPy, within 8-bit activations' error."""
    for arch, tied in (("llama", True), ("llama", False), ("qwen2", True)):
        path = write_tiny_llama(tmp_path / f"{arch}{tied}.gguf", arch=arch, tied=tied, n_layer=2, seed=5, scale=2.0)
        tokens = [3, 17, 200, 5, 5, 90, 31]
        n = len(tokens)
        got = {}
        for name, backend in (("numpy", NumpyBackend(n_threads=1)), ("ggml", be)):
            pair = PairFactory(backend, device_memory_bytes=1 << 34).load(
                PairRequest(target_path=path, params=ContextParams(n_ctx=64, n_batch=16, kv_type="f32"),
                            speculative=SpeculativeConfig("ngram", n_max=8)))
            got[name] = pair.target.context.decode(Batch.make(tokens, range(n), [0] * n, range(n)))
            pair.release()
        np.testing.assert_allclose(got["ggml"], got["numpy"], atol=0.05 * np.abs(got["numpy"]).max())


def test_attention_over_many_chunks_matches_numpy_closely(tmp_path, be):
    """Float32 weights and cache, 70 positions (four 16-cell chunks and a partial one, rows whose maximum
    moves from chunk to chunk): ggml's attention (vector exp, scores summed as a tree) against NumPy's,
    to float32 rounding rather than 8-bit activations' error."""
    path = write_tiny_llama(tmp_path / "f32.gguf", matrix_type=T.F32, n_layer=2, seed=9, scale=3.0)
    tokens = [int(t) for t in np.random.default_rng(4).integers(3, 260, 70)]
    n = len(tokens)
    got = {}
    for name, backend in (("numpy", NumpyBackend(n_threads=1)), ("ggml", be)):
        pair = PairFactory(backend, device_memory_bytes=1 << 34).load(
            PairRequest(target_path=path, params=ContextParams(n_ctx=128, n_batch=80, n_outputs_max=80, kv_type="f32"),
                        speculative=SpeculativeConfig("none")))
        got[name] = pair.target.context.decode(Batch.make(tokens, range(n), [0] * n, range(n)))
        pair.release()
    np.testing.assert_allclose(got["ggml"], got["numpy"], rtol=0, atol=2e-5 * np.abs(got["numpy"]).max())


def test_every_batch_shape_fits_the_planned_compute_buffer(be):
    """Passes of every row count up to n_batch, with up to n_outputs_max outputs, are placed in the compute
    buffer Fit measured (the allocator would grow it otherwise: GgmlScratch.check_size); the ledger stays
    the plan."""
    f = PairFactory(be, device_memory_bytes=1 << 34)
    req = PairRequest(target_path=packaged_model_path(), params=ContextParams(n_ctx=256, n_parallel=2, n_batch=24),
                      speculative=SpeculativeConfig("ngram", n_max=4))
    pair = f.load(req)
    try:
        before = be.ledger.snapshot()
        ctx = pair.target.context
        for n in (24, 1, 7, 13, 2, 24):
            for n_out in sorted({0, 1, min(n, ctx.n_outputs_max)}):
                ctx.decode(Batch.make([5] * n, range(n), [0] * n, range(n_out)))
        assert be.ledger.snapshot() == before
        assert len(ctx._passes) >= 10
    finally:
        pair.release()
    assert be.ledger.entries() == []


def test_greedy_argmax_agrees_with_numpy_on_the_real_model(be):
    """The packaged model's next-token argmax after each of 24 prefixes agrees between ggml and NumPy
    wherever the reference's top choice leads the next by more than half a logit (8-bit activations
    move logits by a few hundredths; near ties may go either way)."""
    tokens = [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198, 504, 3575, 28, 1070,
              30, 198, 72, 5]
    out = {}
    for name, backend in (("numpy", NumpyBackend(n_threads=1)), ("ggml", be)):
        pair = PairFactory(backend, device_memory_bytes=1 << 34).load(PairRequest(
            target_path=packaged_model_path(), params=ContextParams(n_ctx=64, n_batch=32),
            speculative=SpeculativeConfig("none")))
        ctx = pair.target.context
        out[name] = np.concatenate([ctx.decode(Batch.make([t], [i], [0], [0])) for i, t in enumerate(tokens)])
        pair.release()
    top2 = np.sort(out["numpy"], axis=-1)[:, -2:]
    decided = top2[:, 1] - top2[:, 0] > 0.5  # positions where the reference's choice is not a near tie
    assert decided.sum() >= 12
    agree = out["ggml"].argmax(-1) == out["numpy"].argmax(-1)
    assert agree[decided].all(), f"ggml's argmax differs at decided positions {np.flatnonzero(decided & ~agree)}"


def test_auto_takes_ggml_where_no_gpu_is_installed_and_list_devices_names_it():
    be = make_backend("auto", threads=1)
    import pyopencl as cl

    from compute.opencl.backend import _all_devices

    if not any(d.type & cl.device_type.GPU for _, d in _all_devices()):
        assert be.name == "ggml"
    assert any(line.startswith("ggml: ") and line.endswith(" ok") for line in device_report(1))
    with pytest.raises(Exception, match="needs the OpenCL backend"):
        make_backend("ggml", device="0")
