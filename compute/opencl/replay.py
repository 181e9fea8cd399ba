"""Launch replay: a forward pass of the OpenCL backend recorded once per batch shape, then
enqueued again without running the graph's Python.

A decode step of a small model is ~250 kernel launches; building each one in Python (the
graph, the op's checks, argument lists, `set_args`) cost ~30 us of host time per launch on a
2-vCPU Zen 4, time the CPU runtime's worker threads then lack. For a given context and batch
shape (rows n, outputs n_out) every launch of a pass is the same: the same kernels, work sizes,
buffers, offsets and integers; only the per-call host parameters differ (token ids, positions,
slots, output rows, RoPE tables), and those go to the device through the planned p_* arrays
(compute/opencl/staging.py), whose buffers the kernels take as arguments. So:

* recording (`OpenCLBackend.record_pass`): the pass runs as usual, and each launch gets its own
  clone of its kernel (`cl.Kernel` of the same program) with its arguments set once; the
  recording keeps those clones, their work sizes, the parameter arrays staged (in order) and the
  range checks the ops made on them;
* replaying (`replay_pass`): the range checks, the parameter uploads (skipped when unchanged,
  as always), then one `enqueue_nd_range_kernel` per recorded launch.

The device does exactly the same work in the same order, so results are bit-identical to the
unrecorded pass (tests/test_opencl_model.py checks it). The graph decides which shapes to keep
(compute/llama.py: small batches, the decode and verify steps).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyopencl as cl

# staging key (compute/opencl/staging.py PARAMS) -> the graph's name of the host parameter
PARAM_OF_KEY = {"ids": "tokens", "rows": "outputs", "cos": "cos", "sin": "sin", "slots": "slots",
                "positions": "positions", "cos_swa": "cos_swa", "sin_swa": "sin_swa"}


@dataclass
class PassGraph:
    """A recorded forward pass: what `replay` needs to enqueue it again."""

    stages: dict[str, np.dtype] = field(default_factory=dict)  # staging key -> dtype, first-staged order
    bounds: dict[str, tuple[int, str]] = field(default_factory=dict)  # staging key -> (rows, what) checked
    launches: list[tuple[cl.Kernel, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    def stage(self, key: str, dtype) -> None:
        self.stages.setdefault(key, np.dtype(dtype))

    def bound(self, key: str, n_rows: int, what: str) -> None:
        self.bounds[key] = (n_rows, what)

    def launch(self, kernel: cl.Kernel, gsize: tuple[int, ...], lsize: tuple[int, ...], args: tuple) -> cl.Kernel:
        """A clone of `kernel` with `args` set, kept for replay; returns it to enqueue now."""
        clone = cl.Kernel(kernel.get_info(cl.kernel_info.PROGRAM), kernel.function_name)
        clone.set_scalar_arg_dtypes([np.float32 if isinstance(a, float) else np.int32 if isinstance(a, int)
                                     else None for a in args])
        clone.set_args(*args)
        self.launches.append((clone, gsize, lsize))
        return clone


def replay(graph: PassGraph, queue: cl.CommandQueue, staging, params: dict[str, np.ndarray], check_rows) -> None:
    """Enqueue a recorded pass with this batch's parameters (the caller holds the backend's lock
    inside `forward`). check_rows(ids, n_rows, what) raises for an out-of-range id, as the ops do."""
    for key, (n_rows, what) in graph.bounds.items():
        check_rows(params[PARAM_OF_KEY[key]], n_rows, what)
    for key, dtype in graph.stages.items():
        staging.stage(key, params[PARAM_OF_KEY[key]], dtype)
    enqueue = cl.enqueue_nd_range_kernel
    for k, gsize, lsize in graph.launches:
        enqueue(queue, k, gsize, lsize)
