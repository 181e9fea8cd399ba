"""Decode and prefill at 1.1B scale: specserve (OpenCL) vs llama.cpp, and the memory bandwidth each reaches.

    python bench/bench_1b.py [--types q4_k_m,q4_0] [--threads 2] [--reps 3] [--prompt 64] [--gen 32]

The models are bench/make_synthetic_1b.py's (TinyLlama-1.1B shapes, random weights, written
first if missing). For each type, both engines run the same greedy loop in one process, their
repetitions interleaved (bench/bench_decode.py's `trial`: the prompt prefilled in one call, then
one token per call with the logits read back). Also measured in the same run: the machine's copy
bandwidth (NumPy copies of a 512 MiB buffer on --threads threads, the best of 5; bytes read +
written per second, as STREAM's copy counts them). Each engine's bandwidth fraction is
(weight bytes per decoded token x decode tok/s) / that bandwidth: a decode step reads every
weight matrix once (the tied output matrix included). Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from a clone: the repository root

import numpy as np  # noqa: E402

from bench import common  # noqa: E402


def copy_bandwidth(threads: int, mib: int = 512, reps: int = 5) -> float:
    """Bytes read + written per second by `threads` threads, each copying its share of a buffer (best of reps)."""
    src = np.ones(mib << 18, np.float32)  # mib MiB
    dst = np.empty_like(src)
    parts = np.array_split(np.arange(src.size), threads)
    bounds = [(int(p[0]), int(p[-1]) + 1) for p in parts]

    def copy(a, b):
        np.copyto(dst[a:b], src[a:b])  # NumPy releases the GIL for a large copy

    best = 0.0
    for _ in range(reps):
        ts = [threading.Thread(target=copy, args=ab) for ab in bounds]
        t0 = time.perf_counter()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        best = max(best, 2 * src.nbytes / (time.perf_counter() - t0))
    return best


def weight_bytes(model: str) -> int:
    """Bytes of the matrices a decode step reads: every 2-D tensor (the tied output is token_embd)."""
    import gguf

    r = gguf.GGUFReader(model)
    return sum(int(t.n_bytes) for t in r.tensors if len(t.shape) >= 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", default="q4_k_m,q4_0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--device", default="", help="OpenCL device (index or name substring)")
    args = ap.parse_args()

    from compute.opencl import runtime

    runtime.set_threads(args.threads)  # before any OpenCL platform query
    from bench.bench_decode import LlamaEngine, OpenCLEngine, trial
    from bench.make_synthetic_1b import make

    bw = copy_bandwidth(args.threads)
    print(f"machine   {common.machine_line()}")
    print(f"threads   {args.threads}; copy bandwidth {bw / 1e9:.1f} GB/s (NumPy, {args.threads} threads, read + write)")
    print(f"{args.reps} interleaved repetitions; prompt {args.prompt} tokens in one call; decode {args.gen} tokens "
          f"one per call; medians")
    print(f"{'model':8} {'engine':18} {'prefill tok/s':>13} {'decode tok/s':>12} {'prefill/llama':>13} "
          f"{'decode/llama':>12} {'GB/s':>6} {'of bw':>6}")
    for kind in args.types.split(","):
        model = str(make(kind.strip()))
        nbytes = weight_bytes(model)
        prompt = common.prompt_ids(model, args.prompt)
        n_ctx = max(256, args.prompt + args.gen + 1)
        engines = [OpenCLEngine(model, n_ctx, args.device, args.threads), LlamaEngine(model, args.threads, n_ctx)]
        for e in engines:
            trial(e, prompt[:8], 2)  # warm-up: kernel builds, page faults
        pre = {e.name: [] for e in engines}
        dec = {e.name: [] for e in engines}
        toks = {}
        for rep in range(args.reps):
            for e in (engines if rep % 2 == 0 else engines[::-1]):
                p, d, t = trial(e, prompt, args.gen)
                pre[e.name].append(args.prompt / p)
                dec[e.name].append(args.gen / d)
                toks[e.name] = t
        base = engines[1].name
        for e in engines:
            p, d = statistics.median(pre[e.name]), statistics.median(dec[e.name])
            gbs = nbytes * d / 1e9
            print(f"{kind:8} {e.name:18} {p:13.1f} {d:12.2f} {p / statistics.median(pre[base]):12.3f}x "
                  f"{d / statistics.median(dec[base]):11.3f}x {gbs:6.1f} {gbs * 1e9 / bw:6.1%}")
        a, b = toks[engines[0].name], toks[base]
        agree = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(b))
        print(f"{kind:8} weights {nbytes / 2**20:.0f} MiB; greedy tokens: first {agree}/{len(b)} equal to llama.cpp's")
        engines[0].pair.release()
        del engines


if __name__ == "__main__":
    main()
