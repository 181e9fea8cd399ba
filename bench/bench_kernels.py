"""Device time by kernel: one prefill and a few decode steps of a model on the OpenCL backend.

    python bench/bench_kernels.py [--model GGUF] [--prompt 512] [--n-batch 512] [--steps 16]
                                  [--device intel] [--threads 0] [--top 12]

Runs the model's context directly (no engine): a prefill of --prompt tokens in chunks of
--n-batch (as the engine feeds a prompt), then --steps greedy decode steps of one token.
Every command is timed by the device (an OpenCL profiling queue, bench_step.DeviceClock), and
the totals are printed by kernel name: for the prefill in ms, for decode in ms per step, with
the mat-vec launches also split by output size (gsize). Wall time is printed beside the
device's sum; the profiling queue itself adds some time per command. Default model: the
packaged SmolLM2-135M; bench/make_synthetic_1b.py writes the 1.1B-shaped ones. Asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # run as a script from a clone: the repository root

import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from bench.bench_decode import prefill_in_chunks  # noqa: E402
from bench.bench_step import DeviceClock, profiling_backend  # noqa: E402
from bench.common import machine_line  # noqa: E402
from service.common.packaged_model import packaged_model_path  # noqa: E402
from service.fit.factory import PairFactory, PairRequest  # noqa: E402
from service.fit.params import ContextParams, SpeculativeConfig  # noqa: E402


def table(clock: DeviceClock, per: float, unit: str, top: int, split_mv: bool) -> None:
    agg: dict[str, list] = {}
    for what, (sec, cnt) in clock.by_kind.items():
        key = what if split_mv else what.split(" gsize")[0]
        a = agg.setdefault(key, [0.0, 0])
        a[0] += sec
        a[1] += cnt
    tot = sum(v[0] for v in agg.values())
    for what, (sec, cnt) in sorted(agg.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"  {sec / per * 1e3:9.2f} {unit} {100 * sec / tot:5.1f}%  {cnt / per:6.0f} x  {what}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--n-batch", type=int, default=512)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--device", default="")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()

    clock = DeviceClock()
    be = profiling_backend(args.device, args.threads)
    model = args.model or packaged_model_path()
    pair = PairFactory(be, device_memory_bytes=1 << 34).load(PairRequest(
        target_path=model, params=ContextParams(n_ctx=max(256, args.prompt + args.steps + 8), n_batch=args.n_batch),
        speculative=SpeculativeConfig("none")))
    ctx = pair.target.context
    print(f"# {machine_line()}")
    print(f"# {be.platform.name.strip()} / {be.device.name.strip()}; threads={args.threads or 'all'}; "
          f"{os.path.basename(model)}")
    prompt = [int(t) for t in np.random.default_rng(0).integers(100, 40000, args.prompt)]
    prefill_in_chunks(ctx, prompt[:8])  # builds the kernels; its cells are overwritten below
    common.numpy_decode_one(ctx, 1, 8)
    clock.take()
    clock.by_kind.clear()
    t = time.perf_counter()
    row = prefill_in_chunks(ctx, prompt)
    wall = time.perf_counter() - t
    dev = clock.take()
    print(f"prefill of {args.prompt} tokens (chunks of {args.n_batch}): wall {wall * 1e3:.1f} ms, "
          f"device {dev * 1e3:.1f} ms")
    table(clock, 1.0, "ms", args.top, split_mv=False)
    clock.by_kind.clear()
    common.numpy_decode_one(ctx, int(np.argmax(row)), args.prompt)  # records the one-row pass
    clock.take()
    clock.by_kind.clear()
    t = time.perf_counter()
    tok = 1
    for i in range(args.steps):
        row = common.numpy_decode_one(ctx, tok, args.prompt + 1 + i)
        tok = int(np.argmax(row))
    wall = time.perf_counter() - t
    dev = clock.take()
    print(f"decode, {args.steps} steps after {args.prompt + 1} cells: wall {wall / args.steps * 1e3:.2f} ms/step, "
          f"device {dev / args.steps * 1e3:.2f} ms/step")
    table(clock, float(args.steps), "ms/step", args.top, split_mv=True)
    pair.release()


if __name__ == "__main__":
    main()
