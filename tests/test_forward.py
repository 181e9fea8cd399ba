"""The llama forward pass: against a naive float64 transcription of the maths, and batch invariance."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from compute.gguf_model import ModelFile
from compute.llama import Batch
from compute.numpy_backend import NumpyBackend
from reference.float64_forward import naive_forward
from service.fit.factory import PairFactory, PairRequest
from service.fit.params import ContextParams, SpeculativeConfig
from tests.ggml_backend import make_ggml
from tests.models import packaged_model_path
from tests.tiny_gguf import write_tiny_llama

ARCH_MODELS = {  # name -> write_tiny_llama arguments of a small model of that architecture
    "llama": dict(arch="llama"),
    "llama-untied": dict(arch="llama", tied=False),
    "qwen2": dict(arch="qwen2"),
    "qwen3": dict(arch="qwen3", head_dim=32),  # n_head * head_dim (128) != n_embd (64), as Qwen3's
    "gemma3": dict(arch="gemma3", head_dim=32, n_layer=3, sliding_window=3, swa_pattern=3),
}


@pytest.mark.parametrize("model", list(ARCH_MODELS))
@pytest.mark.parametrize("row_tile", [0, 1, 8])
def test_graph_matches_the_naive_maths(tmp_path, model, row_tile):
    path = write_tiny_llama(tmp_path / "m.gguf", **{"n_layer": 2, **ARCH_MODELS[model]}, seed=5, scale=2.0)
    mf = ModelFile(path)
    tokens = [3, 17, 200, 5, 5, 90, 31]
    ref = naive_forward(mf, tokens)
    pair = PairFactory(NumpyBackend(n_threads=1, row_tile=row_tile), device_memory_bytes=1 << 34).load(
        PairRequest(target_path=path, params=ContextParams(n_ctx=64, n_batch=16, kv_type="f32"),
                    speculative=SpeculativeConfig("ngram", n_max=8)))
    n = len(tokens)
    got = pair.target.context.decode(Batch.make(tokens, range(n), [0] * n, range(n)))
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    pair.release()


def _opencl_params() -> list:
    try:
        from tests.opencl_runtimes import device_params
    except ImportError:  # no pyopencl: the OpenCL backend is not installed here
        return []
    return [pytest.param(p.values[0], marks=p.marks, id=f"opencl-{p.id}") for p in device_params()]


def _make_backend(which):
    if which == "ggml":
        return make_ggml()
    from compute.opencl.backend import OpenCLBackend

    return OpenCLBackend(device=which)


@pytest.mark.parametrize("model", list(ARCH_MODELS))
@pytest.mark.parametrize("which", ["ggml", *_opencl_params()])
def test_every_backend_matches_the_naive_maths_for_every_architecture(tmp_path, model, which):
    """float32 weights, so the only differences are each backend's float32 rounding (ggml's GELU: its
    f16 table) over a prompt longer than the gemma model's window; then one more token on its own."""
    path = write_tiny_llama(tmp_path / "m.gguf", **{"n_layer": 2, **ARCH_MODELS[model]}, seed=7, scale=2.0,
                            matrix_type=T.F32)
    mf = ModelFile(path)
    tokens = [3, 17, 200, 5, 5, 90, 31, 64, 12]
    ref = naive_forward(mf, tokens)
    pair = PairFactory(_make_backend(which), device_memory_bytes=1 << 34).load(
        PairRequest(target_path=path, params=ContextParams(n_ctx=64, n_batch=16, kv_type="f32")))
    n = len(tokens) - 1
    ctx = pair.target.context
    got = ctx.decode(Batch.make(tokens[:n], range(n), [0] * n, range(n)))
    last = ctx.decode(Batch.make(tokens[n:], [n], [0], [0]))
    np.testing.assert_allclose(np.concatenate([got, last]), ref, rtol=2e-3, atol=2e-3)
    pair.release()


@pytest.fixture(scope="module", params=["numpy", "ggml"])
def real_ctx(request):
    be = NumpyBackend(n_threads=1) if request.param == "numpy" else make_ggml()  # numpy: default row_tile
    pair = PairFactory(be, device_memory_bytes=1 << 34).load(
        PairRequest(target_path=packaged_model_path(), params=ContextParams(n_ctx=3 * 64, n_parallel=3, n_batch=32),
                    speculative=SpeculativeConfig("ngram", n_max=8)))
    yield pair.target.context
    pair.release()


TOKENS = [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198, 504, 3575]


def test_batch_invariance_on_the_real_model(real_ctx):
    """Logits of the same tokens decoded one at a time and in batches of 2..n (mixed with another
    slot's rows) are identical, bit for bit."""
    ctx, n = real_ctx, len(TOKENS)
    one = np.concatenate([ctx.decode(Batch.make([t], [i], [0], [0])) for i, t in enumerate(TOKENS)])
    for size in (2, 3, 5, 8, 9, 18):
        rows = []
        for a in range(0, n, size):
            chunk = TOKENS[a:a + size]
            m = len(chunk)
            # slot 1 carries the sequence; slot 2 adds unrelated rows to the same batch
            noise = [7, 8, 9][: max(0, min(3, ctx.n_batch - m))]
            b = Batch.make(chunk + noise, list(range(a, a + m)) + list(range(a, a + len(noise))),
                           [1] * m + [2] * len(noise), range(m))
            rows.append(ctx.decode(b))
        assert np.array_equal(one, np.concatenate(rows)), f"batch size {size}"


def test_kv_cache_f16_is_close_to_f32(tmp_path):
    path = write_tiny_llama(tmp_path / "m.gguf", n_layer=2, seed=6, scale=2.0)
    out = {}
    for kv in ("f32", "f16"):
        pair = PairFactory(NumpyBackend(n_threads=1), device_memory_bytes=1 << 34).load(
            PairRequest(target_path=path, params=ContextParams(n_ctx=64, n_batch=16, kv_type=kv)))
        out[kv] = pair.target.context.decode(Batch.make([3, 4, 5, 6], range(4), [0] * 4, [3]))
        pair.release()
    np.testing.assert_allclose(out["f16"], out["f32"], atol=5e-3)


@pytest.mark.parametrize("which", ["numpy", "ggml", *_opencl_params()])
def test_a_local_layers_ring_wraps_many_times_and_matches_the_naive_maths(tmp_path, which):
    """Window 4, n_batch 4: local layers keep 8 cells per slot (window + n_batch), so a 30-token sequence
    decoded in chunks of 3 wraps their ring several times; a second slot's rows share each batch. Every
    row's logits equal the float64 maths of the whole sequence, where each local row sees its last 4."""
    path = write_tiny_llama(tmp_path / "m.gguf", arch="gemma3", head_dim=32, n_layer=3, sliding_window=4,
                            swa_pattern=3, seed=9, scale=2.0, matrix_type=T.F32)
    tokens = [int(t) for t in np.random.default_rng(3).integers(3, 250, 30)]
    ref = naive_forward(ModelFile(path), tokens)
    be = NumpyBackend(n_threads=1) if which == "numpy" else _make_backend(which)
    pair = PairFactory(be, device_memory_bytes=1 << 34).load(
        PairRequest(target_path=path, params=ContextParams(n_ctx=2 * 64, n_parallel=2, n_batch=4, kv_type="f32")))
    ctx = pair.target.context
    assert ctx.k_swa.shape[2] == 8 and ctx.k.shape[:3] == (1, 2, 64)  # 2 local layers' rings, 1 global layer
    rows = []
    for a in range(0, len(tokens), 3):
        chunk = tokens[a:a + 3]
        m = len(chunk)
        b = Batch.make(chunk + [7], list(range(a, a + m)) + [a // 3], [0] * m + [1], range(m))
        rows.append(ctx.decode(b))
    np.testing.assert_allclose(np.concatenate(rows), ref, rtol=2e-3, atol=2e-3)
    assert ctx.window_intact(0, 30) and not ctx.window_intact(0, 20)  # the ring holds positions 22..29
    pair.release()
