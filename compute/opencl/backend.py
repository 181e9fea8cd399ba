"""The OpenCL backend: PyOpenCL kernels (one op per file in kernels/) on any OpenCL 1.2 device.

Weights stay quantised in device memory for the types that have a kernel (Q4_0, Q4_1, Q8_0,
Q4_K, Q5_K, Q6_K, F16, F32); the other types (Q5_0, Q5_1, Q2_K, Q3_K, BF16) and every 1-D
tensor (norms, biases) are dequantised to float32 on load. `weight_nbytes` says which, so the
plan is what `allocate` takes: one cl.Buffer of exactly `spec.nbytes` per spec; the named
arrays of a layout are (buffer, element offset) views of it, and kernels take the offset as
an argument (no sub-buffers and no alignment padding, except the p_* parameter arrays below).

Synchronisation: one in-order queue; nothing in a forward pass waits for the device until
`to_host` reads the result back. Per-call host parameters (token ids, slots, positions, the
RoPE tables, gathered row indices) go up with non-blocking writes into planned p_* arrays of
the context's compute scratch (compute/opencl/staging.py); `forward(scratch)` points the ops
at a context's scratch and holds the backend's lock for the whole pass; `allocate` creates
the p_* sub-buffers (views, no new memory). Kernels and their builds: compute/opencl/programs.py.

Batch invariance: every kernel computes a row's result with the same arithmetic whatever
the number of rows; the matrix kernel has a mat-vec build (NR=1, used for one row) and
mat-mat builds (NR rows per work-item, `_tile_rows`: 2, 4, mat_rows, mat_rows + 1 for a
verify batch of 1 + 8 drafts, and on CPUs for prompt chunks the largest tile whose rows of x fit
the L1 data cache) whose per-row operation order is identical.

Fusion: the graph calls the fused operations by name (`matmuls`, `add_rms_norm`,
`rope_kv_store`) and each is one launch here (per layer 16 launches become 9; a PoCL launch
costs ~20 us);
every op launches when it is called, nothing is held back for the next call.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import warnings
from dataclasses import dataclass

import numpy as np
import pyopencl as cl
from gguf import GGMLQuantizationType as T

from compute.backend import (
    DTYPES,
    Allocation,
    AllocationError,
    Backend,
    BufferSpec,
    DeviceMemory,
    Ledger,
    PassRecording,
    Proj,
)
from compute.opencl import runtime
from compute.opencl.probe import PREFERENCE, runtime_of
from compute.opencl.programs import KERNEL_DIR, TUNINGS, BuildProfile, KernelBuildError, KernelCache, kernel_source
from compute.opencl.replay import PassGraph, replay
from compute.opencl.staging import ParamStaging
from compute.quants import dequantize, tensor_nbytes

__all__ = ["KERNEL_DIR", "TUNINGS", "CLArray", "CLWeight", "KernelBuildError", "OpenCLBackend", "cpu_threads",
           "kernel_source", "list_devices", "select_device"]

if not os.environ.get("PYOPENCL_COMPILER_OUTPUT"):
    # Intel's runtime logs a line for every successful build; a failed build raises with its log.
    # PYOPENCL_COMPILER_OUTPUT=1 shows the compilers' logs again.
    warnings.filterwarnings("ignore", category=cl.CompilerWarning)

# ggml type -> the suffix of its mul_mv_<suffix>_f32.cl / get_rows_<suffix>.cl kernels
KERNEL_TYPES = {
    T.Q4_0: "q4_0", T.Q4_1: "q4_1", T.Q8_0: "q8_0", T.Q4_K: "q4_k", T.Q5_K: "q5_k", T.Q6_K: "q6_k",
    T.F16: "f16", T.F32: "f32",
}
# Rows of x per work-item in the mat-mat build: a CPU keeps 2 x 8 16-wide accumulators in
# its 32 vector registers; a GPU work-item holds them in scalar registers, so fewer.
MAT_ROWS = {"cpu": 8, "gpu": 2}


def l1d_bytes(default: int = 32 << 10) -> int:
    """This machine's level-1 data cache per core (Linux sysfs), else `default`: the x rows a CPU
    device's work-item should keep in cache (_tile_rows)."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for d in sorted(os.listdir(base)):
            read = lambda f: open(os.path.join(base, d, f)).read().strip()  # noqa: E731
            if d.startswith("index") and read("level") == "1" and read("type") in ("Data", "Unified"):
                size = read("size")  # e.g. "32K"
                return int(size[:-1]) << 10 if size.endswith("K") else int(size)
    except (OSError, ValueError):
        pass
    return default


# ---- devices ----
def _all_devices() -> list[tuple[cl.Platform, cl.Device]]:
    out = []
    runtime.mark_queried()  # the CPU runtimes read their thread counts now
    try:
        platforms = cl.get_platforms()
    except cl.Error:  # no ICD loader / no platform
        return out
    for p in platforms:
        try:
            out += [(p, d) for d in p.get_devices()]
        except cl.Error:  # a platform without devices raises CL_DEVICE_NOT_FOUND
            continue
    return out


def list_devices() -> list[str]:
    """Every OpenCL device of every platform, as "index: platform / device"; the index is what
    `OpenCLBackend(device=...)` takes."""
    return [f"{i}: {p.name.strip()} / {d.name.strip()}" for i, (p, d) in enumerate(_all_devices())]


def select_device(device: str | int | None = None) -> tuple[cl.Platform, cl.Device]:
    """The device at an index of `list_devices()`, or the first whose platform or device name
    contains `device` (case-insensitive); None: the first in PREFERENCE order (a GPU, then
    Intel's CPU runtime, then PoCL). This does not probe: `compute.select.make_backend` does."""
    devs = _all_devices()
    if not devs:
        raise RuntimeError("no OpenCL device found: run scripts/setup.sh (it installs Intel's CPU runtime and PoCL)")
    if device is None:
        return min(devs, key=lambda pd: PREFERENCE.index(runtime_of(pd[0].name, bool(pd[1].type & cl.device_type.GPU),
                                                                    pd[1].name)))
    if isinstance(device, (int, np.integer)) or (isinstance(device, str) and device.strip().isdigit()):
        i = int(device)
        if not 0 <= i < len(devs):
            raise ValueError(f"OpenCL device index {i} out of range; devices: {list_devices()}")
        return devs[i]
    needle = device.lower()
    for p, d in devs:
        if needle in d.name.lower() or needle in p.name.lower() or needle in d.vendor.lower():
            return p, d
    raise ValueError(f"no OpenCL device matches {device!r}; devices: {list_devices()}")


# ---- arrays ----
class CLArray:
    """A device array: `shape` elements of `dtype` at element offset `off` of a cl.Buffer.

    `a[:n]` views the first n rows (the only slicing the llama graph does)."""

    __slots__ = ("buf", "off", "shape", "dtype")

    def __init__(self, buf: cl.Buffer, off: int, shape: tuple[int, ...], dtype):
        self.buf, self.off, self.shape, self.dtype = buf, int(off), tuple(shape), np.dtype(dtype)

    def __getitem__(self, key) -> "CLArray":
        if not (isinstance(key, slice) and key.start in (None, 0) and key.step in (None, 1)):
            raise TypeError(f"CLArray supports a[:n] only, not {key!r}")
        n = self.shape[0] if key.stop is None else min(max(int(key.stop), 0), self.shape[0])
        return CLArray(self.buf, self.off, (n,) + self.shape[1:], self.dtype)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __repr__(self) -> str:
        return f"CLArray(shape={self.shape}, dtype={self.dtype}, off={self.off})"


@dataclass(frozen=True)
class CLWeight:
    """A weight matrix in device memory as the file stores it: (rows, cols) of `ggml_type`."""

    buf: cl.Buffer
    ggml_type: T  # one of KERNEL_TYPES (F32 for the types dequantised on load)
    shape: tuple[int, int]


def _overlaps(a: CLArray, b: CLArray) -> bool:
    """Whether two views share any byte."""
    if a.buf is not b.buf:
        return False
    a0, b0 = a.off * a.dtype.itemsize, b.off * b.dtype.itemsize
    return a0 < b0 + b.nbytes and b0 < a0 + a.nbytes


def _check_rows(ids, n_rows: int, what: str) -> None:
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= n_rows):
        raise IndexError(f"{what} {int(ids.max()) if ids.max() >= n_rows else int(ids.min())} "
                         f"out of range for {n_rows} rows")


def _matmul_groups(x: CLArray, projs) -> list[list[Proj]]:
    """Consecutive projections of x in launch groups: up to three of one weight type whose
    outputs overlap neither x nor each other (one -DSEGS=3 launch writes them all at once)."""
    groups: list[list[Proj]] = []
    for p in projs:
        g = groups[-1] if groups else None
        if (g is not None and len(g) < 3 and g[0].w.ggml_type == p.w.ggml_type and not _overlaps(p.out, x)
                and not any(_overlaps(p.out, q.out) for q in g)):
            g.append(p)
        else:
            groups.append([p])
    return groups


def _cpu_row_cost(rows: int, mat_rows: int) -> float:
    """Relative cost of a forward pass over `rows` rows on a CPU runtime. PoCL, measured on SmolLM2
    (bench/bench_decode.py --invariance --opencl): the matmul tile is the smallest power of two
    >= rows, up to mat_rows (8): 1 row 21 ms, 2 rows 1.05x, 3-4 rows 1.27x, 5-8 rows 1.7x, each
    further 8 rows ~1.7x more."""
    tile = {1: 1.0, 2: 1.05, 4: 1.27, 8: 1.7}
    if rows == mat_rows + 1:  # one tile of mat_rows + 1 rows (_tile_rows)
        return tile[8] * rows / mat_rows
    if rows > mat_rows:
        return tile[8] * -(-rows // mat_rows)
    nr = 1
    while nr < rows:
        nr *= 2
    return tile.get(nr, 1.7)


def _tile_rows(n: int, mat_rows: int, K: int = 0, x_tile_bytes: int = 0) -> int:
    """Rows per work-item of a matmul over n rows of K: 1 (mat-vec) for one row; the smallest power
    of two >= n up to mat_rows; n itself for mat_rows + 1 rows (a verify batch of 1 + 8 drafts is
    one tile, not a full tile plus a second one holding one row); else mat_rows.

    x_tile_bytes (CPU devices), for batches of more than mat_rows + 1 rows (prompt chunks): a
    work-item streams its weight row once and reads its NR rows of x (NR * K floats) for every
    block; tiles whose x fits the L1 data cache (x_tile_bytes) prefilled faster on a Zen 4 (Intel's
    runtime, interleaved, bit-identical logits: the 1.1B-shaped Q4_K_M model's 64-token prompt
    1.14x, SmolLM2's 512-token prompt 1.10x), while verify-sized batches of 8-9 rows got slower
    (0.91-0.96x), so those keep the rule above. The tile is then the largest power of two whose x
    fits, when that is 4 rows or more (K = 2048 or 1536: 4 rows; K = 576: 8 as before; K = 5632:
    none fits 4, 8 as before). Any tile gives the same bits (mul_mv.clh)."""
    if n == mat_rows + 1:
        return n
    nr = 1
    while nr < min(n, mat_rows):
        nr *= 2
    if x_tile_bytes and K and n > mat_rows + 1:
        cap = 1
        while 2 * cap * K * 4 <= x_tile_bytes:
            cap *= 2
        if 4 <= cap < nr:
            nr = cap
    return nr


def _check_size(spec: BufferSpec, has_layout: bool, max_alloc: int) -> None:
    """AllocationError unless one buffer of spec.nbytes is possible here and addressable by the kernels."""
    if spec.nbytes > max_alloc:
        raise AllocationError(
            f"{spec.owner} {spec.tag}: {spec.nbytes} bytes exceed this device's largest buffer "
            f"({max_alloc} bytes); use a smaller n_ctx or n_parallel")
    if spec.nbytes >= 2**31 * (2 if has_layout else 4):
        raise AllocationError(  # kernels take element offsets as 32-bit ints
            f"{spec.owner} {spec.tag}: {spec.nbytes} bytes in one buffer is more than the OpenCL kernels "
            f"address; use a smaller n_ctx or n_parallel")


def _carve(buf: cl.Buffer, spec: BufferSpec, layout, align: int) -> dict[str, CLArray]:
    """The named arrays of a layout as views of one buffer of spec.nbytes: (buffer, element
    offset) views, except the p_* parameter arrays, sub-buffers at `align`-byte boundaries."""
    arrays, off = {}, 0
    for name, (shape, dt) in layout.items():
        dtype = DTYPES[dt]
        nbytes = math.prod(shape) * dtype.itemsize
        assert off % dtype.itemsize == 0, f"{name} at byte {off} is not {dt}-aligned"
        if name.startswith("p_"):  # a parameter array: the kernels take it without an offset
            assert off % align == 0 and nbytes % align == 0 and nbytes, f"{name}: not a {align}-byte aligned sub-buffer"
            try:
                sub = buf.get_sub_region(off, nbytes)
            except cl.Error as e:
                raise AllocationError(f"{spec.owner} {spec.tag}: sub-buffer {name} ({e})") from e
            arrays[name] = CLArray(sub, 0, shape, dtype)
        else:
            arrays[name] = CLArray(buf, off // dtype.itemsize, shape, dtype)
        off += nbytes
    assert off == spec.nbytes, f"layout of {off} bytes for a spec of {spec.nbytes}"
    return arrays


class OpenCLBackend(Backend):
    """Compute on an OpenCL device through PyOpenCL; see the module docstring."""

    name = "opencl"

    def __init__(self, ledger: Ledger | None = None, device: str | int | None = None,
                 mat_rows: int | None = None, tuning: str | None = None):
        """device: an index of `list_devices()` or a name substring (None: the first GPU, else
        the first device). mat_rows: rows per work-item of the mat-mat matmul (default MAT_ROWS
        by device type). tuning: build the kernels with another vendor's profile (TUNINGS);
        tests use it to run the GPU code paths (lanes splitting K, tree reductions) on PoCL."""
        super().__init__(ledger)
        self.platform, self.device = select_device(device)
        self.is_cpu = bool(self.device.type & cl.device_type.CPU)
        self.context = cl.Context([self.device])
        self.queue = cl.CommandQueue(self.context)  # in-order
        self.mat_rows = int(mat_rows or MAT_ROWS["cpu" if self.is_cpu else "gpu"])
        self.x_tile_bytes = l1d_bytes() if self.is_cpu else 0  # _tile_rows; 0: no cap
        profile = BuildProfile.of(self.platform, self.device, tuning)
        self.tuning, self.build_options = profile.tuning, profile.options
        self._lock = threading.RLock()
        self.kernels = KernelCache(self.context, self.device, self.queue, profile, self._lock)
        self.align = max(int(self.device.mem_base_addr_align) // 8, 4)  # sub-buffer alignment: bits -> bytes
        self.staging = ParamStaging(self.queue, self.align, self._lock)

    def kernel(self, fname: str, **defines):
        """The kernel of a file built with -D<k>=<v> for `defines`, and its work-group size."""
        return self.kernels.kernel(fname, **defines)

    # ---- per-call host parameters (compute/opencl/staging.py) ----
    def param_layout(self, hp, n_batch, n_outputs_max):
        return self.staging.layout(hp, n_batch, n_outputs_max)

    def forward(self, scratch):
        return self.staging.forward(scratch)

    # ---- launch replay (compute/opencl/replay.py) ----
    @contextlib.contextmanager
    def record_pass(self):
        rec = PassRecording()
        with self._lock:
            assert self.kernels.recording is None, "a pass is being recorded already"
            graph = PassGraph()
            self.kernels.recording = self.staging.recording = graph
            try:
                yield rec
            finally:
                self.kernels.recording = self.staging.recording = None
        rec.graph = graph

    def replay_pass(self, graph, params):
        with self._lock:
            replay(graph, self.queue, self.staging, params, _check_rows)

    # ---- sizes ----
    def weight_nbytes(self, ggml_type, shape):
        if len(shape) >= 2 and ggml_type in KERNEL_TYPES:
            return tensor_nbytes(ggml_type, tuple(shape))  # as stored in the file
        return math.prod(shape) * 4  # dequantised to float32 on load

    def row_cost(self, rows: int) -> float:
        return _cpu_row_cost(rows, self.mat_rows) if self.is_cpu else super().row_cost(rows)

    def scratch_row_multiple(self) -> int:
        return 1  # kernels take any row count; no padded tiles

    def device_memory(self) -> DeviceMemory:
        d = self.device
        total = int(d.global_mem_size)
        free = total
        try:  # cl_amd_device_attribute_query: [free KB, largest free block KB]
            free = int(d.get_info(cl.device_info.GLOBAL_FREE_MEMORY_AMD)[0]) * 1024
        except Exception:
            pass
        if self.is_cpu:
            from compute.numpy_backend import _host_memory
            free = min(total, _host_memory()[1])
        name = f"{d.name.strip()} ({self.platform.name.strip()}, OpenCL)"
        return DeviceMemory(name=name, total_bytes=total, free_bytes=free, has_host=not self.is_cpu)

    # ---- allocation ----
    def _allocate(self, spec: BufferSpec, layout):
        buf = None
        if spec.nbytes:
            _check_size(spec, layout is not None, int(self.device.max_mem_alloc_size))
            flags = cl.mem_flags.READ_WRITE
            if spec.device == "host":
                flags |= cl.mem_flags.ALLOC_HOST_PTR
            try:
                buf = cl.Buffer(self.context, flags, spec.nbytes)
                if layout is not None:  # weights are written by load_weight; zero the rest now (pages touched at load)
                    with self._lock:
                        cl.enqueue_fill_buffer(self.queue, buf, np.uint8(0), 0, spec.nbytes)
                        self.queue.finish()  # load time, not decode: surfaces an allocation failure here
                        self.staging.synced()
            except cl.Error as e:
                raise AllocationError(f"{spec.owner} {spec.tag}: cannot allocate {spec.nbytes} bytes ({e})") from e
        if layout is None:
            return CLArray(buf, 0, (spec.nbytes,), np.uint8)
        return _carve(buf, spec, layout, self.align)

    def _release(self, array) -> None:
        bufs = {id(a.buf): a.buf for a in (array.values() if isinstance(array, dict) else [array])
                if a.buf is not None}
        self.staging.forget(bufs.values())
        for b in sorted(bufs.values(), key=lambda b: b.size):  # sub-buffers before their parent
            b.release()  # OpenCL frees it once the commands that use it have finished

    def load_weight(self, alloc: Allocation, ggml_type, shape, raw):
        shape = tuple(shape)
        if len(shape) >= 2 and ggml_type in KERNEL_TYPES:
            data, kind = np.ascontiguousarray(raw).reshape(-1).view(np.uint8), ggml_type
        else:
            data, kind = np.ascontiguousarray(dequantize(raw, ggml_type, shape), dtype=np.float32), T.F32
        assert data.nbytes == alloc.spec.nbytes, \
            f"{alloc.spec.tag}: {data.nbytes} bytes for a spec of {alloc.spec.nbytes}"
        buf = alloc.array.buf
        with self._lock:
            cl.enqueue_copy(self.queue, buf, data, is_blocking=True)
        if len(shape) == 1:
            return CLArray(buf, 0, shape, np.float32)
        return CLWeight(buf, kind, (math.prod(shape[:-1]), shape[-1]))

    # ---- ops ----
    # Every op runs under the lock: an op that stages host parameters must enqueue its kernel
    # before another thread's op overwrites the staging buffer (after the enqueue, the in-order
    # queue keeps them apart). Every op launches when it is called.

    def embed(self, table: CLWeight, ids, out: CLArray) -> None:
        n, K = out.shape
        _check_rows(ids, table.shape[0], "token id")  # a device read out of bounds would not raise
        if self.kernels.recording is not None:
            self.kernels.recording.bound("ids", table.shape[0], "token id")
        with self._lock:
            ids_buf = self.staging.stage("ids", ids, np.int32)
            self._get_rows(KERNEL_TYPES[table.ggml_type], table.buf, 0, ids_buf, out, K, n)

    def gather_rows(self, x: CLArray, rows, out: CLArray) -> None:
        n, K = out.shape
        _check_rows(rows, x.shape[0], "row")
        if self.kernels.recording is not None:
            self.kernels.recording.bound("rows", x.shape[0], "row")
        with self._lock:
            self._get_rows("f32", x.buf, x.off, self.staging.stage("rows", rows, np.int32), out, K, n)

    def _get_rows(self, suffix, buf, w_off, ids_buf, out, K, n):
        qk = {"f16": 16, "f32": 16, "q4_k": 256, "q5_k": 256, "q6_k": 256}.get(suffix, 32)
        self.kernels.enqueue(self.kernel(f"get_rows_{suffix}.cl"), (K // qk + 1, n),
                      (buf, w_off, ids_buf, out.buf, out.off, K, n))

    def rms_norm(self, x: CLArray, w: CLArray, eps, out: CLArray) -> None:
        n, E = x.shape
        kl = self.kernel("rms_norm_f32.cl")
        self.kernels.enqueue(kl, (kl[1][0] * n,), (x.buf, x.off, w.buf, w.off, out.buf, out.off, E, float(eps), n))

    def add_rms_norm(self, a: CLArray, b: CLArray, x: CLArray, w: CLArray, eps, out: CLArray) -> None:
        """x = a + b and out = rms_norm(x) * w in one launch (add_rms_norm_f32.cl: the same
        tree sum as rms_norm_f32.cl, so out equals the two ops' result bit for bit)."""
        if a.shape != x.shape or any(_overlaps(out, t) for t in (a, b, x)):
            return super().add_rms_norm(a, b, x, w, eps, out)
        n, E = x.shape
        kl = self.kernel("add_rms_norm_f32.cl")
        self.kernels.enqueue(kl, (kl[1][0] * n,), (a.buf, a.off, b.buf, b.off, x.buf, x.off, w.buf, w.off,
                                            out.buf, out.off, E, float(eps), n))

    def head_rms_norm(self, x: CLArray, w: CLArray, n_heads, head_dim, eps, out: CLArray) -> None:
        """rms_norm_f32.cl over the rows' heads: (n, n_heads*head_dim) viewed as (n*n_heads, head_dim)."""
        n = x.shape[0]
        self.rms_norm(CLArray(x.buf, x.off, (n * n_heads, head_dim), x.dtype), w, eps,
                      CLArray(out.buf, out.off, (n * n_heads, head_dim), out.dtype))

    def scale(self, x: CLArray, s, out: CLArray) -> None:
        total = x.size
        self.kernels.enqueue(self.kernel("scale_f32.cl"), (-(-total // 16),),
                             (x.buf, x.off, out.buf, out.off, float(s), total))

    def matmul(self, x: CLArray, w: CLWeight, out: CLArray, bias=None, pad=None) -> None:
        self.matmuls(x, [Proj(w, out, bias)])

    def matmuls(self, x: CLArray, projs, pad=None) -> None:
        """Each run of up to three matrices of one weight type is one launch (`-DSEGS=3`: one
        segment of output rows per matrix); each output equals its own launch bit for bit."""
        for group in _matmul_groups(x, projs):
            for p in group:
                assert p.w.shape[1] == x.shape[1] and p.out.shape == (x.shape[0], p.w.shape[0]), \
                    f"matmul {x.shape} @ {p.w.shape}^T -> {p.out.shape}"
            self._launch_matmuls(x, group)

    def _launch_matmuls(self, x: CLArray, group: list[Proj]) -> None:
        """out_s = x (n, K) @ W_s^T (+ bias_s) for the (up to three) projections of group: one launch."""
        n, K = x.shape
        nr = _tile_rows(n, self.mat_rows, K, self.x_tile_bytes)
        segs = 1 if len(group) == 1 else 3
        kl = self.kernel(f"mul_mv_{KERNEL_TYPES[group[0].w.ggml_type]}_f32.cl", NR=nr, SEGS=segs)
        lx, outs = kl[1][0], kl[1][1]
        args, rows = [x.buf, x.off, K, n], 0
        for i in range(segs):
            p = group[min(i, len(group) - 1)]
            N = p.w.shape[0] if i < len(group) else 0  # a padding segment is empty
            b = p.bias if p.bias is not None else p.out
            args += [p.w.buf, p.out.buf, p.out.off, b.buf, b.off, int(p.bias is not None), N]
            rows += -(-N // outs) * outs
        self.kernels.enqueue(kl, (lx, rows, -(-n // nr)), tuple(args))

    def rope(self, x: CLArray, cos, sin, n_heads, head_dim, rope_dim, neox) -> None:
        with self._lock:
            cb, sb = self.staging.stage("cos", cos, np.float32), self.staging.stage("sin", sin, np.float32)
            self._launch_rope(x, n_heads, None, 0, cb, sb, head_dim, rope_dim, neox)

    def rope_qk(self, q: CLArray, k: CLArray, cos, sin, n_head, n_head_kv, head_dim, rope_dim, neox) -> None:
        """RoPE of q and k in one launch (rope_f32.cl over n_head + n_head_kv heads per row)."""
        if q.shape[0] != k.shape[0] or _overlaps(q, k):
            return super().rope_qk(q, k, cos, sin, n_head, n_head_kv, head_dim, rope_dim, neox)
        with self._lock:
            cb, sb = self.staging.stage("cos", cos, np.float32), self.staging.stage("sin", sin, np.float32)
            self._launch_rope(q, n_head, k, n_head_kv, cb, sb, head_dim, rope_dim, neox)

    def _launch_rope(self, x: CLArray, n_heads: int, x1: CLArray | None, h1: int, cb, sb, head_dim, rope_dim,
                     neox) -> None:
        """Rotate n_heads heads of x and h1 heads of x1 (none: h1 = 0) per row; cb, sb: staged tables."""
        x1 = x if x1 is None else x1
        n = x.shape[0]
        self.kernels.enqueue(self.kernel("rope_f32.cl"), (n * (n_heads + h1) * (rope_dim // 2),),
                      (x.buf, x.off, n_heads, x1.buf, x1.off, h1, cb, sb, head_dim, rope_dim, int(bool(neox)), n))

    def kv_store(self, k_cache: CLArray, v_cache: CLArray, layer, slots, positions, k: CLArray, v: CLArray) -> None:
        n_layer, n_slots, n_ctx, E = k_cache.shape
        n = k.shape[0]
        kl = self.kernel("kv_store_f32.cl", KV_F16=int(k_cache.dtype == np.float16))
        with self._lock:
            sb, pb = self.staging.stage("slots", slots, np.int32), self.staging.stage("positions", positions, np.int32)
            self.kernels.enqueue(kl, (n * E,), (k_cache.buf, k_cache.off, v_cache.buf, v_cache.off, k.buf, k.off,
                                         v.buf, v.off, sb, pb, int(layer), n_slots, n_ctx, E, n))

    def rope_kv_store(self, q: CLArray, k: CLArray, v: CLArray, cos, sin, n_head, n_head_kv, head_dim, rope_dim,
                      neox, k_cache: CLArray, v_cache: CLArray, layer, slots, positions, tables="") -> None:
        """rope_qk + kv_store in one launch (rope_kv_store_f32.cl); k is left unrotated. The tables
        are staged under their own keys (cos, sin or cos_swa, sin_swa), so a pass's two sets coexist."""
        n_layer, n_slots, n_ctx, E = k_cache.shape
        n = q.shape[0]
        if (k.shape != (n, E) or v.shape != (n, E) or any(_overlaps(q, t) for t in (k, v))
                or n_head_kv * head_dim != E):
            assert not tables, "the local layers' RoPE tables take the fused launch"
            return super().rope_kv_store(q, k, v, cos, sin, n_head, n_head_kv, head_dim, rope_dim, neox,
                                         k_cache, v_cache, layer, slots, positions)
        kl = self.kernel("rope_kv_store_f32.cl", KV_F16=int(k_cache.dtype == np.float16))
        with self._lock:
            cb = self.staging.stage("cos" + tables, cos, np.float32)
            sb = self.staging.stage("sin" + tables, sin, np.float32)
            slb, pb = self.staging.stage("slots", slots, np.int32), self.staging.stage("positions", positions, np.int32)
            self.kernels.enqueue(kl, (n * n_head * (rope_dim // 2) + n * E,),
                                 (q.buf, q.off, k.buf, k.off, v.buf, v.off, k_cache.buf, k_cache.off,
                                  v_cache.buf, v_cache.off, cb, sb, slb, pb, n_head, n_head_kv, head_dim, rope_dim,
                                  int(bool(neox)), int(layer), n_slots, n_ctx, n))

    def attention(self, k_cache: CLArray, v_cache: CLArray, layer, q: CLArray, slots, positions,
                  n_head, n_head_kv, head_dim, out: CLArray, scale=None, window=0) -> None:
        n_layer, n_slots, n_ctx, E = k_cache.shape
        n = q.shape[0]
        scale = float(np.float32(1.0 / math.sqrt(head_dim) if scale is None else scale))  # as NumPy rounds it
        kl = self.kernel("attn_f32.cl", HEAD_DIM=head_dim, KV_F16=int(k_cache.dtype == np.float16))
        with self._lock:
            sb, pb = self.staging.stage("slots", slots, np.int32), self.staging.stage("positions", positions, np.int32)
            self.kernels.enqueue(kl, (n * n_head,), (k_cache.buf, k_cache.off, v_cache.buf, v_cache.off, q.buf, q.off,
                                              out.buf, out.off, sb, pb, int(layer), n_slots, n_ctx, n_head,
                                              n_head_kv, scale, n, int(window)))

    def swiglu(self, gate: CLArray, up: CLArray, out: CLArray) -> None:
        total = gate.size
        self.kernels.enqueue(self.kernel("swiglu_f32.cl"), (-(-total // 16),),
                      (gate.buf, gate.off, up.buf, up.off, out.buf, out.off, total))

    def geglu(self, gate: CLArray, up: CLArray, out: CLArray) -> None:
        total = gate.size
        self.kernels.enqueue(self.kernel("geglu_f32.cl"), (-(-total // 16),),
                             (gate.buf, gate.off, up.buf, up.off, out.buf, out.off, total))

    def add(self, a: CLArray, b: CLArray, out: CLArray) -> None:
        total = a.size
        self.kernels.enqueue(self.kernel("add_f32.cl"), (-(-total // 16),),
                             (a.buf, a.off, b.buf, b.off, out.buf, out.off, total))

    def to_host(self, x: CLArray, n: int) -> np.ndarray:
        v = x[:n]
        out = np.empty(v.shape, v.dtype)
        with self._lock:
            if out.nbytes:
                cl.enqueue_copy(self.queue, out, v.buf, src_offset=v.off * v.dtype.itemsize, is_blocking=True)
            else:
                self.queue.finish()
            self.staging.synced()
        return out.astype(np.float32, copy=False)

    def kv_read(self, k_cache: CLArray, v_cache: CLArray, layer, slot, n):
        n_layer, n_slots, n_ctx, E = k_cache.shape
        cell0 = (layer * n_slots + slot) * n_ctx  # the slot's first cell in this layer
        k, v = (self.to_host(CLArray(c.buf, c.off + cell0 * E, (n, E), c.dtype), n) for c in (k_cache, v_cache))
        return k, v

    def kv_to_store(self, cache: CLArray, slot, start, store: CLArray, block, offset, n) -> None:
        self._copy_cells(cache, self._cell_byte(cache, slot, start), store, self._store_byte(store, block, offset), n,
                         to_store=True)

    def kv_from_store(self, cache: CLArray, slot, start, store: CLArray, block, offset, n) -> None:
        self._copy_cells(cache, self._cell_byte(cache, slot, start), store, self._store_byte(store, block, offset), n,
                         to_store=False)

    @staticmethod
    def _cell_byte(cache: CLArray, slot: int, start: int) -> int:
        """Byte offset of (layer 0, slot, cell start) in a cache (n_layer, n_slots, n_ctx, E)."""
        _, n_slots, n_ctx, E = cache.shape
        return (cache.off + (slot * n_ctx + start) * E) * cache.dtype.itemsize

    @staticmethod
    def _store_byte(store: CLArray, block: int, offset: int) -> int:
        """Byte offset of (block, layer 0, cell offset) in a store (n_blocks, n_layer, B, E)."""
        _, n_layer, B, E = store.shape
        return (store.off + (block * n_layer * B + offset) * E) * store.dtype.itemsize

    def _copy_cells(self, cache: CLArray, cache_byte: int, store: CLArray, store_byte: int, n: int,
                    to_store: bool) -> None:
        """One rectangular copy of n cells of every layer between a cache and a store block: rows are
        layers (pitch: a layer of the cache, a layer of the block), each row n cells of E elements."""
        n_layer, n_slots, n_ctx, E = cache.shape
        isz = cache.dtype.itemsize
        assert store.dtype == cache.dtype and store.shape[1] == n_layer and store.shape[3] == E
        if n <= 0:
            return
        region = (n * E * isz, n_layer, 1)
        cp, sp = n_slots * n_ctx * E * isz, store.shape[2] * E * isz  # row pitch: one layer
        cache_side = dict(origin=(cache_byte, 0, 0), pitches=(cp, cp * n_layer))
        store_side = dict(origin=(store_byte, 0, 0), pitches=(sp, sp * n_layer))
        src, dst = (cache_side, store_side) if to_store else (store_side, cache_side)
        with self._lock:
            cl.enqueue_copy(self.queue, store.buf if to_store else cache.buf, cache.buf if to_store else store.buf,
                            src_origin=src["origin"], dst_origin=dst["origin"], region=region,
                            src_pitches=src["pitches"], dst_pitches=dst["pitches"])
    def kv_copy(self, k_cache: CLArray, v_cache: CLArray, src_slot, dst_slot, n) -> None:
        """One device-to-device copy per layer and cache: a slot's cells are contiguous in a layer."""
        n_layer, n_slots, n_ctx, E = k_cache.shape
        assert 0 <= n <= n_ctx and src_slot != dst_slot
        if n == 0:
            return
        with self._lock:
            for c in (k_cache, v_cache):
                size = c.dtype.itemsize
                for layer in range(n_layer):
                    cell0 = (layer * n_slots) * n_ctx  # the layer's first cell
                    src = (c.off + (cell0 + src_slot * n_ctx) * E) * size
                    dst = (c.off + (cell0 + dst_slot * n_ctx) * E) * size
                    cl.enqueue_copy(self.queue, c.buf, c.buf, byte_count=n * E * size, src_offset=src,
                                    dst_offset=dst)

    def finish(self) -> None:
        """Wait for every queued command (benchmarks; the graph never needs it)."""
        with self._lock:
            self.queue.finish()
            self.staging.synced()

    def __repr__(self) -> str:
        return f"OpenCLBackend({self.device.name.strip()!r}, cpu={self.is_cpu})"


def cpu_threads() -> str:
    """The worker threads the CPU runtimes use in this process ("2", "all cores", ...)."""
    return runtime.threads_in_effect()
