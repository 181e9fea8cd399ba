"""The backend interface shared by NumPy (reference) and OpenCL, and the allocation ledger.

Every buffer a backend holds is described by a `BufferSpec` (owner, kind, tag, device,
bytes). The planner produces BufferSpecs; `Backend.allocate` takes one, allocates exactly
`spec.nbytes`, and records it in the `Ledger`. That is how "fit equals load" is checked:
the ledger's entries for a pair are compared with the plan's, item by item.

The forward pass (compute/llama.py) is written once against the op methods below. Arrays
are backend-specific (numpy.ndarray, or the OpenCL backend's device array); the graph only
slices their leading (row) dimension with `a[:n]` and passes them back to the backend.

Fused operations (`matmuls`, `add_rms_norm`, `rope_qk`) are methods with their own names,
called by the graph where it does several things at once; the base class builds each from
the plain ops, and a backend that has a fused kernel overrides it with the same arithmetic.
"""

from __future__ import annotations

import contextlib
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Sequence, get_args

import numpy as np

# Closed vocabularies of a plan, each spelled once. Plain strings (logs, the proto's Buffer
# fields and the ledger compare them as text); a type checker holds the code to these sets.
Owner = Literal["target", "draft"]  # which model of the pair a buffer belongs to
BufferKind = Literal["weights", "kv_cache", "outputs", "compute", "prompt_cache", "ngram_cache"]
Placement = Literal["device", "host"]  # the backend's memory, or a separate host memory
DType = Literal["f32", "f16", "i32", "u8"]  # element types of the per-context arrays (layouts)
KvType = Literal["f32", "f16"]  # element types of the KV cache

# THE element-type table: every layout byte count and every array a backend makes from a layout
# take their dtype (and so their element size) from here.
DTYPES: dict[str, np.dtype] = {"f32": np.dtype(np.float32), "f16": np.dtype(np.float16), "i32": np.dtype(np.int32),
                                "u8": np.dtype(np.uint8)}
KV_TYPES: tuple[str, ...] = get_args(KvType)
assert set(DTYPES) == set(get_args(DType)) and set(KV_TYPES) <= set(DTYPES)


@dataclass(frozen=True)
class BufferSpec:
    """One planned (or allocated) buffer."""

    owner: Owner
    kind: BufferKind
    tag: str  # tensor name for weights; "k", "v", "logits", "scratch" otherwise
    device: Placement
    nbytes: int


@dataclass(frozen=True)
class DeviceMemory:
    """What a backend's device offers: name, total and free bytes, and whether a separate host memory exists."""

    name: str
    total_bytes: int
    free_bytes: int
    has_host: bool


class AllocationError(MemoryError):
    """A backend could not allocate a planned buffer."""


class Ledger:
    """Every live allocation of a backend: (pair name, BufferSpec) -> count. Thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self._live: dict[int, tuple[str, BufferSpec]] = {}
        self._next = 0

    def record(self, pair: str, spec: BufferSpec) -> int:
        with self._lock:
            self._next += 1
            self._live[self._next] = (pair, spec)
            return self._next

    def release(self, handle: int) -> None:
        with self._lock:
            del self._live[handle]

    def entries(self, pair: str | None = None) -> list[BufferSpec]:
        """Live allocations (of one pair, or all), in allocation order."""
        with self._lock:
            return [s for p, s in self._live.values() if pair is None or p == pair]

    def snapshot(self) -> tuple[tuple[str, BufferSpec], ...]:
        """An immutable picture of the ledger, for before/after comparisons."""
        with self._lock:
            return tuple(sorted(self._live.values(), key=repr))

    def total_bytes(self, device: str | None = None) -> int:
        with self._lock:
            return sum(s.nbytes for _, s in self._live.values() if device is None or s.device == device)


@dataclass
class Allocation:
    """A live buffer: the spec it was made from, its ledger handle and the backend array(s)."""

    spec: BufferSpec
    handle: int
    array: Any


class HostArrays(dict):
    """Named numpy arrays in host memory, carved from one planned byte buffer (`Backend.allocate_host`):
    what the engine itself reads and writes (the n-gram index), whatever the backend."""


def resident_zeros(nbytes: int) -> np.ndarray:
    """`nbytes` zeroed host bytes whose pages are resident now. np.zeros takes fresh pages from the
    kernel (calloc over mmap) that become resident only when first written: a planned buffer made
    that way (KV cache, prompt store) would fill in mid-serving and read as RSS growth for minutes."""
    raw = np.empty(nbytes, dtype=np.uint8)
    raw.fill(0)  # every page written once: resident from Load on, as Fit counted it
    return raw


def carve_host(nbytes: int, layout: dict[str, tuple[tuple[int, ...], str]]) -> HostArrays:
    """Zeroed host arrays of `layout`, carved in order from one resident buffer of exactly `nbytes`."""
    raw = resident_zeros(nbytes)
    arrays, off = HostArrays(), 0
    for name, (shape, dt) in layout.items():
        dtype = DTYPES[dt]
        n = int(np.prod(shape)) * dtype.itemsize
        arrays[name] = raw[off:off + n].view(dtype).reshape(shape)
        off += n
    assert off == nbytes, f"layout of {off} bytes for a spec of {nbytes}"
    return arrays


@dataclass(frozen=True)
class Proj:
    """One output of a grouped matmul: out (n, N) = x (n, K) @ W^T [+ bias (N,)], W the file's (N, K) matrix."""

    w: Any
    out: Any
    bias: Any = None


class Backend(ABC):
    """What the planner, the loader and the llama graph need from a compute backend."""

    name: str = "abstract"
    # Batches of up to this many rows are recorded once per (rows, outputs) and replayed (record_pass):
    # the decode and verify steps, where launching op by op from Python costs most. A backend whose
    # passes are always graphs (ggml) records every shape.
    replay_max_rows: int = 16

    def __init__(self, ledger: Ledger | None = None):
        self.ledger = ledger or Ledger()
        self.fault_hook = None  # tests: callable(spec) raising to inject a failure before an allocation

    # ---- sizes: the planner calls these; the loader never recomputes a size ----
    @abstractmethod
    def weight_nbytes(self, ggml_type, shape: tuple[int, ...]) -> int:
        """Bytes this backend holds for a weight tensor stored in the file as `ggml_type`."""

    @abstractmethod
    def scratch_row_multiple(self) -> int:
        """Compute scratch is sized for n_batch rounded up to this many rows."""

    @abstractmethod
    def device_memory(self) -> DeviceMemory:
        """The device's memory, for Fit's budget."""

    def row_cost(self, rows: int) -> float:
        """Relative cost of a forward pass over `rows` rows (1.0 = one row); the engine uses it to
        choose how many drafts are worth verifying. Default: rows are nearly free (a GPU)."""
        return 1.0 + 0.02 * (rows - 1)

    def compute_layout(self, model, n_batch: int, n_outputs_max: int) -> dict[str, tuple[tuple[int, ...], str]]:
        """The layout of a context's compute buffer for passes of up to n_batch rows and n_outputs_max
        outputs of `model` (a ModelFile: its hparams and tensor types). Default: the llama graph's
        scratch arrays (compute/llama.py `scratch_layout`) with this backend's row multiple and params."""
        from compute.llama import scratch_layout

        hp = model.hparams
        return scratch_layout(hp, n_batch, n_outputs_max, self.scratch_row_multiple(),
                              self.param_layout(hp, n_batch, n_outputs_max))

    def param_layout(self, hp, n_batch: int, n_outputs_max: int) -> dict[str, tuple[tuple[int, ...], str]]:
        """Device copies of the per-call host parameters (token ids, rows, RoPE tables, ...) this
        backend needs in each context's compute scratch, sized for n_batch rows and n_outputs_max
        outputs; the planner adds them to the scratch layout. Default: none (the ops read host arrays)."""
        return {}

    def forward(self, scratch: dict):
        """A context manager around one forward pass over a context whose compute scratch is the
        dict of arrays `scratch`: ops inside it stage their host parameters into that scratch's
        `param_layout` arrays. Default: nothing to do."""
        return contextlib.nullcontext()

    # ---- allocation: exactly a planned spec, through the ledger ----
    def allocate(self, pair: str, spec: BufferSpec,
                 layout: dict[str, tuple[tuple[int, ...], str]] | None = None) -> Allocation:
        """Allocate `spec.nbytes` bytes (as the named arrays of `layout` when given) and record it."""
        if self.fault_hook is not None:
            self.fault_hook(spec)
        array = self._allocate(spec, layout)
        return Allocation(spec, self.ledger.record(pair, spec), array)

    def release(self, alloc: Allocation) -> None:
        if not isinstance(alloc.array, HostArrays):  # host arrays (allocate_host) are numpy's to free
            self._release(alloc.array)
        self.ledger.release(alloc.handle)

    @abstractmethod
    def _allocate(self, spec: BufferSpec, layout):
        """Backend storage for a spec: one byte buffer, or a dict of named arrays carved from it."""

    def _release(self, array) -> None:  # noqa: B027 - numpy frees by reference counting
        pass

    @abstractmethod
    def load_weight(self, alloc: Allocation, ggml_type, shape: tuple[int, ...], raw: np.ndarray) -> Any:
        """Fill a weights allocation from the file's bytes (`shape` numpy order: (out, in) for
        matrices); returns the backend's weight handle. A matrix handle serves both `matmul`
        (as x @ W^T of the file's rows) and, for token_embd, `embed` (row lookup)."""

    # ---- ops used by the llama graph; `out` arrays are scratch views ----
    @abstractmethod
    def embed(self, table, ids: np.ndarray, out) -> None:
        """out[i] = row ids[i] of the embedding table. out: (n, n_embd)."""

    @abstractmethod
    def rms_norm(self, x, w, eps: float, out) -> None:
        """out = x / sqrt(mean(x^2) + eps) * w, per row."""

    @abstractmethod
    def head_rms_norm(self, x, w, n_heads: int, head_dim: int, eps: float, out) -> None:
        """`rms_norm` of each head of each row: x, out (n, n_heads*head_dim), w (head_dim,) shared by
        every head (qwen3's and gemma3's QK-norm); out may be x."""

    @abstractmethod
    def scale(self, x, s: float, out) -> None:
        """out = x * s (out may be x)."""

    @abstractmethod
    def matmul(self, x, w, out, bias=None, pad=None) -> None:
        """out (n, N) = x (n, K) @ W^T [+ bias] for W the file's (N, K) matrix; a row's result never
        depends on n. `pad` is the context's (pad_in, pad_out) scratch for backends that tile rows."""

    def rope_tables(self, positions: np.ndarray, rope_dim: int, base: float, scale: float | Sequence[float]
                    ) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin (n, rope_dim/2) float32 of each row's angles position/scale_i * base^(-2i/rope_dim);
        `scale` is one number or one per pair (HParams.rope_scale: Llama 3's frequency factors).
        Made on the host, the same for every backend (a numerics emulation may override it)."""
        i = np.arange(0, rope_dim, 2, dtype=np.float64)
        inv_freq = (base ** (-i / rope_dim)).astype(np.float32)
        scaled = positions.astype(np.float32)[:, None] / np.asarray(scale, dtype=np.float32)  # (n, 1 or rope_dim/2)
        theta = scaled * inv_freq[None, :]
        return np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)

    @abstractmethod
    def rope(self, x, cos: np.ndarray, sin: np.ndarray, n_heads: int, head_dim: int, rope_dim: int,
             neox: bool) -> None:
        """Rotate x (n, n_heads*head_dim) in place; cos, sin (n, rope_dim/2) are host tables per row.

        neox=False rotates adjacent pairs (2i, 2i+1) as llama.cpp's "normal" RoPE (GGUF llama
        q/k are permuted for it); neox=True rotates (i, i + rope_dim/2)."""

    @abstractmethod
    def kv_store(self, k_cache, v_cache, layer: int, slots: np.ndarray, positions: np.ndarray, k, v) -> None:
        """Write k, v rows (n, n_embd_kv) into the caches at (layer, slot, position)."""

    @abstractmethod
    def attention(self, k_cache, v_cache, layer: int, q, slots: np.ndarray, positions: np.ndarray,
                  n_head: int, n_head_kv: int, head_dim: int, out, scale: float | None = None,
                  window: int = 0) -> None:
        """Causal GQA attention of each row of q (n, n_head*head_dim) over its slot's cells 0..position,
        softmax(q.k * scale) (None: 1/sqrt(head_dim)); window > 0: only the cells of the last `window`
        positions, the row's own included (llama.cpp's standard sliding window: p - p0 < window).

        The batch's own k, v rows are already stored, so a row sees earlier rows of its slot."""

    @abstractmethod
    def swiglu(self, gate, up, out) -> None:
        """out = silu(gate) * up."""

    @abstractmethod
    def geglu(self, gate, up, out) -> None:
        """out = gelu(gate) * up, GELU's tanh approximation: 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3)))."""

    @abstractmethod
    def add(self, a, b, out) -> None:
        """out = a + b."""

    @abstractmethod
    def gather_rows(self, x, rows: np.ndarray, out) -> None:
        """out[i] = x[rows[i]]."""

    @abstractmethod
    def to_host(self, x, n: int) -> np.ndarray:
        """The first n rows of x as a float32 numpy array (a synchronisation point)."""

    # ---- fused operations: defaults from the plain ops; a backend with a fused kernel overrides ----
    def matmuls(self, x, projs: Sequence[Proj], pad=None) -> None:
        """p.out = x @ p.w^T [+ p.bias] for every p of projs: several matrices of one input
        (q, k, v; gate, up). Each output equals its own `matmul` bit for bit."""
        for p in projs:
            self.matmul(x, p.w, p.out, p.bias, pad=pad)

    def add_rms_norm(self, a, b, x, w, eps: float, out) -> None:
        """x = a + b, then out = x / sqrt(mean(x^2) + eps) * w per row: the residual add and the
        norm of its result (x may be a: the residual stream updated in place)."""
        self.add(a, b, x)
        self.rms_norm(x, w, eps, out)

    def rope_qk(self, q, k, cos: np.ndarray, sin: np.ndarray, n_head: int, n_head_kv: int, head_dim: int,
                rope_dim: int, neox: bool) -> None:
        """`rope` of q (n, n_head*head_dim) and of k (n, n_head_kv*head_dim) with the same tables."""
        self.rope(q, cos, sin, n_head, head_dim, rope_dim, neox)
        self.rope(k, cos, sin, n_head_kv, head_dim, rope_dim, neox)

    def rope_kv_store(self, q, k, v, cos: np.ndarray, sin: np.ndarray, n_head: int, n_head_kv: int,
                      head_dim: int, rope_dim: int, neox: bool, k_cache, v_cache, layer: int,
                      slots: np.ndarray, positions: np.ndarray, tables: str = "") -> None:
        """`rope_qk` then `kv_store`: q rotated in place, the rotated k and v written into the caches.
        Afterwards only q and the caches are defined: a backend may leave k unrotated. `tables`: the
        suffix of the names cos, sin are replayed under (ROPE_TABLES: "" or "_swa", the local layers')."""
        self.rope_qk(q, k, cos, sin, n_head, n_head_kv, head_dim, rope_dim, neox)
        self.kv_store(k_cache, v_cache, layer, slots, positions, k, v)

    # ---- KV cells between slots (n > 1 completions of one prompt share its prefill) ----
    def kv_copy(self, k_cache, v_cache, src_slot: int, dst_slot: int, n: int) -> None:
        """Copy cells 0..n-1 of slot src_slot to slot dst_slot, in every layer of both caches, on the
        device (no host round trip). Backends that cannot copy keep this default."""
        raise NotImplementedError(f"{type(self).__name__} cannot copy KV cells between slots")

    # ---- read-back for tests and checks (not used by the graph) ----
    def kv_read(self, k_cache, v_cache, layer: int, slot: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """K and V (n, n_embd_kv) float32 of a slot's first n cells (tests and rollback checks);
        backends that can read their caches back override it."""
        raise NotImplementedError(f"{type(self).__name__} cannot read its KV cache back")

    # ---- planned host buffers and the prompt store (service/prompt_cache.py) ----
    def allocate_host(self, pair: str, spec: BufferSpec, layout: dict[str, tuple[tuple[int, ...], str]]
                      ) -> Allocation:
        """Allocate a planned buffer as host numpy arrays (whatever the device) and record it; `release`
        leaves their memory to numpy."""
        if self.fault_hook is not None:
            self.fault_hook(spec)
        return Allocation(spec, self.ledger.record(pair, spec), carve_host(spec.nbytes, layout))

    def cache_placement(self) -> Placement:
        """Where the prompt store lives: host memory when the device has a separate one (a GPU: the
        store takes no device memory), else the device's memory (the host's: Fit counts it)."""
        return "host" if self.device_memory().has_host else "device"

    def kv_to_store(self, cache, slot: int, start: int, store, block: int, offset: int, n: int) -> None:
        """store[block, :, offset:offset + n] = cache[:, slot, start:start + n]: n cells of a slot, every
        layer, into one block of a prompt store (n_blocks, n_layer, block_tokens, n_embd_kv) of the
        cache's element type. Default: both are numpy arrays."""
        store[block, :, offset:offset + n] = cache[:, slot, start:start + n]

    def kv_from_store(self, cache, slot: int, start: int, store, block: int, offset: int, n: int) -> None:
        """cache[:, slot, start:start + n] = store[block, :, offset:offset + n]: `kv_to_store` back."""
        cache[:, slot, start:start + n] = store[block, :, offset:offset + n]
    # ---- launch replay: a forward pass recorded once per batch shape, then replayed ----
    def record_pass(self) -> contextlib.AbstractContextManager:
        """A context manager around one forward pass (inside `forward`); it yields a PassRecording
        whose `graph`, after the block, replays the pass's device work for another batch of the same
        shape (rows, outputs) through `replay_pass`. Default: nothing is recorded (graph stays None)."""
        return contextlib.nullcontext(PassRecording())

    def replay_pass(self, graph, params: dict[str, np.ndarray]) -> None:
        """Enqueue a recorded pass again (inside `forward`) with this batch's host parameters:
        tokens, positions, slots, outputs (int32) and the RoPE tables cos, sin (float32)."""
        raise NotImplementedError(f"{type(self).__name__} records no passes")


ROPE_TABLES = ("", "_swa")  # the RoPE tables a pass may take: cos, sin and (local layers' base) cos_swa, sin_swa


class HostKvCells:
    """`kv_copy` and `kv_read` for backends whose KV caches are host numpy arrays
    (n_layer, n_slots, n_ctx_slot, n_embd_kv): NumPy's and ggml's."""

    def kv_copy(self, k_cache, v_cache, src_slot: int, dst_slot: int, n: int) -> None:
        for c in (k_cache, v_cache):
            c[:, dst_slot, :n] = c[:, src_slot, :n]

    def kv_read(self, k_cache, v_cache, layer: int, slot: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        return (k_cache[layer, slot, :n].astype(np.float32), v_cache[layer, slot, :n].astype(np.float32))


class PassRecording:
    """What `Backend.record_pass` yields: after the block, `graph` is the recorded pass, or None
    when the backend cannot replay (the default)."""

    __slots__ = ("graph",)

    def __init__(self):
        self.graph = None


def release_all(backend: Backend, allocs: Iterable[Allocation]) -> None:
    """Release allocations in reverse order, even if one release raises."""
    errors = []
    for a in reversed(list(allocs)):
        try:
            backend.release(a)
        except Exception as e:  # keep releasing the rest
            errors.append(e)
    if errors:
        raise errors[0]

