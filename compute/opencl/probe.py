"""Probe an OpenCL device before using it: build the backend's own kernels and check a result.

A runtime can list a device and still be unable to serve: PoCL's LLVM 14 builds simple
kernels on a Zen 4 CPU but fails the attention kernel (INVALID_KERNEL_NAME), and then aborts
the whole process when the failed program is freed. So each probe runs in a child process
(`python -m compute.opencl.probe INDEX`): a runtime that fails, hangs or crashes there costs
the server nothing but the probe's time.

The probe runs the backend's real code path on a few rows: the f16 KV-cache store, causal
GQA attention (float16 vectors, exp) and the f32 matrix kernel in its mat-vec and mat-mat
builds, and compares them with the same arithmetic in NumPy.

    probe_devices() -> [DeviceStatus]   every device, probed in parallel, best first
    python -m compute.opencl.probe 1    probe device 1 here and print the result as JSON
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np

PROBE_TIMEOUT = 300.0  # seconds; a cold build on a slow CPU takes a few
TIMED_RUNS = 3  # runs of the built probe workload timed after the checked one (the fastest counts)
# A working device whose timed probe run is this many times slower than the fastest working device's
# is never chosen: a GPU's launch cost or a CPU runtime's threads differ by a few times on the probe's
# tiny shapes; an interpreter differs by hundreds.
SLOWER_MAX = 20.0
# Devices that interpret kernels (for checking them, not for serving): recognised by name
SIMULATORS = ("oclgrind", "simulator", "emulator")
TOLERANCE = dict(rtol=1e-3, atol=1e-3)
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


@dataclass(frozen=True)
class DeviceStatus:
    """One OpenCL device and whether it can serve here."""

    index: int  # what OpenCLBackend(device=...) and --device take
    platform: str
    device: str
    runtime: str  # "gpu", "intel-cpu", "pocl" or "other": what select order and logs go by
    ok: bool
    reason: str  # why it cannot serve ("" when ok)
    seconds: float  # the probe's wall time
    run_s: float = 0.0  # the probe workload's time once built (the device's speed on tiny shapes)
    probe_ok: bool = False  # the probe's kernels ran correctly (true of a simulator too: ok is "may serve")

    def line(self) -> str:
        state = f"ok ({self.seconds:.1f} s probe, {self.run_s * 1e3:.2f} ms run)" if self.ok \
            else f"unusable: {self.reason}"
        return f"{self.index}: {self.platform} / {self.device} [{self.runtime}] {state}"


def first_error_line(text: str) -> str:
    """The line of an OpenCL error or build log that says what went wrong."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    for ln in lines:
        low = ln.lower()
        if "error:" in low and not low.startswith("clbuildprogram failed"):
            return ln[:300]
    for i, ln in enumerate(lines[:-1]):  # pyopencl: "Build on <device>:" then the log
        if ln.startswith("Build on") and not lines[i + 1].startswith("(options"):
            head = lines[0].split(" - ")[0]
            return f"{head}: {lines[i + 1]}"[:300]
    return (lines[0] if lines else "unknown error")[:300]


# ---- in the child ----
def run_probe(index: int) -> float:
    """Run the probe workload on device `index`; raises on a build failure or a wrong result. Returns the
    seconds of the fastest of TIMED_RUNS more runs once the kernels are built."""
    import pyopencl as cl
    from gguf import GGMLQuantizationType as T

    from compute.backend import BufferSpec, Ledger
    from compute.llama import layout_nbytes
    from compute.opencl.backend import OpenCLBackend

    be = OpenCLBackend(ledger=Ledger(), device=index)
    rng = np.random.default_rng(0)
    n, n_head, n_head_kv, hd, n_ctx, n_out = 4, 2, 1, 64, 16, 8
    q = rng.standard_normal((n, n_head * hd)).astype(np.float32)
    k = rng.standard_normal((n, n_head_kv * hd)).astype(np.float32)
    v = rng.standard_normal((n, n_head_kv * hd)).astype(np.float32)
    w = rng.standard_normal((n_out, n_head * hd)).astype(np.float32)
    lay = be.param_layout(SimpleNamespace(rope_dim=hd, n_swa=0), n, n)
    lay |= {"q": (q.shape, "f32"), "k": (k.shape, "f32"), "v": (v.shape, "f32"),
            "attn": (q.shape, "f32"), "y": ((n, n_out), "f32"), "y1": ((1, n_out), "f32")}
    cache = {"cache": ((1, 1, n_ctx, n_head_kv * hd), "f16")}
    scratch = be.allocate("probe", BufferSpec("target", "compute", "scratch", "device", layout_nbytes(lay)), lay)
    kc, vc = (be.allocate("probe", BufferSpec("target", "kv_cache", t, "device", layout_nbytes(cache)), cache)
              for t in ("k", "v"))
    wspec = BufferSpec("target", "weights", "w", "device", be.weight_nbytes(T.F32, w.shape))
    wt = be.load_weight(be.allocate("probe", wspec), T.F32, w.shape, w)
    s = scratch.array
    for name, host in (("q", q), ("k", k), ("v", v)):
        cl.enqueue_copy(be.queue, s[name].buf, host, dst_offset=s[name].off * 4, is_blocking=True)
    slots, positions = np.zeros(n, np.int32), np.arange(n, dtype=np.int32)

    def workload():
        with be.forward(s):
            be.kv_store(kc.array["cache"], vc.array["cache"], 0, slots, positions, s["k"], s["v"])
            be.attention(kc.array["cache"], vc.array["cache"], 0, s["q"], slots, positions, n_head, n_head_kv, hd,
                         s["attn"])
            be.matmul(s["attn"], wt, s["y"])
            be.matmul(s["attn"][:1], wt, s["y1"])
            return be.to_host(s["attn"], n), be.to_host(s["y"], n), be.to_host(s["y1"], 1)

    got_attn, got_y, got_y1 = workload()  # the first run builds the kernels
    want_attn = _attention(q, k, v, n_head, n_head_kv, hd)
    np.testing.assert_allclose(got_attn, want_attn, **TOLERANCE, err_msg="attention differs from NumPy")
    np.testing.assert_allclose(got_y, got_attn @ w.T, **TOLERANCE, err_msg="mat-mat differs from NumPy")
    np.testing.assert_allclose(got_y1, got_attn[:1] @ w.T, **TOLERANCE, err_msg="mat-vec differs from NumPy")
    run_s = float("inf")
    for _ in range(TIMED_RUNS):  # built: what is left is the device's own speed (and its launch cost)
        t0 = time.perf_counter()
        workload()
        run_s = min(run_s, time.perf_counter() - t0)
    for a in (scratch, kc, vc):
        be.release(a)
    return run_s


def _attention(q, k, v, n_head, n_head_kv, hd):
    """Causal attention of rows 0..n-1 at positions 0..n-1 over an f16 cache, in float64."""
    k16, v16 = k.astype(np.float16).astype(np.float64), v.astype(np.float16).astype(np.float64)
    out = np.zeros(q.shape, np.float64)
    group = n_head // n_head_kv
    for i in range(q.shape[0]):
        for h in range(n_head):
            kv = slice((h // group) * hd, (h // group + 1) * hd)
            s = k16[: i + 1, kv] @ q[i, h * hd:(h + 1) * hd] / np.sqrt(hd)
            p = np.exp(s - s.max())
            out[i, h * hd:(h + 1) * hd] = (p / p.sum()) @ v16[: i + 1, kv]
    return out


def main(argv: list[str]) -> int:
    """Child entry: probe device argv[0] and print {"ok", "reason", "seconds"} as one JSON line."""
    t0 = time.monotonic()
    try:
        run_s = run_probe(int(argv[0]))
    except AssertionError as e:
        _report(False, "wrong result: " + first_error_line(e), t0)
    except Exception as e:  # noqa: BLE001 - any failure is the probe's answer
        # Report before the traceback (and the failed program it holds) is freed: PoCL aborts then.
        _report(False, first_error_line(f"{type(e).__name__}: {e}"), t0)
    _report(True, "", t0, run_s)
    return 0


def _report(ok: bool, reason: str, t0: float, run_s: float = 0.0) -> None:
    sys.stdout.write(json.dumps({"ok": ok, "reason": reason, "seconds": time.monotonic() - t0,
                                 "run_s": run_s}) + "\n")
    sys.stdout.flush()
    os._exit(0)  # skip the runtimes' teardown too


# ---- in the parent ----
def runtime_of(platform_name: str, is_gpu: bool, device_name: str = "") -> str:
    """"simulator", "gpu", "intel-cpu", "pocl" or "other" for a device of this platform."""
    name = platform_name.lower()
    if is_simulator(platform_name, device_name):
        return "simulator"
    if is_gpu:
        return "gpu"
    if "intel" in name:
        return "intel-cpu"
    if "portable computing language" in name or "pocl" in name:
        return "pocl"
    return "other"


def is_simulator(platform_name: str, device_name: str) -> bool:
    """Whether a device interprets kernels (Oclgrind calls itself a GPU)."""
    names = f"{platform_name} {device_name}".lower()
    return any(word in names for word in SIMULATORS)


# Which working device `--backend auto` takes: a GPU, then Intel's CPU runtime (faster than
# PoCL on every CPU measured: docs/opencl-runtimes.md), then PoCL, then anything else.
# A simulator is never usable for serving (judge_speed), whatever it calls itself.
PREFERENCE = ("gpu", "intel-cpu", "pocl", "other", "simulator")


def _probe_child(index: int, timeout: float) -> tuple[bool, str, float, float]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p)
    t0 = time.monotonic()
    try:
        r = subprocess.run([sys.executable, "-m", "compute.opencl.probe", str(index)], env=env, timeout=timeout,
                           capture_output=True, text=True, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return False, f"the probe did not finish within {timeout:.0f} s", time.monotonic() - t0, 0.0
    for line in reversed(r.stdout.splitlines()):
        if line.startswith("{"):
            res = json.loads(line)
            return bool(res["ok"]), res["reason"], float(res["seconds"]), float(res.get("run_s", 0.0))
    how = f"signal {-r.returncode}" if r.returncode < 0 else f"exit status {r.returncode}"
    last = [ln for ln in r.stderr.splitlines() if ln.strip()][-1:] or ["no output"]
    return False, f"the probe process died ({how}): {last[0].strip()[:300]}", time.monotonic() - t0, 0.0


def probe_devices(timeout: float = PROBE_TIMEOUT) -> list[DeviceStatus]:
    """Every OpenCL device with the result of its probe, working ones first in PREFERENCE order."""
    import pyopencl as cl

    from compute.opencl.backend import _all_devices

    devs = _all_devices()
    with ThreadPoolExecutor(max_workers=max(1, len(devs))) as pool:
        results = list(pool.map(lambda i: _probe_child(i, timeout), range(len(devs))))
    out = [DeviceStatus(i, p.name.strip(), d.name.strip(),
                        runtime_of(p.name, bool(d.type & cl.device_type.GPU), d.name),
                        ok, reason, secs, run_s, ok)
           for i, ((p, d), (ok, reason, secs, run_s)) in enumerate(zip(devs, results))]
    return ranked(out)


def ranked(statuses: list[DeviceStatus]) -> list[DeviceStatus]:
    """Simulators and devices far slower than the fastest working one made unusable (with the reason),
    then working ones first in PREFERENCE order."""
    out = judge_speed(statuses)
    return sorted(out, key=lambda s: (not s.ok, PREFERENCE.index(s.runtime), s.index))


def judge_speed(statuses: list[DeviceStatus]) -> list[DeviceStatus]:
    """A simulator is never for serving; a working device whose timed probe run is over SLOWER_MAX times the
    fastest working device's is not either (`--list-devices` says which and by how much)."""
    fastest = min((s for s in statuses if s.ok and s.runtime != "simulator" and s.run_s > 0),
                  key=lambda s: s.run_s, default=None)
    out = []
    for s in statuses:
        if s.ok and s.runtime == "simulator":
            s = replace(s, ok=False, reason=f"a simulator: it interprets kernels, orders of magnitude slower than "
                                            f"any runtime (probe passed, {s.run_s * 1e3:.2f} ms run); "
                                            "it checks kernels (tests), it does not serve")
        elif s.ok and fastest is not None and s.run_s > SLOWER_MAX * fastest.run_s:
            s = replace(s, ok=False, reason=f"far slower than device {fastest.index} ({fastest.device}): "
                                            f"{s.run_s * 1e3:.2f} ms vs {fastest.run_s * 1e3:.2f} ms on the probe "
                                            f"(over {SLOWER_MAX:g}x)")
        out.append(s)
    return out


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
