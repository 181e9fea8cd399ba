"""The OpenCL devices the tests run on: every runtime present, by name.

`device_params()` gives one pytest param per OpenCL device found here, with the runtime as
its id (`intel-cpu`, `pocl`, `gpu`, ...). A device whose probe failed (compute/opencl/probe.py)
is skipped with the probe's reason, so a runtime that cannot work on this CPU shows up in the
summary by name; `tests/test_runtime.py` asserts that at least one CPU runtime works.
SPECSERVE_OPENCL_DEVICE (an index or name substring) limits the tests to that one device
(bench/nvidia_opencl.sh sets it); a device it names explicitly is tested when its probe passed even if
`--backend auto` would not serve on it (Oclgrind: tests/test_oclgrind.py). Needs no conftest:
nvidia_opencl.sh runs with --noconftest.
"""

from __future__ import annotations

import functools
import os
from dataclasses import replace

import pytest


@functools.lru_cache(maxsize=1)
def statuses():
    from compute.opencl.probe import probe_devices
    from compute.select import matches

    found = sorted(probe_devices(), key=lambda s: s.index)
    wanted = os.environ.get("SPECSERVE_OPENCL_DEVICE")
    if not wanted:
        return found
    return [replace(s, ok=True, reason="") if s.probe_ok else s for s in found if matches(s, wanted)]


def _id(s) -> str:
    same = [t for t in statuses() if t.runtime == s.runtime]
    return s.runtime if len(same) == 1 else f"{s.runtime}{s.index}"


def device_params() -> list:
    """One param per device (its index), skipped with the probe's reason when unusable."""
    return [pytest.param(s.index, id=_id(s),
                         marks=() if s.ok else pytest.mark.skip(reason=f"{_id(s)} unusable here: {s.reason}"))
            for s in statuses()]


def usable_device() -> int | None:
    """The index of the device `--backend auto` would take, or None when none works."""
    ok = [s for s in sorted(statuses(), key=lambda s: s.index) if s.ok]
    from compute.opencl.probe import PREFERENCE

    ok.sort(key=lambda s: PREFERENCE.index(s.runtime))  # a simulator last
    return ok[0].index if ok else None
