"""The kernels as a GPU would punish them: every kernel and copy the OpenCL backend launches, run at
tiny shapes under Oclgrind (an OpenCL simulator that checks every memory access) with its
out-of-bounds, API and data-race checks on; the suite fails on any report.

What runs there: tests/test_opencl_kernels.py (every matmul type, the K-quants included, in the
device's own and the NVIDIA build; embed/get_rows of every type; rms_norm, add, swiglu, rope; KV
store and attention; the fused matmuls, add+rms_norm, rope pair and rope+KV store) except the
batch-invariance sweep (a property of the arithmetic, checked on the real runtimes; ~3 min more
under Oclgrind), and tests/test_opencl_paths.py (kv_copy, the prompt-store copies, attention over
several work-groups and 10 chunks of cells, whole tiny models of every native type with replayed
passes). A canary kernel with an out-of-bounds read and a local-memory race proves the checks
report what they should.

Oclgrind comes from Debian (`apt-get install oclgrind`; scripts/setup.sh installs it where apt is
available) and ships no ICD file: the tests write one and point OCL_ICD_VENDORS at it, so the
child processes see Oclgrind alone. Without Oclgrind these tests skip, saying so.

Oclgrind's uninitialised-value check (OCLGRIND_UNINITIALIZED=1) cannot run on the kernels its own
compiler emits: clang 14 turns `t / E ... t % E` into a `freeze` instruction, which the plugin of
Oclgrind 21.10 does not implement (OCLGRIND FATAL ERROR, Uninitialized.cpp: "Unsupported instruction:
freeze"), and the process dies. A three-line kernel that is none of ours dies the same way, so the
crash is Oclgrind's; the last test runs the check on our kernels as soon as the plugin can.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ICD_LIBRARY = os.environ.get("OCLGRIND_ICD", "/usr/lib/oclgrind/liboclgrind-rt-icd.so")  # Debian's path
KERNEL_TESTS = ["tests/test_opencl_kernels.py", "tests/test_opencl_paths.py"]
NOT_UNDER_OCLGRIND = "not batch_invariant and not tunings_fit"  # see the module docstring
CHECKS = {"OCLGRIND_CHECK_API": "1", "OCLGRIND_DATA_RACES": "1"}  # out-of-bounds accesses are always checked

CANARY = r'''
import numpy as np, pyopencl as cl
ctx = cl.Context([cl.get_platforms()[0].get_devices()[0]]); q = cl.CommandQueue(ctx)
src = """
__kernel void oob(__global const float* x, __global float* y) { int i = get_global_id(0); y[i] = x[i + 1]; }
__kernel void race(__global float* y) {
    __local float t[1]; t[0] = (float)get_local_id(0); barrier(CLK_LOCAL_MEM_FENCE); y[get_global_id(0)] = t[0]; }
"""
p = cl.Program(ctx, src).build()
mf = cl.mem_flags
x = cl.Buffer(ctx, mf.READ_WRITE, 16); y = cl.Buffer(ctx, mf.READ_WRITE, 16)
p.oob(q, (4,), (4,), x, y); p.race(q, (4,), (4,), y); q.finish(); print("ran")
'''

FREEZE = r'''
import numpy as np, pyopencl as cl
ctx = cl.Context([cl.get_platforms()[0].get_devices()[0]]); q = cl.CommandQueue(ctx)
src = """__kernel void k(__global const float* x, __global float* y, int n) {
    const int t = get_global_id(0); const int i = t / n, e = t % n; y[t] = x[(size_t)i * n + e]; }"""
p = cl.Program(ctx, src).build()
x = cl.Buffer(ctx, cl.mem_flags.READ_WRITE, 16); y = cl.Buffer(ctx, cl.mem_flags.READ_WRITE, 16)
p.k(q, (4,), None, x, y, np.int32(2)); q.finish(); print("ran")
'''


@pytest.fixture(scope="module")
def vendors(tmp_path_factory) -> Path:
    """A vendors folder holding Oclgrind's ICD file alone."""
    if not os.path.isfile(ICD_LIBRARY):
        pytest.skip(f"Oclgrind is not installed ({ICD_LIBRARY} is missing): `apt-get install oclgrind` "
                    "(scripts/setup.sh does it where apt is available), or set OCLGRIND_ICD to its ICD library")
    d = tmp_path_factory.mktemp("oclgrind_vendors")
    (d / "oclgrind.icd").write_text(ICD_LIBRARY + "\n")
    return d


def run(vendors: Path, log: Path, args: list[str], timeout: float = 1200, **env) -> subprocess.CompletedProcess:
    """A child Python process that sees Oclgrind alone, its diagnostics written to `log`."""
    full = dict(os.environ, OCL_ICD_VENDORS=str(vendors), SPECSERVE_OPENCL_DEVICE="Oclgrind", OCLGRIND_LOG=str(log),
                PYTHONPATH=str(ROOT), **CHECKS, **env)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def reports(log: Path) -> str:
    return log.read_text(errors="replace") if log.exists() else ""


def test_the_checks_report_an_out_of_bounds_read_and_a_local_memory_race(vendors, tmp_path):
    log = tmp_path / "canary.log"
    r = run(vendors, log, ["-c", CANARY], timeout=120)
    assert "ran" in r.stdout, r.stderr[-2000:]
    text = reports(log)
    assert "Invalid read" in text, text[:2000]
    assert "data race" in text.lower(), text[:2000]


def test_every_kernel_the_backend_launches_runs_clean_under_oclgrind(vendors, tmp_path):
    log = tmp_path / "kernels.log"
    r = run(vendors, log, ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "-k", NOT_UNDER_OCLGRIND,
                           *KERNEL_TESTS])
    tail = (r.stdout + r.stderr)[-3000:]
    assert r.returncode == 0, tail
    summary = r.stdout.strip().splitlines()[-1]
    passed = int(re.search(r"(\d+) passed", summary).group(1))
    assert passed >= 140 and "skipped" not in summary, summary  # Oclgrind ran them all: none skipped
    assert reports(log) == "", f"Oclgrind reported:\n{reports(log)[:4000]}"


def test_oclgrind_is_listed_as_a_simulator_and_auto_never_serves_on_it(vendors, tmp_path):
    code = ("import compute.opencl\n"
            "from compute.select import BackendUnavailable, device_report, make_backend\n"
            "print('\\n'.join(device_report()))\n"
            "try:\n    print('chosen', make_backend('opencl'))\nexcept BackendUnavailable as e:\n"
            "    print('refused', e)\n")
    r = run(vendors, tmp_path / "probe.log", ["-c", code], timeout=300)
    assert "[simulator] unusable: a simulator" in r.stdout, r.stdout + r.stderr[-2000:]
    outcome = r.stdout.strip().splitlines()[-1]  # PoCL's loader, bundled with pyopencl, may add PoCL beside it
    assert outcome.startswith(("chosen", "refused")) and "Oclgrind" not in outcome.split(" (")[0], r.stdout


def test_uninitialised_values_once_oclgrind_can_check_them(vendors, tmp_path):
    probe = run(vendors, tmp_path / "freeze.log", ["-c", FREEZE], timeout=120, OCLGRIND_UNINITIALIZED="1")
    if "Unsupported instruction: freeze" in reports(tmp_path / "freeze.log") + probe.stderr:
        pytest.skip("Oclgrind's uninitialised-value plugin cannot run LLVM's `freeze` (a kernel of three lines, "
                    "none of ours, dies the same way): the check waits for an Oclgrind that implements it")
    log = tmp_path / "uninit.log"
    r = run(vendors, log, ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", NOT_UNDER_OCLGRIND, *KERNEL_TESTS],
            OCLGRIND_UNINITIALIZED="1")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert reports(log) == "", f"Oclgrind reported:\n{reports(log)[:4000]}"
