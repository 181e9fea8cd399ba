"""How long Fit takes on the real model, and its plan next to llama.cpp's own buffer sizes.

    python bench/bench_fit.py [--runs 50] [--n-ctx 2048] [--n-batch 256] [--opencl]

Fit time: `PairFactory.fit` for the packaged SmolLM2-135M, speculation off. "cold" clears
the parsed-model cache first, so the fit opens the file and parses the GGUF metadata
(the file's pages are in the OS page cache after the first run: this is not a cold disk);
"warm" reuses the parsed model, so it is the planning alone. Cold and warm runs alternate;
medians over --runs of each.

Plan: bytes by (owner, kind) for n_ctx (default 2048) on the NumPy backend (weights
dequantised to f32) and, with --opencl, on the OpenCL backend (weights as stored in the
file), next to llama.cpp's own figures for the same GGUF, n_ctx and n_batch/n_ubatch:
its verbose log's "model buffer size", "KV buffer size", "output buffer size" and
"compute buffer size" lines (llama_cpp.Llama(verbose=True), stderr captured at fd 2).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from a clone: the repository root

from bench import common  # noqa: E402
from bench.common import ContextParams, PairFactory, PairRequest, SpeculativeConfig  # noqa: E402

MIB = 1 << 20
LLAMA_LINES = re.compile(r"(model buffer size|KV (?:self |buffer )?size|KV buffer size|compute buffer size|"
                         r"output buffer size)\s*=\s*([0-9.]+) MiB")


def request(model: str, n_ctx: int, n_batch: int) -> PairRequest:
    return PairRequest(name="fit-bench", target_path=model, params=ContextParams(n_ctx=n_ctx, n_batch=n_batch),
                       speculative=SpeculativeConfig(type="none"))


def time_fit(model: str, runs: int, n_ctx: int, n_batch: int) -> tuple[list[float], list[float]]:
    from compute import gguf_model
    from compute.numpy_backend import NumpyBackend

    factory = PairFactory(NumpyBackend(n_threads=1))
    req = request(model, n_ctx, n_batch)
    factory.fit(req)  # imports, first-touch of the file pages
    cold, warm = [], []
    for _ in range(runs):
        gguf_model._recent.clear()  # nothing else holds the parsed file: the next Fit parses it again (cold)
        t0 = common.now()
        factory.fit(req)
        cold.append(common.now() - t0)
        t0 = common.now()
        factory.fit(req)
        warm.append(common.now() - t0)
    return cold, warm


def plan_summary(backend, model: str, n_ctx: int, n_batch: int):
    fr = PairFactory(backend).fit(request(model, n_ctx, n_batch))
    return fr.plan.summary(), fr.plan.params.target


def llama_breakdown(model: str, n_ctx: int, n_batch: int) -> tuple[list[tuple[str, float, str]], str]:
    """[(what, MiB, the log line)] from llama.cpp's verbose load log."""
    import llama_cpp

    with common.capture_fd2() as log:
        llm = llama_cpp.Llama(model_path=model, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, n_threads=1,
                              logits_all=False, verbose=True)
        del llm
    text = log[0]
    out = []
    for line in text.splitlines():
        m = LLAMA_LINES.search(line)
        if m:
            out.append((m.group(1), float(m.group(2)), line.strip()))
    return out, llama_cpp.__version__


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--n-batch", type=int, default=256, help="n_batch for both (llama.cpp: n_batch = n_ubatch)")
    ap.add_argument("--opencl", action="store_true", help="also plan for the OpenCL backend")
    ap.add_argument("--no-llama", action="store_true")
    args = ap.parse_args()
    model = args.model or common.model_path()

    cold, warm = time_fit(model, args.runs, args.n_ctx, args.n_batch)
    print(f"model   {Path(model).name} ({Path(model).stat().st_size / MIB:.1f} MiB)")
    print(f"machine {common.machine_line()}")
    print(f"PairFactory.fit, n_ctx {args.n_ctx}, speculation off, {args.runs} runs each (alternating):")
    print(f"  cold (GGUF metadata parsed): median {common.median(cold) * 1e3:8.2f} ms  "
          f"(min {min(cold) * 1e3:.2f}, max {max(cold) * 1e3:.2f})")
    print(f"  warm (parsed model cached):  median {common.median(warm) * 1e3:8.3f} ms  "
          f"(min {min(warm) * 1e3:.3f}, max {max(warm) * 1e3:.3f})")
    print(f"  cold / warm: {common.median(cold) / common.median(warm):.0f}x")

    from compute.numpy_backend import NumpyBackend

    plans = {"numpy": plan_summary(NumpyBackend(n_threads=1), model, args.n_ctx, args.n_batch)}
    if args.opencl:
        try:
            from compute.opencl.backend import OpenCLBackend

            plans["opencl"] = plan_summary(OpenCLBackend(), model, args.n_ctx, args.n_batch)
        except Exception as e:  # no OpenCL platform
            print(f"(no OpenCL plan: {e})")
    for name, (summary, cp) in plans.items():
        print(f"\nplan on the {name} backend: n_ctx {cp.n_ctx}, n_parallel {cp.n_parallel}, n_batch {cp.n_batch}, "
              f"n_outputs_max {cp.n_outputs_max}, kv {cp.kv_type}")
        total = 0
        for (owner, kind), nbytes in sorted(summary.items()):
            total += nbytes
            print(f"  {owner:7s} {kind:9s} {nbytes:13,d} B  {nbytes / MIB:9.2f} MiB")
        print(f"  {'total':17s} {total:13,d} B  {total / MIB:9.2f} MiB")

    if args.no_llama or not common.have_llama_cpp():
        print("\nllama.cpp: not run" + ("" if args.no_llama else " (llama_cpp is not importable)"))
        return
    rows, version = llama_breakdown(model, args.n_ctx, args.n_batch)
    print(f"\nllama.cpp (llama-cpp-python {version}), n_ctx {args.n_ctx}, n_batch = n_ubatch = {args.n_batch}, "
          f"its log lines:")
    for _, _, line in rows:
        print(f"  {line}")
    kind_of = {"model buffer size": "weights", "output buffer size": "outputs", "compute buffer size": "compute"}
    llama = {}
    for what, mib, _ in rows:
        k = kind_of.get(what, "kv_cache" if what.startswith("KV") else what)
        llama[k] = llama.get(k, 0.0) + mib
    print("\nside by side (MiB):")
    names = list(plans)
    print(f"  {'kind':10s} " + " ".join(f"{n:>10s}" for n in names) + f" {'llama.cpp':>10s}")
    for kind in ("weights", "kv_cache", "outputs", "compute"):
        ours = [plans[n][0].get(("target", kind), 0) / MIB for n in names]
        print(f"  {kind:10s} " + " ".join(f"{v:10.2f}" for v in ours) + f" {llama.get(kind, float('nan')):10.2f}")
    tot = [sum(plans[n][0].values()) / MIB for n in names]
    print(f"  {'total':10s} " + " ".join(f"{v:10.2f}" for v in tot) + f" {sum(llama.values()):10.2f}")


if __name__ == "__main__":
    main()
