"""Choose the compute backend: `make_backend("auto" | "ggml" | "opencl" | "numpy", device, threads, row_tile)`.

"auto" takes, in this order, the first that works here: an OpenCL GPU that passed its probe
(compute/opencl/probe.py), ggml's CPU backend (compute/ggml/, after its own probe), the
OpenCL CPU runtimes (Intel's, then PoCL), and NumPy, with a warning that says why the others
did not. Every device or backend that fails its probe is skipped with one log line naming it
and the first error. "opencl" is the OpenCL part alone, "ggml" ggml alone. `threads` applies
to whichever backend is chosen: ggml's threadpool, NumPy's BLAS threads, or the CPU OpenCL
runtimes' workers (which read it once per process: see compute/opencl/runtime.py).
"""

from __future__ import annotations

import logging

from compute.backend import Backend

log = logging.getLogger("specserve.backend")

BACKENDS = ("auto", "ggml", "opencl", "numpy")
# threads=0 means: NumPy gets this many BLAS threads (OpenBLAS with more collapses when another
# process holds a core), the CPU OpenCL runtimes get every core.
NUMPY_DEFAULT_THREADS = 1


class BackendUnavailable(RuntimeError):
    """The backend (or device) asked for cannot run on this machine; the message says why."""


def make_backend(name: str = "auto", device: str = "", threads: int = 0, row_tile: int = -1) -> Backend:
    """The backend `name` on this machine, probed; raises BackendUnavailable."""
    if name not in BACKENDS:
        raise BackendUnavailable(f"backend {name!r}: use one of {', '.join(BACKENDS)}")
    if name in ("numpy", "ggml") and device:
        raise BackendUnavailable(f"--device {device!r} needs the OpenCL backend, not {name}")
    if name == "numpy":
        return numpy_backend(threads, row_tile)
    if name == "ggml":
        return ggml_backend(threads)
    if name == "opencl" or device:
        return opencl_backend(device, threads)
    try:
        return opencl_backend("", threads, gpu_only=True)
    except BackendUnavailable as e:
        log.info("no OpenCL GPU (%s): trying ggml on the CPU", e)
    try:
        return ggml_backend(threads)
    except BackendUnavailable as e:
        log.warning("ggml backend skipped: %s", e)
    try:
        return opencl_backend("", threads)
    except BackendUnavailable as e:
        log.warning("%s: using the NumPy backend (slower)", e)
        return numpy_backend(threads, row_tile)


def ggml_backend(threads: int = 0) -> Backend:
    """ggml's CPU backend, after its probe (compute/ggml/probe.py) passed on this machine."""
    try:
        from compute.ggml.backend import GgmlBackend
        from compute.ggml.lib import GgmlUnavailable
        from compute.ggml.probe import probe
    except ImportError as e:
        raise BackendUnavailable(f"the ggml backend cannot be imported ({e})") from e
    try:
        be = GgmlBackend(n_threads=threads)
        probe(be)
    except GgmlUnavailable as e:
        raise BackendUnavailable(str(e)) from e
    except Exception as e:  # noqa: BLE001 - a probe that fails for any reason rules the backend out
        raise BackendUnavailable(f"ggml failed its probe: {type(e).__name__}: {e}") from e
    log.info("ggml backend chosen: %s", be.device_memory().name)
    return be


def numpy_backend(threads: int = 0, row_tile: int = -1) -> Backend:
    from compute.numpy_backend import NumpyBackend

    threads = threads or NUMPY_DEFAULT_THREADS
    if row_tile < 0:
        return NumpyBackend(n_threads=threads)
    return NumpyBackend(n_threads=threads, row_tile=row_tile)


def opencl_backend(device: str = "", threads: int = 0, gpu_only: bool = False) -> Backend:
    """The first OpenCL device (matching `device`, an index or a name substring; a GPU with `gpu_only`)
    whose probe passed."""
    try:
        from compute.opencl import runtime
        from compute.opencl.probe import probe_devices
    except ImportError as e:
        raise BackendUnavailable(f"the OpenCL backend cannot be imported ({e}); "
                                 "install pyopencl (pip install 'specserve[opencl]')") from e
    runtime.set_threads(threads)
    if gpu_only and not _has_gpu():
        raise BackendUnavailable("no OpenCL GPU is installed")
    statuses = probe_devices()
    for s in statuses:
        if not s.ok:
            log.warning("OpenCL device skipped: %s", s.line())
    if device:
        statuses = [s for s in statuses if matches(s, device)]
        if not statuses:
            raise BackendUnavailable(f"no OpenCL device matches --device {device!r} (see serve --list-devices)")
    if gpu_only:
        statuses = [s for s in statuses if s.runtime == "gpu"]
        if not statuses:
            raise BackendUnavailable("no OpenCL GPU is installed")
    usable = [s for s in statuses if s.ok]
    if not usable:
        why = "; ".join(f"{s.platform}: {s.reason}" for s in statuses) or "no OpenCL platform is installed"
        raise BackendUnavailable(f"no working OpenCL device ({why})")
    from compute.opencl.backend import OpenCLBackend

    chosen = usable[0]
    log.info("OpenCL device chosen: %s; CPU runtime threads: %s", chosen.line(), runtime.threads_in_effect())
    return OpenCLBackend(device=chosen.index)


def _has_gpu() -> bool:
    """Whether any OpenCL platform lists a GPU (asked before probing anything)."""
    import pyopencl as cl

    from compute.opencl.backend import _all_devices

    return any(d.type & cl.device_type.GPU for _, d in _all_devices())


def matches(status, device: str) -> bool:
    """Whether a probed device is the one `--device` names: its index, or a substring of its names."""
    if device.strip().isdigit():
        return status.index == int(device)
    needle = device.lower()
    return needle in status.platform.lower() or needle in status.device.lower() or needle == status.runtime


def device_report(threads: int = 0) -> list[str]:
    """One line per OpenCL device and one for ggml's CPU backend: `ok` or why it is unusable
    (serve --list-devices)."""
    return _opencl_report(threads) + [_ggml_report(threads)]


def _opencl_report(threads: int) -> list[str]:
    try:
        from compute.opencl import runtime
        from compute.opencl.probe import probe_devices
    except ImportError as e:
        return [f"OpenCL unavailable: {e}"]
    runtime.set_threads(threads)
    return [s.line() for s in probe_devices()] or ["no OpenCL device found"]


def _ggml_report(threads: int) -> str:
    try:
        be = ggml_backend(threads)
    except BackendUnavailable as e:
        return f"ggml: unusable: {e}"
    return f"ggml: {be.device_memory().name} ok"
