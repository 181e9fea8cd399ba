"""Prefill and decode speed of the OpenCL backend against the NumPy backend, in one run.

    python bench/bench_opencl.py [--device pthread] [--tokens 32] [--prompt 64] [--trials 3]

Both backends load the same GGUF through the pair factory and run the same greedy loop
(`LlamaContext.decode`, logits read back each step, argmax on the host). Trials alternate
between the backends so a busy machine slows both alike; the best and the median trial are
printed. NumPy runs with one BLAS thread (--numpy-threads); PoCL uses POCL_MAX_PTHREAD_COUNT
worker threads (default: every core), printed with the results.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from a clone: the repository root

import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from compute.llama import Batch  # noqa: E402
from service.fit.factory import PairFactory, PairRequest  # noqa: E402
from service.fit.params import ContextParams, SpeculativeConfig  # noqa: E402

# "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n" (SmolLM2 ids)
CHAT_PROMPT = [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]


def load(backend, model: str, n_ctx: int, n_batch: int):
    req = PairRequest(target_path=model, params=ContextParams(n_ctx=n_ctx, n_batch=n_batch),
                      speculative=SpeculativeConfig(type="none"))
    return PairFactory(backend).load(req)


def prompt_tokens(n: int) -> list[int]:
    reps = -(-n // len(CHAT_PROMPT))
    return (CHAT_PROMPT * reps)[:n]


def trial(ctx, prompt: list[int], n_decode: int) -> tuple[float, float, list[int]]:
    """Prefill the prompt in one batch, then greedy-decode n_decode tokens: (prefill s, decode s, tokens)."""
    p = len(prompt)
    t0 = time.perf_counter()
    logits = ctx.decode(Batch.make(prompt, range(p), [0] * p, [p - 1]))
    t1 = time.perf_counter()
    nxt, out = int(np.argmax(logits[0])), []
    for i in range(n_decode):
        out.append(nxt)
        logits = ctx.decode(Batch.make([nxt], [p + i], [0], [0]))
        nxt = int(np.argmax(logits[0]))
    return t1 - t0, time.perf_counter() - t1, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF file (default: the packaged SmolLM2-135M)")
    ap.add_argument("--device", default=None, help="OpenCL device index or name substring (see --list)")
    ap.add_argument("--list", action="store_true", help="list the OpenCL devices and exit")
    ap.add_argument("--tokens", type=int, default=32, help="tokens decoded per trial")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens prefilled per trial (one batch)")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--numpy-threads", type=int, default=1)
    ap.add_argument("--numpy-row-tiles", default="1,8",
                    help="NumPy backends to compare, by row_tile (1: one gemv per row, its fastest decode; "
                         "8: padded 8-row gemm tiles, its fastest batch-invariant prefill)")
    ap.add_argument("--skip-numpy", action="store_true")
    args = ap.parse_args()

    from compute.opencl.backend import OpenCLBackend, cpu_threads, list_devices

    if args.list:
        print("\n".join(list_devices()))
        return
    model = args.model or common.model_path()
    n_ctx = max(256, args.prompt + args.tokens + 1)
    cl_be = OpenCLBackend(device=args.device)
    backends = {"opencl": cl_be}
    if not args.skip_numpy:
        from compute.numpy_backend import NumpyBackend

        for rt in (int(v) for v in args.numpy_row_tiles.split(",") if v):
            backends[f"numpy/rt{rt}"] = NumpyBackend(n_threads=args.numpy_threads, row_tile=rt)
    pairs = {name: load(be, model, n_ctx, args.prompt) for name, be in backends.items()}
    prompt = prompt_tokens(args.prompt)
    tokens, results = {}, {name: [] for name in backends}
    for name, lp in pairs.items():  # warm-up: kernel compilation, page faults
        trial(lp.target.context, prompt[:8], 2)
    for _ in range(args.trials):
        for name, lp in pairs.items():
            pre, dec, out = trial(lp.target.context, prompt, args.tokens)
            results[name].append((args.prompt / pre, args.tokens / dec))
            tokens[name] = out

    dm = cl_be.device_memory()
    print(f"model   {os.path.basename(model)}")
    print(f"opencl  {dm.name}; tuning {cl_be.tuning}"
          + (f"; CPU runtime threads {cpu_threads()}" if cl_be.is_cpu else ""))
    if len(backends) > 1:
        print(f"numpy   BLAS threads {args.numpy_threads}; rtN = row_tile N")
    print(f"trials {args.trials}, prompt {args.prompt} tokens (one batch), decode {args.tokens} tokens (batch of 1)")
    print(f"{'backend':10s} {'prefill tok/s':>22s} {'decode tok/s':>22s}")
    best = {}
    for name, rs in results.items():
        pre = [r[0] for r in rs]
        dec = [r[1] for r in rs]
        best[name] = (max(pre), max(dec))
        print(f"{name:10s} {max(pre):10.1f} (med {statistics.median(pre):6.1f}) "
              f"{max(dec):10.1f} (med {statistics.median(dec):6.1f})")
    numpys = [name for name in best if name.startswith("numpy")]
    if numpys:
        bp = max(numpys, key=lambda k: best[k][0])
        bd = max(numpys, key=lambda k: best[k][1])
        print(f"ratio opencl / best numpy: prefill {best['opencl'][0] / best[bp][0]:.2f}x (vs {bp}), "
              f"decode {best['opencl'][1] / best[bd][1]:.2f}x (vs {bd}); best trials")
        same = all(tokens[name] == tokens["opencl"] for name in numpys)
        print(f"greedy tokens equal across backends: {same}")
    for lp in pairs.values():
        lp.release()


if __name__ == "__main__":
    main()
