"""Would integer activations make the 4-bit mat-vec faster here? A probe of the OpenCL CPU compiler.

    python bench/int_activation_probe.py [--shape 5632x2048] [--reps 30] [--cold-mib 256] [--asm]

llama.cpp's CPU kernels round activations to 8 bits and multiply them with the weights' codes
by byte dot products (vpdpbusd with AVX512-VNNI, vpmaddubsw with AVX2): 32-64 products per
instruction, where a float32 kernel does 16 fmas per instruction after converting the codes.
This times, on the OpenCL device the server would pick, the committed float32 Q4_K mat-vec
(compute/opencl/kernels/mul_mv_q4_k_f32.cl) against Q4_K mat-vecs with integer activations
written four ways in OpenCL C (bench/kernels/q4k_int_activations.cl), interleaved, weights
cold (copies cycled), one row. Each integer kernel is checked against float64 NumPy of the
same rounded activations. --asm also counts, in the assembly Intel's CPU runtime dumps
(CL_CONFIG_DUMP_ASM), the byte and word dot-product instructions each kernel was given,
including a work-item-per-lane kernel built on cl_khr_integer_dot_product's dot(). Prints its
figures; asserts nothing. docs/benchmarks.md has what it printed.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # run as a script from a clone: the repository root

import gguf  # noqa: E402
import numpy as np  # noqa: E402
import pyopencl as cl  # noqa: E402
from gguf import GGMLQuantizationType as T  # noqa: E402

from bench.bench_matvec import random_raw  # noqa: E402
from bench.common import machine_line  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
KDIR = os.path.join(HERE, "..", "compute", "opencl", "kernels")
PROBE_CL = os.path.join(HERE, "kernels", "q4k_int_activations.cl")
INT_KERNELS = {"q4k_i8_pairs": np.int8, "q4k_i8_sat": np.int8, "q4k_i16_pairs": np.int16, "q4k_i16_mul": np.int16}
DOT_INSNS = ("vpdpbusd", "vpmaddubsw", "vpdpwssd", "vpmaddwd", "vfmadd")


def count_insns() -> None:
    """Build both sources in a child process with the runtime's assembly dump on; count per kernel."""
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, CL_CONFIG_DUMP_ASM="True", CL_CONFIG_DUMP_FILE_NAME_PREFIX=os.path.join(tmp, "k"),
                   PYOPENCL_NO_CACHE="1")
        subprocess.run([sys.executable, __file__, "--build-only"], env=env, check=True)
        text = "".join(open(f).read() for f in glob.glob(os.path.join(tmp, "*.s")))
    if not text:
        print("no assembly dumped (CL_CONFIG_DUMP_ASM is Intel's CPU runtime's)")
        return
    print(f"\ninstructions in each kernel's body (the runtime's assembly dump): {', '.join(DOT_INSNS)}")
    for name in ["mul_mv_q4_k_f32", *INT_KERNELS, "simt_dot4"]:
        m = re.search(rf"^{name}:\n(.*?)\.Lfunc_end", text, re.S | re.M)
        if not m:
            print(f"{name:18} (not found in the dump)")
            continue
        body = m.group(1)
        counts = [len(re.findall(r"^\s+" + i + r"[a-z0-9]*\s", body, re.M)) for i in DOT_INSNS]
        total = len(re.findall(r"^\s+[a-z]", body, re.M))
        line = "  ".join(f"{i} {c:3d}" for i, c in zip(DOT_INSNS, counts))
        print(f"{name:18} {line}   ({total} instructions)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="5632x2048", help="N x K of the Q4_K weight matrix (K a multiple of 256)")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--cold-mib", type=int, default=256)
    ap.add_argument("--device", default="")
    ap.add_argument("--asm", action="store_true", help="also count dot-product instructions (Intel's CPU runtime)")
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    from compute.opencl.programs import BuildProfile
    from compute.select import opencl_backend

    be = opencl_backend(args.device, 0)
    ctx = be.context
    opts = [*BuildProfile.of(be.platform, be.device).options, "-I", KDIR]
    float_k = cl.Program(ctx, open(os.path.join(KDIR, "mul_mv_q4_k_f32.cl")).read()).build(
        options=[*opts, "-DNR=1", "-DSEGS=1"]).mul_mv_q4_k_f32
    probe = cl.Program(ctx, open(PROBE_CL).read()).build(options=[o for o in opts if not o.startswith("-cl-std")]
                                                          + ["-cl-std=CL3.0"])
    if args.build_only:
        return
    N, K = (int(v) for v in args.shape.split("x"))
    q = cl.CommandQueue(ctx, properties=cl.command_queue_properties.PROFILING_ENABLE)
    mf, i32 = cl.mem_flags, np.int32
    rng = np.random.default_rng(0)
    raw0, copies = None, []
    while len(copies) < 2 or len(copies) * raw0.nbytes < args.cold_mib << 20:
        raw = np.ascontiguousarray(random_raw(rng, T.Q4_K, (N, K)))
        raw0 = raw if raw0 is None else raw0
        buf = cl.Buffer(ctx, mf.READ_WRITE, raw.nbytes)
        cl.enqueue_copy(q, buf, raw, is_blocking=True)
        copies.append(buf)
    x = rng.standard_normal(K).astype(np.float32)
    xb = x.reshape(-1, 256)
    dx = (np.abs(xb).max(1) / 127).astype(np.float32)  # 8-bit range; int16 kernels get the same integers
    xq = np.round(xb / dx[:, None]).astype(np.int32)
    xs = xq.reshape(-1, 32).sum(1).astype(np.int32)
    buf = lambda a: cl.Buffer(ctx, mf.READ_ONLY | mf.COPY_HOST_PTR, hostbuf=np.ascontiguousarray(a))  # noqa: E731
    bx, bd, bs = buf(x), buf(dx), buf(xs)
    bq = {np.int8: buf(xq.astype(np.int8).reshape(-1)), np.int16: buf(xq.astype(np.int16).reshape(-1))}
    out = cl.Buffer(ctx, mf.READ_WRITE, N * 4)
    gsize = (1, -(-N // 16) * 16, 1)

    runs = {"float32 (committed)": lambda w: float_k(q, gsize, (1, 16, 1), bx, i32(0), i32(K), i32(1), w, out,
                                                    i32(0), out, i32(0), i32(0), i32(N))}
    for name, dt in INT_KERNELS.items():
        runs[name] = (lambda k, xqb: lambda w: k(q, gsize[:2], (1, 16), xqb, bd, bs, i32(K), w, out, i32(N)))(
            getattr(probe, name), bq[dt])
    results = {}
    for name, run in runs.items():
        run(copies[0]).wait()
        r = np.empty(N, np.float32)
        cl.enqueue_copy(q, r, out)
        results[name] = r
    times = {name: [] for name in runs}
    for rep in range(args.reps):
        for i, (name, run) in enumerate(runs.items()):
            ev = run(copies[(rep * len(runs) + i) % len(copies)])
            ev.wait()
            times[name].append((ev.profile.end - ev.profile.start) * 1e-9)

    W = gguf.quants.dequantize(raw0, T.Q4_K).reshape(N, K).astype(np.float64)
    ref_f = W @ x.astype(np.float64)
    ref_q = W @ (xq * dx[:, None].astype(np.float64)).reshape(-1)
    print(f"# {machine_line()}")
    print(f"# {be.platform.name.strip()} / {be.device.name.strip()}; Q4_K {N}x{K} ({raw0.nbytes / 2**20:.2f} MiB), "
          f"one row, median of {args.reps} launches, weights cold (copies >= {args.cold_mib} MiB cycled)")
    base = statistics.median(times["float32 (committed)"])
    print(f"{'kernel':20} {'us':>8} {'GB/s':>6} {'vs float32':>10}  max |err| / max |ref|")
    for name in runs:
        t = statistics.median(times[name])
        ref = ref_f if name.startswith("float") else ref_q
        err = np.abs(results[name] - ref).max() / np.abs(ref).max()
        print(f"{name:20} {t * 1e6:8.1f} {raw0.nbytes / t / 1e9:6.1f} {base / t:9.2f}x  {err:.1e}"
              + ("  (vs float64 of the exact x)" if name.startswith("float") else "  (vs float64 of the rounded x)"))
    moved = np.abs(ref_q - ref_f).max() / np.abs(ref_f).max()
    print(f"rounding x to 8 bits per 256 moves the float64 result by {moved:.1e} (max |diff| / max |ref|)")
    if args.asm:
        count_insns()


if __name__ == "__main__":
    main()
