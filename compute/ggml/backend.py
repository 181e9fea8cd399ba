"""The ggml backend: llama.cpp's own CPU kernels (8-bit activations on integer dot products, every
GGUF quant type, run-time ISA dispatch), planned and allocated like every other backend.

* Weights are read into buffers the plan sized (`weight_nbytes` is the file's size); ggml tensors
  point at them. Q4_K and Q6_K matrices of whole tiles are repacked on the way in, on CPUs with
  AVX-512 VNNI, into tiles of 16 rows in the same number of bytes (compute/ggml/csrc/tiles.c: one
  VNNI instruction then serves 16 weight rows; `tiled`); every other weight keeps the file's layout.
  KV caches and logits rows are planned host arrays, the same layouts as the NumPy backend's.
* A forward pass is one ggml graph (compute/ggml/graph.py), recorded once per batch shape and
  computed on a persistent ggml threadpool (`n_threads`; 0 = every core).
* The graph's activations live in the context's compute buffer, placed by ggml's allocator
  (gallocr). Fit measures that buffer with the same allocator on the worst-case pass (n_batch rows,
  n_outputs_max outputs; `compute_layout`), Load reserves exactly that many bytes, and every later
  pass is placed inside them: the allocator is never allowed to grow it.
* Batch invariance: the K-quant mat-mul (ours, tiled or not) and ggml's plain CPU matmul compute each
  (weight row, activation row) dot product with the same instructions whatever the batch (ggml's
  repacked GEMM layouts and the llamafile sgemm path, which are not, are never used: ggml's weights
  are plain tensors and ggml is built without llamafile); attention is specserve's custom op, one
  row at a time (compute/ggml/csrc/ops.c).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading

import numpy as np

from compute.backend import (
    Allocation,
    Backend,
    BufferSpec,
    DeviceMemory,
    HostKvCells,
    Ledger,
    PassRecording,
    Proj,
    carve_host,
    resident_zeros,
)
from compute.ggml.graph import (
    Placeholder,
    Recorder,
    ScratchRef,
    ScratchSlot,
    WeightHandle,
    attention_args,
    data_ptr,
)
from compute.ggml.lib import GetRowsArgs, MulMatArgs, QuantizeArgs, RopeArgs, load
from compute.quants import tensor_nbytes

K_QUANTS = (12, 14)  # Q4_K, Q6_K: specserve's multi-row mat-mul (compute/ggml/csrc/ops.c); others: ggml_mul_mat
QK_K = 256
TILE_ROWS = 16  # weight rows per tile of a repacked K-quant matrix (compute/ggml/csrc/tiles.c TILE)
GGML_TYPE_I8 = 24
SCRATCH_NAMES = ("x", "xn", "q", "k", "v", "attn", "o", "gate", "up", "sel", "seln")  # compute/llama.py's


class GgmlScratch(dict):
    """A context's compute scratch on this backend: the llama graph's scratch names (ScratchSlot), the
    graph buffer ggml's allocator holds (reserved at exactly `graph_bytes`) and the work area of
    ggml_graph_compute (`work`, a host array of the planned size)."""

    def __init__(self, libs, graph_bytes: int, work: np.ndarray | None):
        super().__init__({name: ScratchSlot(name) for name in SCRATCH_NAMES})
        self.libs, self.graph_bytes, self.work = libs, graph_bytes, work
        self.galloc = None
        if graph_bytes:
            self.galloc = reserve(libs, graph_bytes)

    def check_size(self) -> None:
        """The allocator's buffer is still the planned one (a pass that needed more would have grown it)."""
        got = self.libs.ggml.ggml_gallocr_get_buffer_size(self.galloc, 0)
        if got != self.graph_bytes:
            raise AssertionError(f"ggml's compute buffer is {got} bytes, the plan's {self.graph_bytes}")

    def free(self) -> None:
        if self.galloc:
            self.libs.ggml.ggml_gallocr_free(self.galloc)
            self.galloc = None


def reserve(libs, nbytes: int):
    """A gallocr over ggml's CPU buffer type whose buffer is exactly `nbytes` (a multiple of the
    alignment): reserved with a graph of one tensor of that size."""
    g = libs.ggml
    galloc = g.ggml_gallocr_new(libs.cpu_buffer_type())
    ctx = g.ggml_init(g.ggml_init_params(mem_size=4 * g.ggml_tensor_overhead() + g.ggml_graph_overhead_custom(8, False),
                                         mem_buffer=None, no_alloc=True))
    try:
        t = g.ggml_new_tensor_1d(ctx, 24, nbytes)  # GGML_TYPE_I8
        gf = g.ggml_new_graph_custom(ctx, 8, False)
        g.ggml_build_forward_expand(gf, t)
        if not g.ggml_gallocr_reserve(galloc, gf):
            g.ggml_gallocr_free(galloc)
            raise MemoryError(f"ggml could not allocate a compute buffer of {nbytes} bytes")
    finally:
        g.ggml_free(ctx)
    return galloc


class GgmlBackend(HostKvCells, Backend):
    """ggml's CPU backend; the "device" is host memory."""

    name = "ggml"
    replay_max_rows = sys.maxsize  # every pass is a ggml graph, kept per batch shape

    def __init__(self, ledger: Ledger | None = None, n_threads: int = 0, tiles: bool = True):
        super().__init__(ledger)
        self.libs = load()
        self.tiles = tiles and self.libs.vnni  # False: every weight in the file's layout (benchmarks compare)
        g = self.g = self.libs.ggml
        self.n_threads = n_threads or os.cpu_count() or 1
        params = g.ggml_threadpool_params_default(self.n_threads)
        self.threadpool = g.ggml_threadpool_new(ctypes.byref(params))
        self._lock = threading.RLock()  # one pass at a time per backend (the threadpool is shared)
        self._rec: Recorder | None = None
        self._scratch: GgmlScratch | None = None

    # ---- sizes ----
    def weight_nbytes(self, ggml_type, shape):
        return tensor_nbytes(ggml_type, tuple(shape))  # as stored in the file

    def scratch_row_multiple(self) -> int:
        return 1

    def row_cost(self, rows: int) -> float:
        # K-quant matrices (most GGUF files) go through the multi-row mat-mul, where a row beyond the first
        # costs a small share of the first (docs/benchmarks.md, bench/bench_verify.py); a pair's warm-up
        # measures its own cost (service/warmup.py), which replaces this model for served pairs
        return 1.0 + 0.15 * (rows - 1)

    def device_memory(self) -> DeviceMemory:
        from compute.numpy_backend import _host_memory

        total, free = _host_memory()
        return DeviceMemory(name=f"host CPU ({self.n_threads} threads, ggml)", total_bytes=total,
                            free_bytes=free, has_host=False)

    def compute_layout(self, model, n_batch: int, n_outputs_max: int):
        graph_bytes, work_bytes = self._measure(model, n_batch, n_outputs_max)
        return {"graph": ((graph_bytes,), "u8"), "work": ((work_bytes,), "u8")}

    def _measure(self, model, n_batch: int, n_outputs_max: int) -> tuple[int, int]:
        key = (tuple((n, int(t.ggml_type), t.shape) for n, t in model.tensors.items()), model.hparams,
               n_batch, n_outputs_max)
        return _measured(self, key, model)

    # ---- allocation ----
    def _allocate(self, spec: BufferSpec, layout):
        if spec.kind == "compute":
            (graph_shape, _), (work_shape, _) = layout["graph"], layout["work"]
            assert graph_shape[0] + work_shape[0] == spec.nbytes
            return GgmlScratch(self.libs, graph_shape[0], resident_zeros(work_shape[0]))
        if layout is None:
            return resident_zeros(spec.nbytes)
        return dict(carve_host(spec.nbytes, layout))

    def _release(self, array) -> None:
        if isinstance(array, GgmlScratch):
            array.free()

    def tiled(self, ggml_type, ne) -> bool:
        """Whether a weight of this type and ggml shape is repacked at load into tiles of 16 rows (the same
        bytes, arranged for the VNNI mat-mul: compute/ggml/csrc/tiles.c). Plan and load ask this one rule."""
        return (self.tiles and int(ggml_type) in K_QUANTS and len(ne) == 2
                and ne[0] % QK_K == 0 and ne[1] % TILE_ROWS == 0)

    def load_weight(self, alloc: Allocation, ggml_type, shape, raw):
        dst = alloc.array
        src = np.frombuffer(raw, dtype=np.uint8) if raw.dtype != np.uint8 else raw.reshape(-1)
        ne = tuple(reversed(tuple(shape)))
        if not self.tiled(ggml_type, ne):
            np.copyto(dst, src)
            return WeightHandle(dst, int(ggml_type), ne)
        src = np.ascontiguousarray(src)
        rc = self.libs.ops.specserve_repack_k(ctypes.c_int(int(ggml_type)), ctypes.c_void_p(src.ctypes.data),
                                              ctypes.c_void_p(dst.ctypes.data), ctypes.c_int64(ne[1]),
                                              ctypes.c_int64(ne[0]))
        assert rc == 0, f"repack of a {ne} K-quant weight refused"
        return WeightHandle(dst, int(ggml_type), ne, tiled=True)

    # ---- passes ----
    @contextlib.contextmanager
    def forward(self, scratch):
        with self._lock:
            self._scratch = scratch
            try:
                yield
            finally:
                self._scratch = None

    @contextlib.contextmanager
    def recording(self, r: Recorder):
        """Ops add their nodes to `r` inside the block (record_pass, and Fit's measurement)."""
        assert self._rec is None, "a pass is being recorded already"
        self._rec = r
        try:
            yield r
        finally:
            self._rec = None

    @contextlib.contextmanager
    def record_pass(self):
        """Record the llama graph's ops as one ggml graph; on leaving, place it in the scratch's compute
        buffer and compute it with the values seen while recording. `graph` is the placed pass."""
        rec, scratch = PassRecording(), self._scratch
        assert scratch is not None, "record_pass outside forward()"
        r = Recorder(self.libs)
        try:
            with self.recording(r):
                yield rec
            gf = r.build()
            if not self.g.ggml_gallocr_alloc_graph(scratch.galloc, gf):
                raise MemoryError("ggml could not place a pass in its compute buffer")
            scratch.check_size()
            p = r.bind(gf, self.n_threads, self.threadpool, scratch.work)
            p.fill(r.record_values())
            p.compute()
            rec.graph = p
        finally:
            r.close()

    def run_once(self, build) -> None:
        """Record the ops `build(recorder)` adds (outside any context: probes and op tests), place them
        in a compute buffer sized for them and compute them once; host outputs hold the results."""
        g, r = self.g, Recorder(self.libs)
        try:
            with self.forward(GgmlScratch(self.libs, 0, None)), self.recording(r):
                build(r)
            gf = r.build()
            sizes = (ctypes.c_size_t * 1)()
            tmp = g.ggml_gallocr_new(self.libs.cpu_buffer_type())
            try:
                g.ggml_gallocr_reserve_n_size(tmp, gf, None, None, sizes)
            finally:
                g.ggml_gallocr_free(tmp)
            scratch = GgmlScratch(self.libs, max(int(sizes[0]), 64), None)
            try:
                if not g.ggml_gallocr_alloc_graph(scratch.galloc, gf):
                    raise MemoryError("ggml could not place a graph")
                work = np.zeros(g.ggml_graph_plan(gf, self.n_threads, self.threadpool).work_size + 64, np.uint8)
                p = r.bind(gf, self.n_threads, self.threadpool, work)
                p.fill(r.record_values())
                p.compute()
            finally:
                scratch.free()
        finally:
            r.close()

    def replay_pass(self, graph, params):
        graph.fill(params)
        graph.compute()

    @property
    def r(self) -> Recorder:
        if self._rec is None:
            raise RuntimeError("the ggml backend runs ops only inside a recorded pass (record_pass)")
        return self._rec

    # ---- ops: each adds nodes to the pass being recorded ----
    def embed(self, table, ids, out):
        r = self.r
        ids_t = r.input("tokens", ids)
        if not table.tiled:
            r.set(out, self.g.ggml_get_rows(r.ctx, r.get(table), ids_t))
            return
        k = table.ne[0]
        args = GetRowsArgs(w=table.ptr, k=k, n_rows=len(ids), type=table.ggml_type)
        r.set(out, r.custom(args, {"ids": ids_t}, self.libs.get_rows_tiled, [r.get(table), ids_t], (k, len(ids))))

    def rms_norm(self, x, w, eps, out):
        r = self.r
        c = r.ctx
        r.set(out, self.g.ggml_mul(c, self.g.ggml_rms_norm(c, r.get(x), eps), r.get(w)))

    def head_rms_norm(self, x, w, n_heads, head_dim, eps, out):
        r, g = self.r, self.g
        c = r.ctx
        heads = g.ggml_reshape_3d(c, r.get(x), head_dim, n_heads, x.n)  # (n, n_heads, head_dim)
        y = g.ggml_mul(c, g.ggml_rms_norm(c, heads, eps), r.get(w))
        r.set(out, g.ggml_reshape_2d(c, y, head_dim * n_heads, x.n))

    def scale(self, x, s, out):
        r = self.r
        r.set(out, self.g.ggml_scale(r.ctx, r.get(x), s))

    def matmul(self, x, w, out, bias=None, pad=None):
        self.matmuls(x, [Proj(w, out, bias)])

    def matmuls(self, x, projs, pad=None):
        """Each p.out = x @ p.w^T [+ bias]; x is quantised to q8_K once for every K-quant matrix."""
        r, g = self.r, self.g
        xq = None
        for p in projs:
            if p.w.ggml_type in K_QUANTS and p.w.ne[0] % QK_K == 0:
                if xq is None:
                    xq = self._quantize_q8_k(x)
                y = self._mul_mat_k(p.w, xq, x.n)
            else:
                y = g.ggml_mul_mat(r.ctx, r.get(p.w), r.get(x))  # (N, n): each row of x against each row of W
            if p.bias is not None:
                y = g.ggml_add(r.ctx, y, r.get(p.bias))
            r.set(p.out, y)

    def _quantize_q8_k(self, x: ScratchRef):
        r = self.r
        xt = r.get(x)
        k = xt.contents.ne[0]
        args = QuantizeArgs(k=k, n_rows=x.n)
        return r.custom(args, {"x": xt}, self.libs.quantize_q8_k, [xt],
                        (k // QK_K * self.libs.q8_k_block_bytes, x.n), GGML_TYPE_I8)

    def _mul_mat_k(self, w: WeightHandle, xq, n_rows: int):
        r = self.r
        wt = r.get(w)
        k, n = w.ne
        args = MulMatArgs(w=w.ptr, n=n, k=k, n_rows=n_rows, type=w.ggml_type, tiled=w.tiled)
        return r.custom(args, {"xq": xq}, self.libs.mul_mat_k, [wt, xq], (n, n_rows))

    def add(self, a, b, out):
        r = self.r
        r.set(out, self.g.ggml_add(r.ctx, r.get(a), r.get(b)))

    def swiglu(self, gate, up, out):
        r = self.r
        r.set(out, self.g.ggml_swiglu_split(r.ctx, r.get(gate), r.get(up)))

    def geglu(self, gate, up, out):
        r = self.r
        r.set(out, self.g.ggml_geglu_split(r.ctx, r.get(gate), r.get(up)))

    def gather_rows(self, x, rows, out):
        r = self.r
        r.set(out, self.g.ggml_get_rows(r.ctx, r.get(x), r.input("outputs", rows)))

    def rope(self, x, cos, sin, n_heads, head_dim, rope_dim, neox):
        raise NotImplementedError("ggml's RoPE takes the positions: the graph calls rope_kv_store")

    def _rope(self, x: ScratchRef, cos, sin, n_heads: int, head_dim: int, rope_dim: int, neox: bool, tables: str):
        r = self.r
        args = RopeArgs(n_rows=x.n, n_heads=n_heads, head_dim=head_dim, rope_dim=rope_dim, neox=int(neox))
        xt, ct, st = r.get(x), r.input("cos" + tables, cos), r.input("sin" + tables, sin)
        return r.custom(args, {"x": xt, "cos": ct, "sin": st}, self.libs.rope, [xt, ct, st], (n_heads * head_dim, x.n))

    def kv_store(self, k_cache, v_cache, layer, slots, positions, k, v):
        r = self.r
        cells = r.cell_input(k_cache, slots, positions)
        for cache, val in ((k_cache, r.get(k) if isinstance(k, ScratchRef) else k),
                           (v_cache, r.get(v) if isinstance(v, ScratchRef) else v)):
            r.stores[(data_ptr(cache), layer)] = self.g.ggml_set_rows(r.ctx, r.cache_layer(cache, layer), val, cells)

    def rope_kv_store(self, q, k, v, cos, sin, n_head, n_head_kv, head_dim, rope_dim, neox, k_cache, v_cache,
                      layer, slots, positions, tables=""):
        r = self.r
        r.set(q, self._rope(q, cos, sin, n_head, head_dim, rope_dim, neox, tables))
        k_rot = self._rope(k, cos, sin, n_head_kv, head_dim, rope_dim, neox, tables)
        self.kv_store(k_cache, v_cache, layer, slots, positions, k_rot, v)

    def attention(self, k_cache, v_cache, layer, q, slots, positions, n_head, n_head_kv, head_dim, out,
                  scale=None, window=0):
        r = self.r
        if head_dim > self.libs.max_head_dim or n_head // n_head_kv > self.libs.max_group:
            raise ValueError(f"attention with head_dim {head_dim}, {n_head // n_head_kv} heads per KV head: "
                             f"the ggml backend takes head_dim <= {self.libs.max_head_dim}")
        kt, vt = r.stores[(data_ptr(k_cache), layer)], r.stores[(data_ptr(v_cache), layer)]
        qt, sl, pos = r.get(q), r.input("slots", slots), r.input("positions", positions)
        args = attention_args(q.n, n_head, n_head_kv, head_dim, k_cache, r.cache_layer(k_cache, layer).contents.data,
                              r.cache_layer(v_cache, layer).contents.data, n_head * head_dim, scale, window)
        r.set(out, r.custom(args, {"q": qt, "slots": sl, "pos": pos}, self.libs.attention, [qt, kt, vt, sl, pos],
                            (n_head * head_dim, q.n)))

    def to_host(self, x, n):
        return np.array(x[:n], dtype=np.float32, copy=True)

    def __del__(self):
        tp = getattr(self, "threadpool", None)
        if tp:
            self.g.ggml_threadpool_free(tp)
            self.threadpool = None


_MEASURED: dict = {}


def _measured(be: GgmlBackend, key, model) -> tuple[int, int]:
    """(graph bytes, work bytes) of a model's worst-case pass, measured once per model shape and batch."""
    got = _MEASURED.get((key, be.n_threads))
    if got is None:
        from compute.ggml.measure import measure_pass

        got = _MEASURED[(key, be.n_threads)] = measure_pass(be, model, key[2], key[3])
    return got


__all__ = ["GgmlBackend", "GgmlScratch", "Placeholder"]
