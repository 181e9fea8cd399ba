"""One ggml graph per forward pass: recorded from the llama graph's op calls, then computed as a whole.

The llama graph (compute/llama.py) calls the backend's ops on scratch arrays (`s["x"][:n]`, ...).
On this backend those arrays are names (`ScratchRef`): while a pass is recorded, each op adds ggml
nodes and binds its output name to the node that now holds it; reading a name gives its latest
node. Buffers that exist outside the graph (weights, KV caches, the logits rows) are ggml tensors
whose data points at the planned memory, so ggml's allocator (gallocr) places only the graph's own
activations and inputs, in the context's planned compute buffer.

A recorded `Pass` is computed once when recorded and again, for every later batch of the same shape
(rows, outputs), with new inputs: token ids, positions, slots, KV cells and output rows.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass, field

import numpy as np

from compute.ggml.lib import AttentionArgs, Libs

CHUNK_TENSORS = 1024  # tensor metadata per ggml context; a pass takes as many contexts as it needs
OP_TENSORS = 8  # the most tensors made with one `Recorder.ctx` (one op of the backend, or one input)
FAKE_PTR = 1 << 20  # the data of a placeholder (plan-time measurement): never read, never written


@dataclass(frozen=True)
class ScratchRef:
    """The first `n` rows of the compute scratch array `name`: a name the recorder binds to nodes."""

    name: str
    n: int


class ScratchSlot:
    """A compute scratch array of the ggml backend: slicing it gives a ScratchRef."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __getitem__(self, key) -> ScratchRef:
        assert isinstance(key, slice) and key.start is None and key.step is None, "rows [:n] only"
        return ScratchRef(self.name, int(key.stop))


@dataclass(frozen=True)
class Placeholder:
    """A planned host array that does not exist yet (Fit measures graphs before anything is allocated):
    shape and dtype only. Slicing its rows gives another placeholder."""

    shape: tuple[int, ...]
    dtype: np.dtype
    ptr: int = FAKE_PTR  # distinct placeholders need distinct fake addresses (K and V are told apart by them)

    def __getitem__(self, key) -> "Placeholder":
        assert isinstance(key, slice) and key.start is None and key.step is None
        return Placeholder((min(int(key.stop), self.shape[0]),) + self.shape[1:], self.dtype, self.ptr)


def data_ptr(a) -> int:
    """The address of a host array (or a placeholder's fake one)."""
    return a.ptr if isinstance(a, Placeholder) else a.ctypes.data


@dataclass(frozen=True)
class WeightHandle:
    """A weight in host memory (any ggml type): its bytes (None at plan time), type and ggml shape
    ne (ne0 = the row length); the file's layout unless `tiled`."""

    raw: np.ndarray | None
    ggml_type: int
    ne: tuple[int, ...]
    tiled: bool = False  # raw holds the rows repacked into tiles of 16 (compute/ggml/csrc/tiles.c), not the file's

    @property
    def ptr(self) -> int:
        return FAKE_PTR if self.raw is None else self.raw.ctypes.data


GGML_F32, GGML_F16, GGML_I32 = 0, 1, 26
GGML_ROPE_NORMAL, GGML_ROPE_NEOX = 0, 2
KV_GGML_TYPE = {np.dtype(np.float32): GGML_F32, np.dtype(np.float16): GGML_F16}


@dataclass
class Pass:
    """A recorded, allocated forward pass: inputs to fill, then one ggml_graph_compute."""

    libs: Libs
    ctxs: list[int]  # ggml contexts holding the pass's tensor metadata
    graph: object
    cplan: object
    inputs: dict[str, np.ndarray]  # name -> numpy view of the input tensor's data
    cells: dict[str, int]  # input name -> cells per slot of the cache it addresses (cell = slot * n + pos % n)
    keep: list = field(default_factory=list)  # ctypes objects the graph's custom ops point at

    def fill(self, params: dict[str, np.ndarray]) -> None:
        """Write this batch's host parameters into the pass's input tensors."""
        for name, view in self.inputs.items():
            if name in self.cells:
                n = self.cells[name]
                np.multiply(params["slots"], n, out=view)
                view += params["positions"] % n
            else:
                view[...] = params[name]

    def compute(self) -> None:
        status = self.libs.ggml.ggml_graph_compute(self.graph, ctypes.byref(self.cplan))
        if status != 0:
            raise RuntimeError(f"ggml_graph_compute failed with status {status}")

    def __del__(self):
        free_all(self.libs.ggml, self.ctxs)


def free_all(g, ctxs: list[int]) -> None:
    """Free ggml metadata contexts (and forget them)."""
    while ctxs:
        g.ggml_free(ctxs.pop())


class Recorder:
    """Builds one pass's ggml graph from the llama graph's op calls (see the module docstring)."""

    def __init__(self, libs: Libs):
        self.g = libs.ggml
        self.libs = libs
        self.ctxs: list[int] = []  # ggml contexts holding the pass's tensor metadata, filled in turn
        self.n_tensors = 0  # an upper bound of the tensors made so far
        self._room = 0  # tensors the newest context can still take
        self.values: dict[str, object] = {}  # scratch name -> the node holding its rows now
        self.outputs: list = []  # nodes the graph must compute (KV stores, logits)
        self.inputs: dict[str, tuple[object, np.ndarray]] = {}  # name -> (tensor, host values at record)
        self.custom_args: list[tuple[ctypes.Structure, dict]] = []  # custom ops' args: pointer field -> tensor
        self.weights: dict[int, object] = {}  # id(WeightHandle) -> tensor
        self.caches: dict[tuple[int, int], object] = {}  # (cache address, layer) -> 2D view tensor
        self.stores: dict[tuple[int, int], object] = {}  # (cache address, layer) -> its set_rows node
        self.cells: dict[str, int] = {}  # KV cell inputs: name -> cells per slot (Pass.cells)

    @property
    def ctx(self) -> int:
        """A metadata context with room for one more op's tensors."""
        if not self.ctxs or self._room < OP_TENSORS:
            self.ctxs.append(self._new_ctx(CHUNK_TENSORS * self.g.ggml_tensor_overhead()))
            self._room = CHUNK_TENSORS
        self._room -= OP_TENSORS
        self.n_tensors += OP_TENSORS
        return self.ctxs[-1]

    def _new_ctx(self, mem: int) -> int:
        ctx = self.g.ggml_init(self.g.ggml_init_params(mem_size=mem, mem_buffer=None, no_alloc=True))
        if not ctx:
            raise MemoryError("ggml_init failed for a pass's metadata")
        return ctx

    # ---- values ----
    def get(self, ref):
        if isinstance(ref, ScratchRef):
            t = self.values[ref.name]
            assert t.contents.ne[1] == ref.n, f"{ref.name}: {t.contents.ne[1]} rows bound, {ref.n} read"
            return t
        if isinstance(ref, WeightHandle):
            return self.weight(ref)
        raise TypeError(f"not a value of this pass: {type(ref).__name__}")

    def set(self, out, t) -> None:
        """Bind an op's result to its `out`: a scratch name, or host rows (the logits) it is written into."""
        if isinstance(out, ScratchRef):
            self.values[out.name] = t
            return
        assert t.contents.ne[1] == out.shape[0] and t.contents.ne[0] == out.shape[1], "host rows of another shape"
        t.contents.data = data_ptr(out)  # placed already: gallocr leaves it where it is
        self.g.ggml_set_output(t)
        self.outputs.append(t)

    def weight(self, w: WeightHandle):
        t = self.weights.get(id(w))
        if t is None:
            g = self.g
            t = g.ggml_new_tensor(self.ctx, w.ggml_type, len(w.ne), (ctypes.c_int64 * len(w.ne))(*w.ne))
            t.contents.data = w.ptr
            self.weights[id(w)] = t
        return t

    def input(self, name: str, values: np.ndarray):
        """An input of the pass: int32 rows (token ids, positions, slots, cells, output rows) or float32
        tables (RoPE's cos, sin: (rows, rope_dim / 2))."""
        got = self.inputs.get(name)
        if got is None:
            values = np.asarray(values)
            ggml_type = GGML_F32 if values.dtype == np.float32 else GGML_I32
            ne = tuple(reversed(values.shape))
            t = self.g.ggml_new_tensor(self.ctx, ggml_type, len(ne), (ctypes.c_int64 * len(ne))(*ne))
            self.g.ggml_set_input(t)
            got = self.inputs[name] = (t, values.astype(np.float32 if ggml_type == GGML_F32 else np.int32))
        return got[0]

    def custom(self, args: ctypes.Structure, pointers: dict, fun, srcs: list, ne: tuple[int, int],
               ggml_type: int = 0):
        """A node computed by one of specserve's ops (`fun`) over `srcs` (which it reads, so the graph
        computes them first), of shape ne (float32 unless `ggml_type`); its data and `pointers`' tensors'
        data are written into `args` once the graph is placed."""
        g = self.g
        arr = (ctypes.POINTER(g.ggml_tensor) * len(srcs))(*srcs)
        node = g.ggml_custom_4d(self.ctx, ggml_type, ne[0], ne[1], 1, 1, arr, len(srcs), fun, -1,
                                ctypes.cast(ctypes.pointer(args), ctypes.c_void_p))
        self.custom_args.append((args, dict(pointers, out=node)))
        return node

    def cell_input(self, cache, slots: np.ndarray, positions: np.ndarray):
        """The rows' cells in a cache (n_layer, n_slots, n, n_embd_kv): slot * n + position % n (a local
        layer's ring when n is its window's cells), one input per n."""
        n = cache.shape[2]
        name = f"cells_{n}"
        self.cells[name] = n
        return self.input(name, np.asarray(slots) * n + np.asarray(positions) % n)

    def cache_layer(self, cache, layer: int):
        """Layer `layer` of a KV cache (n_layer, n_slots, n_ctx_slot, n_embd_kv) as a 2D tensor
        (ne0 = n_embd_kv, ne1 = n_slots * n_ctx_slot)."""
        key = (data_ptr(cache), layer)
        t = self.caches.get(key)
        if t is None:
            n_layer, n_slots, n_ctx_slot, n_embd_kv = cache.shape
            t = self.g.ggml_new_tensor_2d(self.ctx, KV_GGML_TYPE[np.dtype(cache.dtype)], n_embd_kv,
                                          n_slots * n_ctx_slot)
            t.contents.data = data_ptr(cache) + layer * n_slots * n_ctx_slot * n_embd_kv * cache.dtype.itemsize
            self.caches[key] = t
        return t

    # ---- finishing ----
    def build(self):
        """The graph over everything the pass must compute: every KV store and the logits."""
        g = self.g
        size = self.n_tensors + 1  # >= the nodes and leafs the graph can hold
        self.ctxs.append(self._new_ctx(g.ggml_graph_overhead_custom(size, False)))
        gf = g.ggml_new_graph_custom(self.ctxs[-1], size, False)
        for t in list(self.stores.values()) + self.outputs:
            g.ggml_build_forward_expand(gf, t)
        return gf

    def bind(self, gf, threads: int, threadpool, work: np.ndarray | None) -> Pass:
        """After gallocr placed the graph: numpy views of the inputs, the attention nodes' pointers,
        and the compute plan (its work area is `work`, which must be large enough)."""
        g = self.g
        views = {}
        for name, (t, values) in self.inputs.items():
            if not t.contents.data:  # no node the graph computes reads it (a pass without outputs)
                continue
            ctype = ctypes.c_float if values.dtype == np.float32 else ctypes.c_int32
            views[name] = np.ctypeslib.as_array(ctypes.cast(t.contents.data, ctypes.POINTER(ctype)), values.shape)
        for args, tensors in self.custom_args:
            for field_name, t in tensors.items():
                setattr(args, field_name, t.contents.data)
        cplan = g.ggml_graph_plan(gf, threads, threadpool)
        if work is None or cplan.work_size > work.nbytes:
            raise AssertionError(f"the pass needs {cplan.work_size} work bytes, the plan has "
                                 f"{0 if work is None else work.nbytes}")
        cplan.work_data = ctypes.cast(work.ctypes.data, ctypes.POINTER(ctypes.c_uint8))
        p = Pass(self.libs, self.ctxs, gf, cplan, views, self.cells, keep=[a for a, _ in self.custom_args])
        self.ctxs = []  # the pass owns the metadata now
        return p

    def record_values(self) -> dict[str, np.ndarray]:
        """The host parameters seen while recording, to compute the recorded pass once."""
        return {name: values for name, (_, values) in self.inputs.items()}

    def close(self) -> None:
        free_all(self.g, self.ctxs)


def attention_args(n_rows: int, n_head: int, n_head_kv: int, head_dim: int, cache, kp: int, vp: int,
                   n_embd_q: int, scale: float | None = None, window: int = 0) -> AttentionArgs:
    """The sizes of an attention node; its tensor pointers are filled once the graph is placed."""
    n_layer, n_slots, n_ctx_slot, n_embd_kv = cache.shape
    return AttentionArgs(k=kp, v=vp, q_row=n_embd_q, kv_row=n_embd_kv, n_rows=n_rows, n_head=n_head,
                         n_head_kv=n_head_kv, head_dim=head_dim, n_ctx_slot=n_ctx_slot,
                         kv_f16=int(np.dtype(cache.dtype) == np.float16),
                         scale=1.0 / math.sqrt(head_dim) if scale is None else scale, window=window)
