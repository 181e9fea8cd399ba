"""What one more kernel launch costs a decode step: the case for (or against) fusing kernels.

    python bench/bench_launch_cost.py [--extra 0,30,60,120] [--reps 6] [--steps 64] [--threads 0]

Greedy-decodes --steps tokens of the packaged model after a 64-token prompt on the OpenCL
backend (the replayed pass, as the server runs it), and again with `extra` empty launches
(a one-work-group kernel that writes nothing) spread evenly through each replayed pass.
The variants are interleaved and their order rotated every repetition; prints the median
ms per step of each and the cost of one extra launch. Asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # run as a script from a clone: the repository root

import numpy as np  # noqa: E402
import pyopencl as cl  # noqa: E402

import compute.opencl.backend as clbackend  # noqa: E402
from bench import common  # noqa: E402
from bench.bench_decode import OpenCLEngine  # noqa: E402
from bench.common import machine_line  # noqa: E402
from compute.opencl.replay import replay  # noqa: E402

NOOP = ("__kernel __attribute__((reqd_work_group_size(64, 1, 1))) void noop(__global float* x, int never) "
        "{ if (get_global_id(0) == never) x[0] = 1.0f; }")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--extra", default="0,30,60,120", help="empty launches added per pass, one variant each")
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()

    model = common.model_path()
    eng = OpenCLEngine(model, n_ctx=64 + args.steps + 8, threads=args.threads)
    ctx = eng.pair.target.context
    noop = cl.Program(ctx.backend.context, NOOP).build().noop
    sink = cl.Buffer(ctx.backend.context, cl.mem_flags.READ_WRITE, 64)  # kept: the kernel holds no reference
    noop.set_args(sink, np.int32(1 << 30))
    extra = {"n": 0}

    def replay_with_extra(graph, queue, staging, params, check_rows):
        n = extra["n"]
        if n:  # the same pass, with n empty launches interleaved
            every = max(1, len(graph.launches) // n)
            launches, graph.launches = graph.launches, [
                item for i, la in enumerate(graph.launches)
                for item in ([la, (noop, (64,), (64,))] if i % every == 0 and i // every < n else [la])]
            try:
                return replay(graph, queue, staging, params, check_rows)
            finally:
                graph.launches = launches
        return replay(graph, queue, staging, params, check_rows)

    clbackend.replay = replay_with_extra  # what OpenCLBackend.replay_pass calls
    prompt = common.prompt_ids(model, 64)
    variants = [int(v) for v in args.extra.split(",")]
    times: dict[int, list[float]] = {v: [] for v in variants}
    for rep in range(args.reps):
        for v in variants[rep % len(variants):] + variants[:rep % len(variants)]:
            extra["n"] = v
            tok, pos = int(np.argmax(eng.prefill(prompt))), len(prompt)
            t = time.perf_counter()
            for _ in range(args.steps):
                tok, pos = int(np.argmax(eng.decode(tok, pos))), pos + 1
            times[v].append((time.perf_counter() - t) / args.steps)
    print(f"# {machine_line()}")
    print(f"# {eng.device_line}; {os.path.basename(model)}; {args.steps} greedy steps after 64 tokens; "
          f"median of {args.reps}, order rotated; a pass has {len(next(iter(ctx._passes.values())).launches)} launches")
    base = statistics.median(times[variants[0]])
    for v in variants:
        m = statistics.median(times[v])
        per = f"{(m - base) / (v - variants[0]) * 1e6:+.1f} us per extra launch" if v != variants[0] else ""
        print(f"extra {v:4d} launches per pass: {m * 1e3:7.3f} ms/step  {per}")


if __name__ == "__main__":
    main()
