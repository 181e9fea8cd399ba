"""OpenCL paths the kernel tests do not reach on their own: the KV copies between slots (n > 1
completions) and to and from the prompt store, attention over several work-groups and many 16-cell
chunks, and whole tiny models of every native quant type decoded as NumPy decodes them (the fused
kernels, the replayed passes, get_rows of each type). At tiny shapes, on every OpenCL device, and
under Oclgrind with its memory and data-race checks (tests/test_oclgrind.py).
"""

from __future__ import annotations

import numpy as np
import pyopencl as cl
import pytest
from gguf import GGMLQuantizationType as T

from compute.numpy_backend import NumpyBackend
from compute.opencl.backend import OpenCLBackend
from service.fit.factory import PairFactory, PairRequest
from service.fit.params import ContextParams, SpeculativeConfig
from tests import test_opencl_kernels as kernels
from tests.test_opencl_kernels import TOL, _caches, dev, empty, host
from tests.test_opencl_model import greedy
from tests.tiny_gguf import write_tiny_llama

cl_device, be, ref = kernels.cl_device, kernels.be, kernels.ref  # the kernel tests' fixtures: every device


def whole(backend: OpenCLBackend, a) -> np.ndarray:
    """Every element of a device array, read back as it is."""
    out = np.empty(a.shape, a.dtype)
    cl.enqueue_copy(backend.queue, out, a.buf, src_offset=a.off * a.dtype.itemsize, is_blocking=True)
    return out


@pytest.mark.parametrize("kv", [np.float32, np.float16], ids=["f32", "f16"])
def test_kv_copy_copies_the_first_n_cells_of_every_layer_and_nothing_else(be, kv):
    rng = np.random.default_rng(1)
    shape = (3, 4, 24, 40)  # (n_layer, n_slots, n_ctx, E)
    k0, v0 = (rng.standard_normal(shape).astype(kv) for _ in range(2))
    kc, vc = dev(be, k0), dev(be, v0)
    be.kv_copy(kc, vc, 2, 0, 17)
    for before, c in ((k0, kc), (v0, vc)):
        want = before.copy()
        want[:, 0, :17] = before[:, 2, :17]
        assert np.array_equal(whole(be, c), want)


@pytest.mark.parametrize("kv", [np.float32, np.float16], ids=["f32", "f16"])
def test_prompt_store_copies_round_trip_between_a_slot_and_a_block(be, kv):
    rng = np.random.default_rng(2)
    cache0 = rng.standard_normal((2, 3, 40, 24)).astype(kv)  # (n_layer, n_slots, n_ctx, E)
    store0 = rng.standard_normal((4, 2, 16, 24)).astype(kv)  # (n_blocks, n_layer, B, E)
    cache, store = dev(be, cache0), dev(be, store0)
    be.kv_to_store(cache, 1, 3, store, 2, 5, 9)  # slot 1 cells 3..11 -> block 2 offsets 5..13
    want_store = store0.copy()
    want_store[2, :, 5:14] = cache0[:, 1, 3:12]
    assert np.array_equal(whole(be, store), want_store)
    be.kv_from_store(cache, 0, 7, store, 2, 5, 9)  # ... and back into slot 0 at cell 7
    want_cache = cache0.copy()
    want_cache[:, 0, 7:16] = cache0[:, 1, 3:12]
    assert np.array_equal(whole(be, cache), want_cache)
    be.kv_to_store(cache, 2, 24, store, 3, 0, 16)  # a whole block, at the last block and the cache's end
    want_store[3] = cache0[:, 2, 24:40]
    assert np.array_equal(whole(be, store), want_store)


@pytest.mark.parametrize("kv", ["f32", "f16"])
def test_attention_over_several_work_groups_and_long_contexts(be, ref, kv):
    rng = np.random.default_rng(3)
    n_layer, n_slots, n_ctx, n_head, n_head_kv, head_dim = 1, 2, 160, 8, 2, 16
    E = n_head_kv * head_dim
    kc, vc, kh, vh = _caches(be, ref, n_layer, n_slots, n_ctx, E, kv)
    for slot in range(n_slots):
        L = n_ctx
        k, v = (rng.standard_normal((L, E)).astype(np.float32) for _ in range(2))
        for a in range(0, L, 64):  # the fixture's scratch stages up to 64 rows
            sl, pos = np.full(min(64, L - a), slot, np.int32), np.arange(a, min(a + 64, L), dtype=np.int32)
            be.kv_store(kc, vc, 0, sl, pos, dev(be, k[a:a + 64]), dev(be, v[a:a + 64]))
            ref.kv_store(kh, vh, 0, sl, pos, k[a:a + 64], v[a:a + 64])
    n = 24  # 24 rows x 8 heads = 192 work-items: several work-groups
    slots = np.arange(n, dtype=np.int32) % n_slots
    positions = (159 - 6 * np.arange(n)).astype(np.int32)  # 159 .. 21: up to 10 chunks of 16 cells
    q = rng.standard_normal((n, n_head * head_dim)).astype(np.float32)
    out = empty(be, (n, n_head * head_dim))
    be.attention(kc, vc, 0, dev(be, q), slots, positions, n_head, n_head_kv, head_dim, out)
    want = np.empty((n, n_head * head_dim), np.float32)
    ref.attention(kh, vh, 0, q, slots, positions, n_head, n_head_kv, head_dim, want)
    np.testing.assert_allclose(host(be, out), want, **TOL)


MODEL_TYPES = [T.Q4_0, T.Q4_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K, T.F16]


@pytest.fixture(scope="module")
def tiny_of_each_type(tmp_path_factory):
    d = tmp_path_factory.mktemp("quant_models")
    return {t: write_tiny_llama(d / f"{t.name}.gguf", n_embd=256, n_head=4, n_head_kv=2, n_ff=256, n_layer=1,
                                seed=5, matrix_type=t) for t in MODEL_TYPES}


def _tokens(backend, path: str) -> list[list[int]]:
    params = ContextParams(n_ctx=2 * 32, n_parallel=2, n_batch=16, prompt_cache_bytes=1 << 20, ngram_cache_tokens=0)
    req = PairRequest(name="q", target_path=path, params=params,
                      speculative=SpeculativeConfig(type="none"))
    pair = PairFactory(backend).load(req)
    try:
        return greedy(pair.target.context, [[5, 70, 101, 33, 9], [200, 3]], 4)  # prefill, decode, replays
    finally:
        pair.release()


@pytest.mark.parametrize("ggml_type", MODEL_TYPES, ids=lambda t: t.name)
def test_a_tiny_model_of_each_type_decodes_as_numpy_does(cl_device, tiny_of_each_type, ggml_type):
    path = tiny_of_each_type[ggml_type]
    assert _tokens(OpenCLBackend(device=cl_device), path) == _tokens(NumpyBackend(row_tile=1), path)
