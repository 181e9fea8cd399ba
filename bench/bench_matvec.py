"""The matrix kernels alone: device time of out = x (n, K) @ W^T per weight type, shape and row count.

    python bench/bench_matvec.py [--types q4_1,q4_k] [--shapes 1536x576,5632x2048] [--rows 1,2,4,8,9]
                                 [--reps 20] [--device intel] [--threads 0] [--define NAME[=VALUE]] [--cold-mib 256]

Each launch is timed by the device (an OpenCL profiling queue; the median of --reps launches
after one warm launch). Prints microseconds per launch, the cost of n rows relative to one
row, and the weight bytes read per second (the weights once per launch: what a mat-vec must
stream). By default one copy of the weights is launched on again and again, so small shapes
run from the caches; --cold-mib cycles through copies totalling that much, so every launch
streams its weights from memory as a decode step does. --define NAME times each kernel also
built with -DNAME=1 (or -DNAME=VALUE), interleaved, with the ratio. Asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # run as a script from a clone: the repository root

import gguf  # noqa: E402
import numpy as np  # noqa: E402
import pyopencl as cl  # noqa: E402
from gguf import GGMLQuantizationType as T  # noqa: E402

from bench.common import machine_line  # noqa: E402
from compute.backend import BufferSpec, Proj  # noqa: E402
from compute.opencl.backend import CLArray  # noqa: E402
from compute.select import opencl_backend  # noqa: E402

TYPES = {"q4_0": T.Q4_0, "q4_1": T.Q4_1, "q8_0": T.Q8_0, "q4_k": T.Q4_K, "q6_k": T.Q6_K, "f16": T.F16}


K_ALIGN = {T.Q4_K: 256, T.Q6_K: 256}


def random_raw(rng, t, shape):
    """File bytes of a random tensor (K types: valid blocks with random codes and sane scales)."""
    N, K = shape
    if t in (T.Q4_0, T.Q4_1, T.Q8_0):
        return gguf.quants.quantize(rng.standard_normal(shape).astype(np.float32), t)
    if t == T.F16:
        return rng.standard_normal(shape).astype(np.float16)
    nb = N * K // 256
    f16 = lambda lo, hi: rng.uniform(lo, hi, nb).astype(np.float16).view(np.uint8).reshape(nb, 2)  # noqa: E731
    u8 = lambda k: rng.integers(0, 256, (nb, k), dtype=np.uint8)  # noqa: E731
    if t == T.Q4_K:
        parts = [f16(1e-3, 2e-2), f16(1e-3, 2e-2), u8(12), u8(128)]
    else:  # Q6_K
        parts = [u8(128), u8(64), u8(16), f16(1e-4, 2e-3)]
    return np.concatenate(parts, axis=1).reshape(N, -1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", default="q4_1,q8_0,q4_0,q4_k")
    ap.add_argument("--shapes", default="1536x576,5632x2048", help="N x K of the weight matrix")
    ap.add_argument("--rows", default="1,2,4,8,9")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--device", default="")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--segs", type=int, default=1, help="projections of the same x per launch (1 or 2: gate+up)")
    ap.add_argument("--mat-rows", type=int, default=0, help="the mat-mat tile (default: the backend's)")
    ap.add_argument("--define", default="",
                    help="A/B: also time each kernel built with -D<this>=1 (or NAME=VALUE), interleaved")
    ap.add_argument("--ab-x-tile", action="store_true",
                    help="A/B: also time each row count without the backend's x-tile cap on the mat-mat tile "
                         "(OpenCLBackend.x_tile_bytes = 0), interleaved; the ratio row is uncapped / capped")
    ap.add_argument("--cold-mib", type=int, default=0,
                    help="cycle through copies of the weights totalling at least this many MiB, so every launch "
                         "reads them from memory as a decode step does (default 0: one copy, cache-warm)")
    args = ap.parse_args()
    if args.define and args.ab_x_tile:
        ap.error("--define and --ab-x-tile: one A/B at a time")

    be = opencl_backend(args.device, args.threads)
    be.mat_rows = args.mat_rows or be.mat_rows
    q = cl.CommandQueue(be.context, properties=cl.command_queue_properties.PROFILING_ENABLE)
    be.queue = be.kernels.queue = be.staging.queue = q
    events = []
    orig = cl.enqueue_nd_range_kernel

    def grab(*a, **kw):
        ev = orig(*a, **kw)
        events.append(ev)
        return ev
    cl.enqueue_nd_range_kernel = grab
    print(f"# {machine_line()}")
    print(f"# {be.platform.name.strip()} / {be.device.name.strip()}; threads={args.threads or 'all'}; "
          f"median of {args.reps} launches; " + (f"weights cold (copies >= {args.cold_mib} MiB cycled)"
                                                 if args.cold_mib else "weights cache-warm (one copy)"))
    rows = [int(r) for r in args.rows.split(",")]
    rng = np.random.default_rng(0)
    print(f"{'type':5} {'N x K':>11} {'MiB':>6} " + " ".join(f"{f'{r} rows us':>10}" for r in rows)
          + " " + " ".join(f"{f'x{r}':>5}" for r in rows[1:]) + f" {'GB/s@1':>7}")
    for tname in args.types.split(","):
        t = TYPES[tname]
        for shape in args.shapes.split(","):
            if K_ALIGN.get(t, 32) and int(shape.split("x")[1]) % K_ALIGN.get(t, 32):
                continue
            N, K = (int(v) for v in shape.split("x"))
            ws, nbytes = [], 0
            for _ in range(args.segs):
                raw = random_raw(rng, t, (N, K))
                spec = BufferSpec("target", "weights", "w", "device", be.weight_nbytes(t, (N, K)))
                ws.append(be.load_weight(be.allocate("bench", spec), t, (N, K), raw))
                nbytes += spec.nbytes
            copies = [ws]
            while len(copies) * nbytes < args.cold_mib << 20:  # more weights of the same shape, elsewhere in memory
                copies.append([be.load_weight(be.allocate("bench", BufferSpec(
                    "target", "weights", "w", "device", be.weight_nbytes(t, (N, K)))), t, (N, K),
                    random_raw(rng, t, (N, K))) for _ in ws])
            dname, _, dval = args.define.partition("=")
            variants = [{}] + ([{dname: dval or 1}] if args.define else [])
            x_tiles = [be.x_tile_bytes] + ([0] if args.ab_x_tile else [])  # aligned with variants
            if args.ab_x_tile:
                variants.append({})
            times = {i: [] for i in range(len(variants))}  # variant -> per row count: median seconds
            for n in rows:
                x = rng.standard_normal((n, K)).astype(np.float32)
                xb = cl.Buffer(be.context, cl.mem_flags.READ_WRITE | cl.mem_flags.COPY_HOST_PTR, hostbuf=x)
                xa = CLArray(xb, 0, (n, K), np.float32)
                outs = [CLArray(cl.Buffer(be.context, cl.mem_flags.READ_WRITE, n * N * 4), 0, (n, N), np.float32)
                        for _ in ws]
                got = {i: [] for i in times}
                for rep in range(args.reps + 1):
                    for i, extra in enumerate(variants):  # interleaved
                        be.kernel = lambda fname, __e=extra, **d: be.kernels.kernel(fname, **d, **__e)
                        be.x_tile_bytes = x_tiles[i] if args.ab_x_tile else x_tiles[0]
                        events.clear()
                        cws = copies[(rep * len(variants) + i) % len(copies)]
                        be.matmuls(xa, [Proj(w, o) for w, o in zip(cws, outs)])
                        q.finish()
                        if rep:  # the first launch builds the kernel
                            got[i].append(sum(e.profile.end - e.profile.start for e in events) * 1e-9)
                for i in times:
                    times[i].append(statistics.median(got[i]))
            for i, extra in enumerate(variants):
                ts = times[i]
                name = tname + ("" if not extra else f"+{args.define}")
                name += " no x-tile cap" if args.ab_x_tile and i else ""
                print(f"{name:5} {shape:>11} {nbytes / 2**20:6.2f} " + " ".join(f"{s * 1e6:10.1f}" for s in ts)
                      + " " + " ".join(f"{s / ts[0]:5.2f}" for s in ts[1:]) + f" {nbytes / ts[0] / 1e9:7.1f}")
            if args.define or args.ab_x_tile:
                print(f"{'':5} {'ratio':>11} {'':6} " + " ".join(f"{b / a:10.3f}" for a, b in zip(times[0], times[1])))

if __name__ == "__main__":
    main()
