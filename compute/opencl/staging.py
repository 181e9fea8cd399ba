"""Per-call host parameters of the OpenCL backend, staged into planned device arrays.

Token ids, slots, positions, the RoPE cos/sin tables and gathered row indices go to the
device with non-blocking writes into the p_* arrays of the compute scratch of the forward
pass in progress (`layout`: planned, sized for n_batch rows and n_outputs_max outputs), and
are skipped when the array already holds the same bytes. The kernels take those arrays
without an offset, so each is a sub-buffer: p_* arrays come first in the scratch, each
rounded up to the device's CL_DEVICE_MEM_BASE_ADDR_ALIGN.
"""

from __future__ import annotations

import contextlib
import threading

import numpy as np
import pyopencl as cl

# op key -> the scratch array its per-call host parameter is staged into
PARAMS = {"ids": "p_ids", "rows": "p_rows", "cos": "p_cos", "sin": "p_sin", "slots": "p_slots",
          "positions": "p_positions", "cos_swa": "p_cos_swa", "sin_swa": "p_sin_swa"}
SWA_PARAMS = ("p_cos_swa", "p_sin_swa")  # only in the scratch of a model with sliding-window layers


class ParamStaging:
    """The p_* arrays of the forward pass in progress, and what each last received."""

    def __init__(self, queue: cl.CommandQueue, align: int, lock: threading.RLock):
        """align: the sub-buffer alignment in bytes; lock: the backend's (held for a whole pass)."""
        self.queue, self.align, self._lock = queue, align, lock
        self._params: dict | None = None  # the scratch of the forward pass in progress
        self._staged: dict[int, tuple[cl.Buffer, bytes]] = {}  # id(p_* sub-buffer) -> (it, bytes last written)
        self._pending: list = []  # events of non-blocking uploads (they hold the host arrays)
        self.recording = None  # a replay.PassGraph while a pass is recorded (compute/opencl/replay.py)

    def layout(self, hp, n_batch: int, n_outputs_max: int) -> dict:
        """The per-call parameters the ops stage (embed: ids; kv_store, attention: slots,
        positions; rope: cos, sin; gather_rows: rows), 1-D, each sized for its largest call and
        rounded up to the sub-buffer alignment."""
        half = hp.rope_dim // 2
        sizes = {"p_ids": (n_batch, "i32"), "p_slots": (n_batch, "i32"), "p_positions": (n_batch, "i32"),
                 "p_cos": (n_batch * half, "f32"), "p_sin": (n_batch * half, "f32"),
                 "p_rows": (n_outputs_max, "i32")}
        if hp.n_swa:  # the local layers' RoPE tables (their own base)
            sizes |= {"p_cos_swa": (n_batch * half, "f32"), "p_sin_swa": (n_batch * half, "f32")}
        per = self.align // 4  # every dtype here has 4-byte elements
        return {name: ((max(per, -(-n // per) * per),), dt) for name, (n, dt) in sizes.items()}

    @contextlib.contextmanager
    def forward(self, scratch: dict):
        """One forward pass over the context whose compute scratch is `scratch`: its ops stage
        their host parameters there. Holds the lock for the whole pass (one in-order queue:
        passes are serialised anyway), so no other thread's op writes these arrays meanwhile."""
        assert all(k in scratch for k in PARAMS.values() if k not in SWA_PARAMS), \
            "scratch without the param_layout arrays"
        with self._lock:
            prev, self._params = self._params, scratch
            try:
                yield
            finally:
                self._params = prev

    def stage(self, key: str, arr, dtype) -> cl.Buffer:
        """A device copy of a small host array in the current forward pass's p_* array
        (non-blocking; skipped when that array already holds these bytes)."""
        arr = np.ascontiguousarray(arr, dtype=dtype)
        with self._lock:
            if self._params is None:
                raise RuntimeError(f"{key}: ops that take host parameters run inside backend.forward(scratch)")
            if self.recording is not None:
                self.recording.stage(key, dtype)
            dst = self._params[PARAMS[key]]  # CLArray (n,)
            assert dst.dtype == arr.dtype and arr.nbytes <= dst.nbytes, \
                f"{key}: {arr.nbytes} bytes of {arr.dtype} for a planned {dst.nbytes} of {dst.dtype}"
            raw = arr.tobytes()
            last = self._staged.get(id(dst.buf))
            if last is not None and last[0] is dst.buf and last[1] == raw:  # same bytes (and the length)
                return dst.buf
            arr = np.frombuffer(raw, dtype=arr.dtype)  # ours: the caller may reuse its array
            # The queue is in order: this write lands after every kernel that read the previous
            # contents. The event keeps `arr` alive; it is dropped at the next sync point (a
            # pyopencl event that owns a host buffer waits for completion when it is collected).
            if arr.nbytes:
                self._pending.append(cl.enqueue_copy(self.queue, dst.buf, arr, is_blocking=False))
            self._staged[id(dst.buf)] = (dst.buf, raw)
            return dst.buf

    def synced(self) -> None:
        """After a blocking read: every queued command has completed."""
        self._pending.clear()

    def forget(self, buffers) -> None:
        """Buffers about to be released: what they last received no longer matters."""
        with self._lock:
            for b in buffers:
                self._staged.pop(id(b), None)
