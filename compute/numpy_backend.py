"""The NumPy reference backend: weights dequantised to float32, one BLAS call shape per matrix.

Batch invariance: OpenBLAS picks a different kernel for a one-row product (gemv) than for a
many-row one (gemm), and the two round differently. `row_tile` chooses:
  0  one BLAS call per matmul: fastest, NOT batch invariant (a verify row may differ from the
     same token decoded alone in the last bits);
  1  one gemv per row: invariant by construction, but batches cost as much as their rows;
  T  tiles of exactly T rows (a short last tile is padded into scratch): one gemm call shape
     per weight matrix, invariant as long as OpenBLAS's result for a row does not depend on
     the row's place in the tile (a test checks it).
The default and the measured cost of each are in docs/batch-invariance.md.
"""

from __future__ import annotations

import math
import os

import numpy as np

from compute.backend import DTYPES, Allocation, Backend, BufferSpec, DeviceMemory, HostKvCells, Ledger, resident_zeros
from compute.quants import dequantize

DEFAULT_ROW_TILE = 1  # batch invariant and the fastest decode; 8 for many streams, see docs/batch-invariance.md


def _host_memory() -> tuple[int, int]:
    """(total, available) bytes of this machine's memory, from /proc/meminfo."""
    info = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                k, v = line.split(":", 1)
                info[k] = int(v.split()[0]) * 1024
    except OSError:
        return 8 << 30, 4 << 30
    return info.get("MemTotal", 8 << 30), info.get("MemAvailable", info.get("MemFree", 4 << 30))


class NumpyBackend(HostKvCells, Backend):
    """Reference backend on the host CPU; the "device" is host memory."""

    name = "numpy"

    def __init__(self, ledger: Ledger | None = None, n_threads: int | None = None, row_tile: int = DEFAULT_ROW_TILE):
        super().__init__(ledger)
        self.row_tile = row_tile
        self.n_threads = n_threads
        if n_threads:
            from threadpoolctl import threadpool_limits

            threadpool_limits(n_threads)  # process-wide, once: per-call limits cost more than a decode op

    # ---- sizes ----
    def weight_nbytes(self, ggml_type, shape):
        return math.prod(shape) * 4  # dequantised to float32

    def scratch_row_multiple(self) -> int:
        return max(self.row_tile, 1)

    def row_cost(self, rows: int) -> float:
        # measured on SmolLM2, one BLAS thread (docs/batch-invariance.md): tiles cost whole tiles;
        # row_tile 1 pays a gemv per row over a per-call part (attention, norms): 1.66x for 2 rows,
        # 3.06x for 5, 4.64x for 9; row_tile 0 pays ~1.9x for gemm over gemv, then ~0.09 per row
        t = self.row_tile
        if t > 1:
            return float(-(-rows // t))
        if t == 1:
            return 1.0 if rows == 1 else 1.25 + 0.42 * (rows - 1)
        return 1.0 if rows == 1 else 1.9 + 0.09 * (rows - 2)

    def device_memory(self) -> DeviceMemory:
        total, free = _host_memory()
        return DeviceMemory(name=f"host CPU ({os.cpu_count()} cores, NumPy)", total_bytes=total,
                            free_bytes=free, has_host=False)

    # ---- allocation ----
    def _allocate(self, spec: BufferSpec, layout):
        raw = resident_zeros(spec.nbytes)
        if layout is None:
            return raw
        arrays, off = {}, 0
        for name, (shape, dt) in layout.items():
            dtype = DTYPES[dt]
            n = math.prod(shape) * dtype.itemsize
            arrays[name] = raw[off:off + n].view(dtype).reshape(shape)
            off += n
        assert off == spec.nbytes, f"layout of {off} bytes for a spec of {spec.nbytes}"
        return arrays

    def load_weight(self, alloc: Allocation, ggml_type, shape, raw):
        w = dequantize(raw, ggml_type, shape)
        if w.ndim == 2:  # (out, in) in the file -> (in, out): x @ W is the fast BLAS layout
            w = w.T
        dst = alloc.array.view(np.float32).reshape(w.shape)
        np.copyto(dst, w)
        return dst

    # ---- ops ----
    def embed(self, table, ids, out):
        np.copyto(out, table[:, ids].T)  # table is (n_embd, n_vocab)

    def rms_norm(self, x, w, eps, out):
        ms = np.mean(np.square(x), axis=-1, keepdims=True)
        np.multiply(x, 1.0 / np.sqrt(ms + np.float32(eps)), out=out)
        np.multiply(out, w, out=out)

    def head_rms_norm(self, x, w, n_heads, head_dim, eps, out):
        n = x.shape[0]
        self.rms_norm(x.reshape(n * n_heads, head_dim), w, eps, out.reshape(n * n_heads, head_dim))

    def scale(self, x, s, out):
        np.multiply(x, np.float32(s), out=out)

    def matmul(self, x, w, out, bias=None, pad=None):
        n, t = x.shape[0], self.row_tile
        if t == 0:  # not batch invariant: one BLAS call for the whole batch
            np.matmul(x, w, out=out)
        elif t == 1:
            for i in range(n):
                np.dot(x[i], w, out=out[i])
        else:
            full = n - n % t
            for a in range(0, full, t):
                np.matmul(x[a:a + t], w, out=out[a:a + t])
            if full < n:
                r = n - full
                pin, pout = pad[0][:, :x.shape[1]], pad[1][:, :w.shape[1]]
                pin[:r] = x[full:]
                np.matmul(pin, w, out=pout)
                out[full:] = pout[:r]
        if bias is not None:
            out += bias

    def rope(self, x, cos, sin, n_heads, head_dim, rope_dim, neox):
        n = x.shape[0]
        h = x.reshape(n, n_heads, head_dim)
        c, s = cos[:, None, :], sin[:, None, :]
        if neox:
            half = rope_dim // 2
            a, b = h[..., :half].copy(), h[..., half:rope_dim].copy()
            h[..., :half] = a * c - b * s
            h[..., half:rope_dim] = a * s + b * c
        else:
            a, b = h[..., 0:rope_dim:2].copy(), h[..., 1:rope_dim:2].copy()
            h[..., 0:rope_dim:2] = a * c - b * s
            h[..., 1:rope_dim:2] = a * s + b * c

    def kv_store(self, k_cache, v_cache, layer, slots, positions, k, v):
        cells = positions % k_cache.shape[2]  # the position itself, or its place in a local layer's ring
        k_cache[layer, slots, cells] = k
        v_cache[layer, slots, cells] = v

    def attention(self, k_cache, v_cache, layer, q, slots, positions, n_head, n_head_kv, head_dim, out,
                  scale=None, window=0):
        g = n_head // n_head_kv
        scale = np.float32(1.0 / math.sqrt(head_dim) if scale is None else scale)
        for i in range(q.shape[0]):  # one row at a time: a row's result cannot depend on the batch
            end = int(positions[i]) + 1
            start = max(0, end - window) if window else 0
            L = end - start
            R = k_cache.shape[2]
            cells = slice(start, end) if end <= R else np.arange(start, end) % R  # a local layer's ring wrapped
            K = k_cache[layer, slots[i]][cells].astype(np.float32, copy=False).reshape(L, n_head_kv, head_dim)
            V = v_cache[layer, slots[i]][cells].astype(np.float32, copy=False).reshape(L, n_head_kv, head_dim)
            qh = q[i].reshape(n_head_kv, g, head_dim)
            sc = np.matmul(qh, K.transpose(1, 2, 0)) * scale  # (n_head_kv, g, L)
            sc -= sc.max(axis=-1, keepdims=True)
            np.exp(sc, out=sc)
            sc /= sc.sum(axis=-1, keepdims=True)
            out[i] = np.matmul(sc, V.transpose(1, 0, 2)).reshape(-1)  # (n_head_kv, g, head_dim)

    def swiglu(self, gate, up, out):
        # silu(g) = g * sigmoid(g) = g / (1 + exp(-g))
        np.multiply(gate, up / (1.0 + np.exp(-gate)), out=out)

    def geglu(self, gate, up, out):
        g = gate.astype(np.float32, copy=False)
        inner = np.float32(math.sqrt(2.0 / math.pi)) * (g + np.float32(0.044715) * g * g * g)
        np.multiply(np.float32(0.5) * g * (np.float32(1.0) + np.tanh(inner)), up, out=out)

    def add(self, a, b, out):
        np.add(a, b, out=out)

    def gather_rows(self, x, rows, out):
        np.take(x, rows, axis=0, out=out)

    def to_host(self, x, n):
        return np.array(x[:n], dtype=np.float32, copy=True)
