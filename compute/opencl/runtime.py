"""Which OpenCL runtimes this process sees, and how many threads the CPU runtimes use.

Two CPU runtimes come from PyPI (`scripts/setup.sh` installs both; docs/opencl-runtimes.md
says why):

* **Intel's CPU runtime** (`intel-opencl-rt`): `libintelocl.so` lands in `<venv>/lib`, but the
  `.icd` file it ships names a placeholder path, so the ICD loader never finds it by itself.
  `register()` writes a vendors folder holding one `.icd` line per runtime (Intel's with the
  absolute path of the library, plus whatever `/etc/OpenCL/vendors` already lists: GPU
  drivers) and points `OCL_ICD_VENDORS` at it. The library's RUNPATH is `$ORIGIN`, so its
  own dependencies (TBB, SVML, its compiler) resolve without `LD_LIBRARY_PATH`.
* **PoCL** (`pyopencl[pocl]`): the loader bundled in the pyopencl wheel finds it by itself.
  Its LLVM 14 does not know Zen 4/5 CPUs; there it builds some kernels and fails others.

The ICD loader reads `OCL_ICD_VENDORS` and each runtime reads its thread setting when the
first platform is queried, so both must be set before that: importing `compute.opencl`
calls `register()`, and `set_threads()` must run before the first `cl.get_platforms()`
(`make_backend` does both in that order). An operator's own `OCL_ICD_VENDORS`,
`POCL_MAX_PTHREAD_COUNT` or `CL_CONFIG_CPU_TBB_NUM_WORKERS` is left as it is.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.metadata
import logging
import os
import sys
import tempfile
from pathlib import Path

log = logging.getLogger("specserve.opencl")

SYSTEM_VENDORS = "/etc/OpenCL/vendors"
INTEL_CPU_LIBRARY = "libintelocl.so"
# The environment variable each CPU runtime reads its worker-thread count from.
THREAD_VARIABLES = ("POCL_MAX_PTHREAD_COUNT", "CL_CONFIG_CPU_TBB_NUM_WORKERS")

_state = {"registered": False, "queried": False, "threads": 0}


def intel_cpu_library() -> str | None:
    """The absolute path of Intel's CPU OpenCL runtime installed from PyPI, or None."""
    try:
        files = importlib.metadata.files("intel-opencl-rt") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    candidates = [str(f.locate()) for f in files if Path(str(f)).name == INTEL_CPU_LIBRARY]
    candidates.append(os.path.join(sys.prefix, "lib", INTEL_CPU_LIBRARY))
    for path in candidates:
        if os.path.isfile(path):
            return os.path.realpath(path)
    return None


def _vendor_lines() -> dict[str, str]:
    """icd file name -> the library line it holds: the system's vendors plus Intel's CPU runtime."""
    lines = {}
    for icd in sorted(glob.glob(os.path.join(SYSTEM_VENDORS, "*.icd"))):
        try:
            lines[os.path.basename(icd)] = Path(icd).read_text().strip()
        except OSError:
            continue
    intel = intel_cpu_library()
    if intel is not None:
        lines["specserve-intel-cpu.icd"] = intel
    return lines


def _write_vendors(lines: dict[str, str]) -> str:
    """A folder of .icd files with these lines, named by their hash (reused when it exists)."""
    digest = hashlib.sha256(repr(sorted(lines.items())).encode()).hexdigest()[:16]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    for root in (os.path.join(base, "specserve"), os.path.join(tempfile.gettempdir(), f"specserve-{os.getuid()}")):
        folder = os.path.join(root, f"opencl-vendors-{digest}")
        try:
            if not os.path.isdir(folder):
                tmp = tempfile.mkdtemp(prefix=".vendors-", dir=_makedirs(root))
                for name, line in lines.items():
                    Path(tmp, name).write_text(line + "\n")
                try:
                    os.rename(tmp, folder)
                except OSError:  # another process wrote it first
                    for name in lines:
                        os.unlink(os.path.join(tmp, name))
                    os.rmdir(tmp)
            return folder
        except OSError:
            continue
    raise OSError("cannot write an OpenCL vendors folder under the cache directory or the temp directory")


def _makedirs(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path


def register() -> None:
    """Make Intel's CPU runtime (when installed) visible to the ICD loader beside the system's
    runtimes. Idempotent; a no-op when the operator set OCL_ICD_VENDORS."""
    if _state["registered"]:
        return
    _state["registered"] = True
    if os.environ.get("OCL_ICD_VENDORS"):
        log.debug("OCL_ICD_VENDORS is set (%s): using the operator's vendors", os.environ["OCL_ICD_VENDORS"])
        return
    lines = _vendor_lines()
    if not any(name.startswith("specserve-") for name in lines):
        return  # nothing to add: the loader's defaults already see everything there is
    try:
        os.environ["OCL_ICD_VENDORS"] = _write_vendors(lines)
    except OSError as e:
        log.warning("Intel's CPU OpenCL runtime is installed but cannot be registered: %s", e)


def set_threads(threads: int) -> None:
    """Worker threads of the CPU runtimes (0: every core). Takes effect only before the first
    platform query; later a different count is refused with a warning (the runtimes read it once)."""
    if threads < 0:
        raise ValueError(f"threads must be >= 0, not {threads}")
    if _state["queried"]:
        if threads != _state["threads"]:
            log.warning("the OpenCL CPU runtimes already started with %s threads; %d takes effect at the "
                        "next start", _state["threads"] or "all", threads)
        return
    _state["threads"] = threads
    for var in THREAD_VARIABLES:
        if threads:
            os.environ[var] = str(threads)


def mark_queried() -> None:
    """Called before the first platform query: from now on the thread count is fixed."""
    if not _state["queried"]:
        _state["queried"] = True
        for var in THREAD_VARIABLES:
            if var in os.environ and not _state["threads"]:
                _state["threads"] = int(os.environ[var]) if os.environ[var].isdigit() else 0


def threads_in_effect() -> str:
    """What the CPU runtimes use: "N" or "all cores" (for logs and benchmarks)."""
    values = {os.environ.get(v) for v in THREAD_VARIABLES}
    if len(values) == 1 and None not in values:
        return values.pop()
    if values == {None}:
        return "all cores"
    return ", ".join(f"{v}={os.environ.get(v, 'all cores')}" for v in THREAD_VARIABLES)
