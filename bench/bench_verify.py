"""The cost of a verify batch: one decode call of k rows vs one row.

    python bench/bench_verify.py [--threads 0] [--reps 15] [--device intel] [--rows 1,2,4,8,9]

The packaged model on the OpenCL backend: a 64-token prefix in slot 0, then decode calls of k
rows at positions 64.. (logits of every row read back, as a verify step does). The matmuls'
row tiling is compared in the same process, repetitions interleaved:

  tiles   the backend's rule (compute/opencl/backend.py `_tile_rows`): 9 rows = one 9-row tile
  pow2    the previous rule: tiles of the smallest power of two >= k up to mat_rows (8), so 9
          rows = an 8-row tile plus a second full tile holding one row

Prints the median milliseconds of each k and its cost relative to k = 1, and checks that the
rows' logits are bit-identical between the two rules and to one row at a time (batch
invariance). Asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # run as a script from a clone: the repository root

import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from compute.llama import Batch  # noqa: E402
from compute.opencl import backend as clb  # noqa: E402


def pow2_tiles(n: int, mat_rows: int) -> int:
    nr = 1
    while nr < min(n, mat_rows):
        nr *= 2
    return nr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="")
    ap.add_argument("--threads", type=int, default=0, help="CPU runtime worker threads (0: all cores)")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--rows", default="1,2,4,8,9")
    args = ap.parse_args()

    from compute.select import opencl_backend
    from service.fit.factory import PairFactory, PairRequest
    from service.fit.params import ContextParams, SpeculativeConfig

    be = opencl_backend(args.device, args.threads)
    model = common.model_path()
    pair = PairFactory(be, device_memory_bytes=1 << 34).load(PairRequest(
        target_path=model, params=ContextParams(n_ctx=256, n_batch=64, n_outputs_max=16),
        speculative=SpeculativeConfig("none")))
    ctx = pair.target.context
    prompt = common.prompt_ids(model, 64 + 16)
    ctx.decode(Batch.make(prompt[:64], range(64), [0] * 64, [63]))
    ks = [int(k) for k in args.rows.split(",")]
    rules = {"tiles": clb._tile_rows, "pow2": pow2_tiles}

    def call(k):
        return ctx.decode(Batch.make(prompt[64:64 + k], range(64, 64 + k), [0] * k, range(k)))

    times = {(r, k): [] for r in rules for k in ks}
    logits = {}
    for rep in range(args.reps + 1):
        order = list(rules) if rep % 2 == 0 else list(rules)[::-1]
        for r in order:
            clb._tile_rows = rules[r]
            for k in ks:
                t0 = time.perf_counter()
                out = call(k)
                if rep:  # the first round builds the kernels
                    times[(r, k)].append(time.perf_counter() - t0)
                logits[(r, k)] = out
    clb._tile_rows = rules["tiles"]
    alone = np.concatenate([ctx.decode(Batch.make([t], [64 + i], [0], [0]))
                            for i, t in enumerate(prompt[64:64 + max(ks)])])
    print(f"# {common.machine_line()}")
    print(f"# {be.platform.name.strip()} / {be.device.name.strip()}; threads={args.threads or 'all'}; "
          f"mat_rows={be.mat_rows}; 64-token prefix; medians of {args.reps} interleaved repetitions")
    print(f"{'rule':6} " + " ".join(f"{f'k={k} ms':>9}" for k in ks) + "  "
          + " ".join(f"{f'k{k}/k1':>6}" for k in ks[1:]))
    for r in rules:
        med = [statistics.median(times[(r, k)]) for k in ks]
        print(f"{r:6} " + " ".join(f"{m * 1e3:9.2f}" for m in med) + "  "
              + " ".join(f"{m / med[0]:6.2f}" for m in med[1:]))
    same = all(np.array_equal(logits[("tiles", k)], logits[("pow2", k)]) for k in ks)
    inv = all(np.array_equal(logits[("tiles", k)], alone[:k]) for k in ks)
    print(f"bit-identical between the rules: {same}; every row equal to the row decoded alone: {inv}")
    pair.release()


if __name__ == "__main__":
    main()
