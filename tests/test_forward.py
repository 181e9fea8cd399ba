"""The llama forward pass: against a naive float64 transcription of the maths, and batch invariance."""

from __future__ import annotations

import numpy as np
import pytest

from compute.gguf_model import ModelFile
from compute.llama import Batch
from compute.numpy_backend import NumpyBackend
from compute.quants import dequantize
from service.fit.factory import PairFactory, PairRequest
from service.fit.params import ContextParams, SpeculativeConfig
from tests.models import packaged_model_path
from tests.tiny_gguf import write_tiny_llama


def naive_forward(mf: ModelFile, tokens: list[int]) -> np.ndarray:
    """Logits (n, vocab) of a causal sequence, written plainly in float64 (the reference maths)."""
    hp = mf.hparams
    W = {n: dequantize(mf.raw(n), t.ggml_type, t.shape).astype(np.float64) for n, t in mf.tensors.items()}
    n, hd = len(tokens), hp.head_dim

    def norm(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + hp.rms_eps) * w

    def rope(x, n_heads):  # x (n, n_heads*hd)
        x = x.reshape(n, n_heads, hd).copy()
        half = hp.rope_dim // 2
        inv = hp.rope_base ** (-np.arange(0, hp.rope_dim, 2) / hp.rope_dim)
        ang = np.arange(n)[:, None] * inv[None, :]
        c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        if hp.rope_neox:
            a, b = x[..., :half].copy(), x[..., half:hp.rope_dim].copy()
            x[..., :half], x[..., half:hp.rope_dim] = a * c - b * s, a * s + b * c
        else:
            a, b = x[..., 0:hp.rope_dim:2].copy(), x[..., 1:hp.rope_dim:2].copy()
            x[..., 0:hp.rope_dim:2], x[..., 1:hp.rope_dim:2] = a * c - b * s, a * s + b * c
        return x

    x = W["token_embd.weight"][tokens]
    for i in range(hp.n_layer):
        p = f"blk.{i}."
        h = norm(x, W[p + "attn_norm.weight"])
        q, k, v = h @ W[p + "attn_q.weight"].T, h @ W[p + "attn_k.weight"].T, h @ W[p + "attn_v.weight"].T
        if hp.qkv_bias:
            q, k, v = q + W[p + "attn_q.bias"], k + W[p + "attn_k.bias"], v + W[p + "attn_v.bias"]
        q, k, v = rope(q, hp.n_head), rope(k, hp.n_head_kv), v.reshape(n, hp.n_head_kv, hd)
        g = hp.n_head // hp.n_head_kv
        out = np.zeros((n, hp.n_head, hd))
        for hh in range(hp.n_head):
            kv = hh // g
            sc = q[:, hh] @ k[:, kv].T / np.sqrt(hd)
            sc[np.triu_indices(n, 1)] = -np.inf
            pr = np.exp(sc - sc.max(-1, keepdims=True))
            pr /= pr.sum(-1, keepdims=True)
            out[:, hh] = pr @ v[:, kv]
        x = x + out.reshape(n, -1) @ W[p + "attn_output.weight"].T
        h = norm(x, W[p + "ffn_norm.weight"])
        gate, up = h @ W[p + "ffn_gate.weight"].T, h @ W[p + "ffn_up.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ W[p + "ffn_down.weight"].T
    head = W["token_embd.weight"] if hp.tied_output else W["output.weight"]
    return norm(x, W["output_norm.weight"]) @ head.T


@pytest.mark.parametrize("arch,tied", [("llama", True), ("llama", False), ("qwen2", True)])
@pytest.mark.parametrize("row_tile", [0, 1, 8])
def test_graph_matches_the_naive_maths(tmp_path, arch, tied, row_tile):
    path = write_tiny_llama(tmp_path / "m.gguf", arch=arch, tied=tied, n_layer=2, seed=5, scale=2.0)
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


@pytest.fixture(scope="module")
def real_ctx():
    be = NumpyBackend(n_threads=1)  # default row_tile
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
