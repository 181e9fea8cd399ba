"""Kernels of the OpenCL backend: sources with their headers pasted in, the build profile
(vendor tuning), and a cache that builds each (file, build options) once and launches kernels.

Each kernel is named like its file (kernels/<op>_<types>.cl) and declares its work-group
size (`reqd_work_group_size`, from the tuning table in kernels/common.clh); the cache reads
it back and launches every kernel with it.
"""

from __future__ import annotations

import math
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyopencl as cl

from compute.opencl.probe import first_error_line

KERNEL_DIR = Path(__file__).resolve().parent / "kernels"
# Kernel tuning profiles (the constants live behind these #ifdefs in kernels/common.clh).
TUNINGS = {
    "cpu": ("-DDEV_CPU=1", "-DVENDOR_POCL=1"),
    "nvidia": ("-DVENDOR_NVIDIA=1",),
    "amd": ("-DVENDOR_AMD=1",),
    "intel": ("-DVENDOR_INTEL=1",),
    "generic": ("-DVENDOR_OTHER=1",),
}
_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.M)

Kernel = tuple  # (cl.Kernel, its work-group size (x, y, z)), as `KernelCache.kernel` returns it


class KernelBuildError(RuntimeError):
    """This device's OpenCL runtime could not build or create one of the backend's kernels."""


def kernel_source(name: str) -> str:
    """A kernel file with its `#include "x.clh"` lines replaced by those files (kernels/ only)."""
    seen: set[str] = set()

    def expand(fname: str) -> str:
        if fname in seen:  # include guards in the headers make a second copy harmless; skip it anyway
            return ""
        seen.add(fname)
        text = (KERNEL_DIR / fname).read_text()
        return _INCLUDE.sub(lambda m: expand(m.group(1)), text)

    return expand(name)


def vendor_define(platform: cl.Platform, dev: cl.Device) -> str:
    """The kernels' VENDOR_* define for a device, from its platform and vendor names."""
    text = f"{platform.name} {platform.vendor} {dev.vendor}".lower()
    for key, define in (("portable computing language", "VENDOR_POCL"), ("pocl", "VENDOR_POCL"),
                        ("nvidia", "VENDOR_NVIDIA"), ("advanced micro devices", "VENDOR_AMD"), ("amd", "VENDOR_AMD"),
                        ("intel", "VENDOR_INTEL"), ("apple", "VENDOR_APPLE")):
        if key in text:
            return define
    return "VENDOR_OTHER"


def host_has_avx512() -> bool:
    """Whether this machine's CPU has AVX-512F (a CPU OpenCL device is this CPU): Linux's cpuinfo flags."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "avx512f" in line.split()
    except OSError:
        pass
    return False


@dataclass(frozen=True)
class BuildProfile:
    """How the kernels are built for a device: the tuning's name and the build options."""

    tuning: str  # a key of TUNINGS
    options: tuple[str, ...]

    @staticmethod
    def of(platform: cl.Platform, device: cl.Device, tuning: str | None = None) -> "BuildProfile":
        """The device's own profile, or (tuning given) another vendor's, to run its code paths here."""
        is_cpu = bool(device.type & cl.device_type.CPU)
        vendor = vendor_define(platform, device)
        if tuning is None:
            defines = (["-DDEV_CPU=1"] if is_cpu else []) + [f"-D{vendor}=1"]  # the kernels' #ifdef table
            if is_cpu and vendor == "VENDOR_INTEL" and host_has_avx512():
                defines.append("-DNIBBLE_LUT=1")  # 4-bit codes through one vpermps (common.clh)
            tuning = "cpu" if is_cpu else {"VENDOR_NVIDIA": "nvidia", "VENDOR_AMD": "amd",
                                           "VENDOR_INTEL": "intel"}.get(vendor, "generic")
        else:
            defines = list(TUNINGS[tuning])
        return BuildProfile(tuning, ("-cl-std=CL1.2", *defines))


class KernelCache:
    """Programs built once per (file, build options), kernels by (file, defines), and launches."""

    def __init__(self, context: cl.Context, device: cl.Device, queue: cl.CommandQueue, profile: BuildProfile,
                 lock: threading.RLock):
        self.context, self.device, self.queue, self.profile = context, device, queue, profile
        self._lock = lock  # the backend's: a launch sets a kernel's arguments, then enqueues it
        self._kernels: dict[tuple, Kernel] = {}
        self._programs: dict[tuple, cl.Program] = {}
        self._typed: set = set()  # kernels whose scalar argument types are declared
        self.recording = None  # a replay.PassGraph while a pass is recorded (compute/opencl/replay.py)

    def program(self, fname: str, options: tuple[str, ...] = ()) -> cl.Program:
        """The program of one kernel file built with the profile's options plus `options`."""
        key = (fname, options)
        prg = self._programs.get(key)
        if prg is None:
            prg = cl.Program(self.context, kernel_source(fname)).build(options=list(self.profile.options + options))
            self._programs[key] = prg
        return prg

    def kernel(self, fname: str, **defines) -> Kernel:
        """The kernel named like its file, built with -D<k>=<v> for `defines`, and its required work-group size."""
        key = (fname, *defines.items())
        hit = self._kernels.get(key)
        if hit is None:
            with self._lock:
                return self._build(key, fname, defines)
        return hit

    def _build(self, key, fname, defines) -> Kernel:
        hit = self._kernels.get(key)
        if hit is None:
            opts = tuple(f"-D{k}={v}" for k, v in sorted(defines.items()))
            try:
                k = cl.Kernel(self.program(fname, opts), fname[:-3])
            except cl.Error as e:
                what = f"{fname} {' '.join(opts)}".strip()
                raise KernelBuildError(f"{what}: {first_error_line(str(e))}") from e
            lws = tuple(k.get_work_group_info(cl.kernel_work_group_info.COMPILE_WORK_GROUP_SIZE, self.device))
            assert lws[0] > 0, f"{fname} must declare reqd_work_group_size"
            limit = k.get_work_group_info(cl.kernel_work_group_info.WORK_GROUP_SIZE, self.device)
            if math.prod(lws) > limit:
                raise RuntimeError(f"{fname}: work-group {lws} exceeds this device's {limit} for it; "
                                   f"lower the {self.profile.tuning!r} tuning in kernels/common.clh")
            hit = self._kernels[key] = (k, lws)
        return hit

    def enqueue(self, kl: Kernel, gsize: tuple[int, ...], args: tuple) -> None:
        """Enqueue a kernel over `gsize` (rounded up to its work-group); no host wait. Scalar
        arguments are Python ints (int) and floats (float)."""
        k, lws = kl
        lsize = lws[:len(gsize)]
        gsize = tuple(-(-g // ls) * ls for g, ls in zip(gsize, lsize))
        with self._lock:
            if self.recording is not None:  # this launch gets its own kernel, arguments set once
                cl.enqueue_nd_range_kernel(self.queue, self.recording.launch(k, gsize, lsize, args), gsize, lsize)
                return
            if k not in self._typed:
                # declared scalar types make set_args ~20x cheaper than numpy scalars one by one
                k.set_scalar_arg_dtypes([np.float32 if isinstance(a, float) else np.int32 if isinstance(a, int)
                                         else None for a in args])
                self._typed.add(k)
            k.set_args(*args)
            cl.enqueue_nd_range_kernel(self.queue, k, gsize, lsize)
