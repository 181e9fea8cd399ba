"""The ggml backend's probe: one small pass through ggml and specserve's custom ops, checked against NumPy.

A backend is chosen only after it computed correctly on this machine (a ggml built for another CPU
dies on an illegal instruction in the probe's process, not in a server's). The probe runs a matmul,
RoPE, a KV store into an f16 cache and attention over two slots through the same recorder, allocator
and threadpool that serving uses, and compares the result with the NumPy reference backend's.
"""

from __future__ import annotations

import numpy as np

from compute.backend import DTYPES
from compute.ggml.graph import ScratchRef, WeightHandle
from compute.numpy_backend import NumpyBackend

N_ROWS, N_EMBD, N_HEAD, N_HEAD_KV, HEAD_DIM, N_CTX = 3, 64, 4, 2, 16, 8
TOLERANCE = dict(rtol=2e-3, atol=2e-3)


def _case(rng: np.random.Generator) -> dict:
    w = rng.standard_normal((N_HEAD * HEAD_DIM, N_EMBD)).astype(np.float32) / 8  # (N, K) as the file stores it
    return {"x": rng.standard_normal((N_ROWS, N_EMBD)).astype(np.float32), "w": w,
            "slots": np.array([0, 1, 1], np.int32), "positions": np.array([0, 0, 1], np.int32)}


def _reference(c: dict) -> np.ndarray:
    ref = NumpyBackend()
    q = c["x"] @ c["w"].T  # (n, n_head * head_dim)
    k = np.ascontiguousarray(q[:, :N_HEAD_KV * HEAD_DIM])
    v = k.copy()  # the probe stores the unrotated k as V
    cos, sin = ref.rope_tables(c["positions"], HEAD_DIM, 10000.0, 1.0)
    ref.rope_qk(q, k, cos, sin, N_HEAD, N_HEAD_KV, HEAD_DIM, HEAD_DIM, False)
    kc = np.zeros((1, 2, N_CTX, N_HEAD_KV * HEAD_DIM), DTYPES["f16"])
    vc = np.zeros_like(kc)
    ref.kv_store(kc, vc, 0, c["slots"], c["positions"], k, v)
    out = np.zeros_like(q)
    ref.attention(kc, vc, 0, q, c["slots"], c["positions"], N_HEAD, N_HEAD_KV, HEAD_DIM, out)
    return out


def probe(be) -> None:
    """Compute the probe's pass on `be` (a GgmlBackend); raises AssertionError when it is wrong."""
    c = _case(np.random.default_rng(7))
    w = np.ascontiguousarray(c["w"]).view(np.uint8).reshape(-1)
    handle = WeightHandle(w, 0, (N_EMBD, N_HEAD * HEAD_DIM))  # GGML_TYPE_F32
    kc = np.zeros((1, 2, N_CTX, N_HEAD_KV * HEAD_DIM), DTYPES["f16"])
    vc = np.zeros_like(kc)
    out = np.zeros((N_ROWS, N_HEAD * HEAD_DIM), np.float32)
    cos, sin = be.rope_tables(c["positions"], HEAD_DIM, 10000.0, 1.0)
    n = N_ROWS
    q, k, x, attn = ScratchRef("q", n), ScratchRef("k", n), ScratchRef("x", n), ScratchRef("attn", n)

    def build(r):
        r.set(x, r.input("x", c["x"]))
        be.matmul(x, handle, q)
        g, qt = be.g, r.get(q)
        r.set(k, g.ggml_cont(r.ctx, g.ggml_view_2d(r.ctx, qt, N_HEAD_KV * HEAD_DIM, n, qt.contents.nb[1], 0)))
        be.rope_kv_store(q, k, k, cos, sin, N_HEAD, N_HEAD_KV, HEAD_DIM, HEAD_DIM, False, kc, vc, 0,
                         c["slots"], c["positions"])
        be.attention(kc, vc, 0, q, c["slots"], c["positions"], N_HEAD, N_HEAD_KV, HEAD_DIM, attn)
        be.add(attn, attn, out)

    be.run_once(build)
    np.testing.assert_allclose(out, 2 * _reference(c), **TOLERANCE)
