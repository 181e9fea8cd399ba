"""Prefill and decode speed of the NumPy backend (row_tile 0, 1, 8) against llama.cpp, in one run.

    python bench/bench_decode.py [--threads 1] [--reps 5] [--prompt 64] [--gen 64] [--tiles 0,1,8] [--opencl]
                                 [--n-batch N]
    python bench/bench_decode.py --opencl --tiles none --threads 2 --prompt 512 --gen 16   (a long prompt)
    python bench/bench_decode.py --invariance [--tiles 0,1,4,8] [--reps 5] [--opencl]

Speed: every engine prefills the same 64-token prompt (--prompt) in decode calls of n_batch tokens as
the engine chunks a prompt (--n-batch: default 64 up to a 64-token prompt, else the server's default
256; llama.cpp: llama-cpp-python's n_batch, 512), then greedy-decodes
64 tokens one per call (logits to the host and argmax on the host after every call, as the
server does). llama.cpp (llama-cpp-python, when importable) runs the same GGUF with
n_threads = n_threads_batch = --threads; NumPy's BLAS is limited to --threads threads.
Repetitions are interleaved (A B C D, B C D A, ...) and the medians are reported, with each
engine's ratio to llama.cpp.

--invariance: the cost of one decode call of k = 1, 2, 5, 9 rows (a verify batch, after a
64-token prefix) and of a 64-token prefill for each row_tile mode, and whether each mode is
batch invariant: the logits of k tokens decoded one per call vs the same tokens in one call
(np.array_equal; the max |difference| when not equal). --opencl adds the OpenCL backend.
The results are written up in docs/batch-invariance.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from a clone: the repository root

import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from bench.common import Batch  # noqa: E402


def prefill_in_chunks(ctx, prompt):
    """Prefill as the engine does: chunks of n_batch tokens, one decode call each; the last row's logits."""
    n = ctx.n_batch
    for i in range(0, len(prompt) - n, n):
        ctx.decode(Batch.make(prompt[i:i + n], range(i, i + n), [0] * n, [n - 1]))
    i = (len(prompt) - 1) // n * n
    k = len(prompt) - i
    return ctx.decode(Batch.make(prompt[i:], range(i, i + k), [0] * k, [k - 1]))[0]


class NumpyEngine:
    def __init__(self, model, row_tile, threads, n_ctx, n_batch=64):
        self.name = f"numpy row_tile={row_tile}"
        self.pair, self.ctx = common.load_numpy(model, row_tile, threads, n_ctx=n_ctx, n_batch=n_batch)

    def prefill(self, prompt):
        return prefill_in_chunks(self.ctx, prompt)

    def decode(self, tok, pos):
        return common.numpy_decode_one(self.ctx, tok, pos)


class OpenCLEngine:
    def __init__(self, model, n_ctx, device="", threads=0, n_batch=64):
        from compute.opencl.probe import runtime_of
        from compute.select import opencl_backend
        from service.fit.factory import PairFactory, PairRequest
        from service.fit.params import ContextParams, SpeculativeConfig

        be = opencl_backend(device, threads)  # probed, as --backend auto / --device choose
        is_gpu = not be.is_cpu
        self.name = f"opencl {runtime_of(be.platform.name, is_gpu)}"
        self.device_line = f"{be.platform.name.strip()} / {be.device.name.strip()} ({be.platform.version.strip()})"
        self.pair = PairFactory(be, device_memory_bytes=1 << 34).load(PairRequest(
            target_path=model, params=ContextParams(n_ctx=n_ctx, n_batch=n_batch),
            speculative=SpeculativeConfig("none")))
        self.ctx = self.pair.target.context

    def prefill(self, prompt):
        return prefill_in_chunks(self.ctx, prompt)

    def decode(self, tok, pos):
        return common.numpy_decode_one(self.ctx, tok, pos)


class LlamaEngine:
    def __init__(self, model, threads, n_ctx):
        import llama_cpp

        self.name = "llama.cpp"
        self.version = llama_cpp.__version__
        self.llm = common.load_llama(model, threads, n_ctx=n_ctx)
        self.n_batch = self.llm.n_batch

    def prefill(self, prompt):
        self.llm.reset()  # the next eval drops every KV cell
        self.llm.eval(prompt)  # one llama_decode call per n_batch (llama-cpp-python's default 512) tokens
        return common.llama_last_logits(self.llm)

    def decode(self, tok, pos):
        self.llm.eval([tok])
        return common.llama_last_logits(self.llm)


def trial(engine, prompt, n_gen):
    """(prefill seconds, decode seconds, greedy tokens)."""
    t0 = common.now()
    row = engine.prefill(prompt)
    t1 = common.now()
    toks = []
    for i in range(n_gen):
        toks.append(int(np.argmax(row)))
        row = engine.decode(toks[-1], len(prompt) + i)
    return t1 - t0, common.now() - t1, toks


def run_speed(args, model):
    prompt = common.prompt_ids(model, args.prompt)
    n_ctx = max(256, args.prompt + args.gen + 1)
    engines = [NumpyEngine(model, t, args.threads, n_ctx, args.n_batch) for t in args.tiles]
    if args.opencl:
        for device in args.devices.split(","):
            try:
                engines.append(OpenCLEngine(model, n_ctx, device.strip(), args.threads, args.n_batch))
            except Exception as e:  # noqa: BLE001 - a runtime that does not work here: say so, go on
                print(f"opencl {device or 'auto'}: skipped: {e}")
    if not args.no_llama and common.have_llama_cpp():
        engines.append(LlamaEngine(model, args.threads, n_ctx))
    elif not args.no_llama:
        print("llama_cpp is not importable: no llama.cpp column")
    for e in engines:  # warm-up: page faults, BLAS buffers
        trial(e, prompt[:8], 2)
    pre = {e.name: [] for e in engines}
    dec = {e.name: [] for e in engines}
    toks = {}
    for rep in range(args.reps):
        k = rep % len(engines)
        for e in engines[k:] + engines[:k]:
            p, d, t = trial(e, prompt, args.gen)
            pre[e.name].append(args.prompt / p)
            dec[e.name].append(args.gen / d)
            toks[e.name] = t

    print(f"model     {Path(model).name}")
    print(f"machine   {common.machine_line()}")
    print(f"threads   {args.threads} (NumPy BLAS limit; llama.cpp n_threads and n_threads_batch; "
          f"the CPU OpenCL runtimes' workers)")
    for e in engines:
        if isinstance(e, OpenCLEngine):
            print(f"OpenCL    {e.name}: {e.device_line}")
    for line in common.blas_info():
        print(f"BLAS      {line}")
    llama = next((e for e in engines if isinstance(e, LlamaEngine)), None)
    if llama:
        print(f"llama.cpp llama-cpp-python {llama.version}, n_batch {llama.n_batch}")
    from compute.numpy_backend import DEFAULT_ROW_TILE
    print(f"NumPy default row_tile: {DEFAULT_ROW_TILE}")
    print(f"{args.reps} interleaved repetitions; prompt {args.prompt} tokens in calls of n_batch "
          f"{args.n_batch} (specserve; the engine's chunks); "
          f"decode {args.gen} tokens one per call; medians (min..max)")
    print(f"{'engine':22s} {'prefill tok/s':>26s} {'decode tok/s':>24s} {'prefill/llama':>14s} {'decode/llama':>13s}")
    for e in engines:
        p, d = pre[e.name], dec[e.name]
        rp = rd = ""
        if llama:
            rp = f"{common.median(p) / common.median(pre[llama.name]):.3f}x"
            rd = f"{common.median(d) / common.median(dec[llama.name]):.3f}x"
        print(f"{e.name:22s} {common.median(p):9.1f} ({min(p):7.1f}..{max(p):7.1f}) "
              f"{common.median(d):8.2f} ({min(d):6.2f}..{max(d):6.2f}) {rp:>14s} {rd:>13s}")
    ref = toks[llama.name] if llama else toks[engines[0].name]
    for e in engines:
        t = toks[e.name]
        agree = next((i for i, (a, b) in enumerate(zip(t, ref)) if a != b), len(ref))
        ref_name = llama.name if llama else engines[0].name
        print(f"greedy tokens of {e.name}: first {agree}/{len(ref)} equal to {ref_name}'s")
    for e in engines:
        if isinstance(e, (NumpyEngine, OpenCLEngine)):
            e.pair.release()


# ---- batch invariance ----

def load_ctx(model, backend_name, row_tile, threads):
    n = 64
    if backend_name == "opencl":
        from compute.select import opencl_backend
        from service.fit.factory import PairFactory, PairRequest
        from service.fit.params import ContextParams, SpeculativeConfig

        be = opencl_backend(threads=threads)
        pair = PairFactory(be).load(PairRequest(
            name="opencl", target_path=model, params=ContextParams(n_ctx=256, n_batch=n, n_outputs_max=n),
            speculative=SpeculativeConfig(type="none")))
        return pair, pair.target.context
    return common.load_numpy(model, row_tile, threads, n_ctx=256, n_batch=n, n_outputs_max=n)


def one_by_one(ctx, toks, start):
    return np.stack([common.numpy_decode_one(ctx, t, start + j) for j, t in enumerate(toks)])


def in_batch(ctx, toks, start):
    k = len(toks)
    return ctx.decode(Batch.make(toks, range(start, start + k), [0] * k, range(k)))


def invariance(ctx, prompt, ks):
    """{k: (equal, max |diff|)}: k tokens after the 64-token prefix one per call vs in one call;
    for k == len(prompt), the prompt itself from position 0 (a prefill)."""
    out = {}
    for k in ks:
        if k == len(prompt):
            a, b = one_by_one(ctx, prompt, 0), in_batch(ctx, prompt, 0)
        else:
            ctx.decode(Batch.make(prompt, range(len(prompt)), [0] * len(prompt), [len(prompt) - 1]))
            toks = prompt[:k]
            a = one_by_one(ctx, toks, len(prompt))
            b = in_batch(ctx, toks, len(prompt))
        out[k] = (bool(np.array_equal(a, b)), float(np.abs(a - b).max()))
    return out


def run_invariance(args, model):
    prompt = common.prompt_ids(model, 64)
    modes = [("numpy", t) for t in args.tiles]
    if args.opencl:
        modes.append(("opencl", None))
    ctxs = {}
    for m in modes:
        ctxs[m] = load_ctx(model, m[0], m[1], args.threads)
    ks = [1, 2, 5, 9]
    times = {(m, k): [] for m in modes for k in ks + ["prefill"]}
    inner = 3
    for m in modes:  # warm-up
        in_batch(ctxs[m][1], prompt[:9], 64)
    for rep in range(args.reps):
        r = rep % len(modes)
        for m in modes[r:] + modes[:r]:
            ctx = ctxs[m][1]
            t0 = common.now()
            ctx.decode(Batch.make(prompt, range(64), [0] * 64, [63]))
            times[(m, "prefill")].append(common.now() - t0)
            for k in ks:
                t0 = common.now()
                for _ in range(inner):
                    in_batch(ctx, prompt[:k], 64)
                times[(m, k)].append((common.now() - t0) / inner)
    inv = {m: invariance(ctxs[m][1], prompt, [2, 5, 9, 64]) for m in modes}

    from compute.numpy_backend import DEFAULT_ROW_TILE
    print(f"model     {Path(model).name}")
    print(f"machine   {common.machine_line()}")
    print(f"threads   {args.threads}")
    for line in common.blas_info():
        print(f"BLAS      {line}")
    print(f"NumPy default row_tile: {DEFAULT_ROW_TILE}")
    print(f"{args.reps} interleaved repetitions (decode calls: {inner} per repetition); medians in ms")
    label = {m: (f"numpy row_tile={m[1]}" if m[0] == "numpy" else "opencl") for m in modes}
    base = modes[0]
    print("| mode | k=1 | k=2 | k=5 | k=9 | prefill 64 | prefill tok/s | invariant k=2 | k=5 | k=9 | prefill 64 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for m in modes:
        cells = [f"{common.median(times[(m, k)]) * 1e3:.1f}" for k in ks]
        pf = common.median(times[(m, "prefill")])
        inv_cells = ["yes" if eq else f"no ({d:.1e})" for eq, d in (inv[m][k] for k in [2, 5, 9, 64])]
        print(f"| {label[m]} | " + " | ".join(cells) + f" | {pf * 1e3:.1f} | {64 / pf:.0f} | "
              + " | ".join(inv_cells) + " |")
    print(f"cost relative to {label[base]} (ratio of medians):")
    for m in modes:
        rs = [common.median(times[(m, k)]) / common.median(times[(base, k)]) for k in ks + ["prefill"]]
        print(f"  {label[m]:22s} " + "  ".join(f"{k if k == 'prefill' else f'k={k}'}: {r:.2f}x"
                                                for k, r in zip(ks + ["prefill"], rs)))
    for pair, _ in ctxs.values():
        pair.release()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF file (default: the packaged SmolLM2-135M)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--n-batch", type=int, default=None,
                    help="specserve's prefill chunk, tokens per decode call (default: 64 for a prompt of up to 64 "
                         "tokens, else the server's default n_batch)")
    ap.add_argument("--tiles", default=None, help="row_tile modes, comma separated (default 0,1,8; "
                                                   "0,1,4,8 with --invariance; none: no NumPy engine)")
    ap.add_argument("--no-llama", action="store_true", help="skip llama.cpp")
    ap.add_argument("--invariance", action="store_true", help="batch-invariance cost table instead")
    ap.add_argument("--opencl", action="store_true",
                    help="add the OpenCL backend (the CPU runtimes get --threads worker threads)")
    ap.add_argument("--devices", default="",
                    help="with --opencl: comma-separated --device selectors, one engine each, e.g. "
                         "intel-cpu,pocl (default: the device --backend auto takes)")
    args = ap.parse_args()
    if args.opencl:  # before any runtime starts: the same thread count as NumPy and llama.cpp
        from compute.opencl import runtime

        runtime.set_threads(args.threads)
    tiles = args.tiles or ("0,1,4,8" if args.invariance else "0,1,8")
    args.tiles = [] if tiles == "none" else [int(t) for t in tiles.split(",")]
    if args.n_batch is None:
        from service.fit.params import DEFAULT_N_BATCH

        args.n_batch = 64 if args.prompt <= 64 else DEFAULT_N_BATCH
    model = args.model or common.model_path()
    (run_invariance if args.invariance else run_speed)(args, model)


if __name__ == "__main__":
    main()
