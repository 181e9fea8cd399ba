"""Choose the compute backend: `make_backend("auto" | "opencl" | "numpy", device, threads, row_tile)`.

"auto" takes the best OpenCL device that passed its probe (compute/opencl/probe.py: a GPU,
then Intel's CPU runtime, then PoCL), and NumPy, with a warning that says why, when none
did. Every device that fails its probe is skipped with one log line naming its platform
and the first error. "opencl" is the same without the NumPy fallback. `threads` applies
to whichever backend is chosen: NumPy's BLAS threads, or the CPU OpenCL runtimes' workers
(which read it once per process: see compute/opencl/runtime.py).
"""

from __future__ import annotations

import logging

from compute.backend import Backend

log = logging.getLogger("specserve.backend")

BACKENDS = ("auto", "numpy", "opencl")
# threads=0 means: NumPy gets this many BLAS threads (OpenBLAS with more collapses when another
# process holds a core), the CPU OpenCL runtimes get every core.
NUMPY_DEFAULT_THREADS = 1


class BackendUnavailable(RuntimeError):
    """The backend (or device) asked for cannot run on this machine; the message says why."""


def make_backend(name: str = "auto", device: str = "", threads: int = 0, row_tile: int = -1) -> Backend:
    """The backend `name` on this machine, probed; raises BackendUnavailable."""
    if name not in BACKENDS:
        raise BackendUnavailable(f"backend {name!r}: use one of {', '.join(BACKENDS)}")
    if name == "numpy":
        if device:
            raise BackendUnavailable(f"--device {device!r} needs the OpenCL backend, not numpy")
        return numpy_backend(threads, row_tile)
    try:
        return opencl_backend(device, threads)
    except BackendUnavailable as e:
        if name == "opencl" or device:
            raise
        log.warning("%s: using the NumPy backend (slower)", e)
        return numpy_backend(threads, row_tile)


def numpy_backend(threads: int = 0, row_tile: int = -1) -> Backend:
    from compute.numpy_backend import NumpyBackend

    threads = threads or NUMPY_DEFAULT_THREADS
    if row_tile < 0:
        return NumpyBackend(n_threads=threads)
    return NumpyBackend(n_threads=threads, row_tile=row_tile)


def opencl_backend(device: str = "", threads: int = 0) -> Backend:
    """The first OpenCL device (matching `device`, an index or a name substring) whose probe passed."""
    try:
        from compute.opencl import runtime
        from compute.opencl.probe import probe_devices
    except ImportError as e:
        raise BackendUnavailable(f"the OpenCL backend cannot be imported ({e}); "
                                 "install pyopencl (pip install 'specserve[opencl]')") from e
    runtime.set_threads(threads)
    statuses = probe_devices()
    for s in statuses:
        if not s.ok:
            log.warning("OpenCL device skipped: %s", s.line())
    if device:
        statuses = [s for s in statuses if matches(s, device)]
        if not statuses:
            raise BackendUnavailable(f"no OpenCL device matches --device {device!r} (see serve --list-devices)")
    usable = [s for s in statuses if s.ok]
    if not usable:
        why = "; ".join(f"{s.platform}: {s.reason}" for s in statuses) or "no OpenCL platform is installed"
        raise BackendUnavailable(f"no working OpenCL device ({why})")
    from compute.opencl.backend import OpenCLBackend

    chosen = usable[0]
    log.info("OpenCL device chosen: %s; CPU runtime threads: %s", chosen.line(), runtime.threads_in_effect())
    return OpenCLBackend(device=chosen.index)


def matches(status, device: str) -> bool:
    """Whether a probed device is the one `--device` names: its index, or a substring of its names."""
    if device.strip().isdigit():
        return status.index == int(device)
    needle = device.lower()
    return needle in status.platform.lower() or needle in status.device.lower() or needle == status.runtime


def device_report(threads: int = 0) -> list[str]:
    """One line per OpenCL device: `ok` or why it is unusable (serve --list-devices)."""
    try:
        from compute.opencl import runtime
        from compute.opencl.probe import probe_devices
    except ImportError as e:
        return [f"OpenCL unavailable: {e}"]
    runtime.set_threads(threads)
    return [s.line() for s in probe_devices()] or ["no OpenCL device found"]
