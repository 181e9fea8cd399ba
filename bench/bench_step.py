"""Where an engine step's time goes: device work vs the host.

    python bench/bench_step.py [--threads 0] [--tokens 128] [--reps 3] [--device intel]

One slot, greedy, the packaged model (or --model) on the OpenCL backend (or --backend ggml: its
"device" time is the time inside ggml_graph_compute). The engine runs real requests
(queue, scheduler, drafting, verification, sampling, detokenising) with speculation off and
with the n-gram drafter, on a copy-heavy and an open-ended prompt. Each step is timed as a
whole (`Engine.step`), and every kernel and transfer it enqueues is timed by the device
itself (an OpenCL profiling queue: CL_PROFILING_COMMAND_START/END of each command). Per
step:

  device  the sum of the device's command times (kernels, uploads, the logits read-back)
  host    step wall time - device: everything the device is not doing while the step runs
          (Python's kernel launches, scheduling, sampling, detokenising, bookkeeping)
  decode  wall time inside LlamaContext.decode (launches + waiting for the device)

and the host share = host / step (the aim: <= 15 % at one slot); tok/s = tokens
per step / step time. --ab-replay adds each mode with launch replay off ("off/ops",
"ngram/ops": every pass op by op, compute/opencl/replay.py), interleaved. Commands of one
in-order queue do not overlap, so the sum of their times is the device's busy time. The
profiling queue itself adds a little time per command; the figures are what this machine
does with it on. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # run as a script from a clone: the repository root

import pyopencl as cl  # noqa: E402

from bench.common import machine_line  # noqa: E402
from compute.select import opencl_backend  # noqa: E402
from service.common.packaged_model import packaged_model_path  # noqa: E402
from service.common.tokenizer import Tokenizer  # noqa: E402
from service.engine.engine import Engine  # noqa: E402
from service.engine.request import GenRequest, SamplingParams  # noqa: E402
from service.fit.factory import PairFactory, PairRequest  # noqa: E402
from service.fit.params import ContextParams, SpeculativeConfig  # noqa: E402
from service.pairs.warmup import warm_up  # noqa: E402

PROMPTS = {
    "repeat-paragraph": "Repeat the following paragraph exactly, word for word:\n\nThe lighthouse keeper climbed the "
                        "spiral stairs every evening at dusk. He trimmed the wick, polished the great lens until it "
                        "gleamed, and wrote the weather in a leather logbook. Ships passing the rocky point relied "
                        "on his light, and in forty years it had never once gone dark.",
    "story": "Write a short story about a dragon who is afraid of the dark.",
}


class ComputeClock:
    """ggml's "device time": the wall time inside ggml_graph_compute (compute/ggml/graph.py Pass.compute),
    where the threadpool works and the Python host waits; `take()` as DeviceClock's."""

    def __init__(self):
        from compute.ggml import graph

        self.total, self.by_kind = 0.0, {}
        orig = graph.Pass.compute

        def timed(p, __orig=orig):
            t = time.perf_counter()
            try:
                return __orig(p)
            finally:
                self.total += time.perf_counter() - t
        graph.Pass.compute = timed

    def take(self) -> float:
        t, self.total = self.total, 0.0
        return t


class DeviceClock:
    """Collects the events of every command enqueued on a profiling queue; `take()` sums their device time."""

    def __init__(self):
        self.events: list = []
        self.by_kind: dict[str, list] = {}  # command -> [seconds, count] over every take()
        self._orig = {}
        for name in ("enqueue_nd_range_kernel", "enqueue_copy", "enqueue_fill_buffer"):
            orig = getattr(cl, name)
            self._orig[name] = orig

            def wrapped(*a, __orig=orig, __name=name, **kw):
                ev = __orig(*a, **kw)
                if isinstance(ev, cl.Event):
                    what = a[1].function_name if __name == "enqueue_nd_range_kernel" else __name
                    if what.startswith("mul_mv"):
                        what += f" gsize={a[2]}"
                    self.events.append((what, ev))
                return ev
            setattr(cl, name, wrapped)

    def take(self) -> float:
        """Seconds of device work of the commands enqueued since the last call (waits for them)."""
        evs, self.events = self.events, []
        total = 0
        for what, e in evs:
            e.wait()
            dt = e.profile.end - e.profile.start
            total += dt
            acc = self.by_kind.setdefault(what, [0.0, 0])
            acc[0] += dt * 1e-9
            acc[1] += 1
        return total * 1e-9


def profiling_backend(device: str, threads: int):
    """The probed OpenCL backend with its in-order queue replaced by a profiling one (before any load)."""
    be = opencl_backend(device, threads)
    q = cl.CommandQueue(be.context, properties=cl.command_queue_properties.PROFILING_ENABLE)
    be.queue = be.kernels.queue = be.staging.queue = q
    return be


def instrument(eng: Engine, clock: DeviceClock, rows: list):
    """Wrap eng.step and the target's decode; each step appends (wall, decode wall, device, batch rows)."""
    step, decode = eng.step, eng.target.decode
    cur = {}

    def timed_decode(batch):
        t = time.perf_counter()
        try:
            return decode(batch)
        finally:
            cur["decode"] = cur.get("decode", 0.0) + time.perf_counter() - t
            cur["rows"] = cur.get("rows", 0) + len(batch)

    def timed_step():
        cur.clear()
        clock.take()
        t = time.perf_counter()
        step()
        wall = time.perf_counter() - t
        if "decode" in cur:
            rows.append((wall, cur["decode"], clock.take(), cur["rows"]))

    eng.step, eng.target.decode = timed_step, timed_decode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["opencl", "ggml"], default="opencl",
                    help="ggml: device time is the time inside ggml_graph_compute")
    ap.add_argument("--model", default="", help="a GGUF (default: the packaged SmolLM2)")
    ap.add_argument("--device", default="", help="OpenCL device (index or name substring; default: the first usable)")
    ap.add_argument("--threads", type=int, default=0, help="CPU runtime worker threads (0: all cores)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--n-max", type=int, default=8)
    ap.add_argument("--ab-replay", action="store_true",
                    help="also run every mode with launch replay off (each pass op by op), interleaved")
    ap.add_argument("--kernels", type=int, default=0, help="also print the N commands with the most device time")
    args = ap.parse_args()

    if args.backend == "ggml":
        from compute.select import ggml_backend

        clock, be = ComputeClock(), ggml_backend(args.threads)
    else:
        clock = DeviceClock()
        be = profiling_backend(args.device, args.threads)
    pair = PairFactory(be, device_memory_bytes=1 << 34).load(PairRequest(
        target_path=args.model or packaged_model_path(), params=ContextParams(n_ctx=1024, n_parallel=1, n_batch=128),
        speculative=SpeculativeConfig("ngram", n_max=args.n_max)))
    tok = Tokenizer.from_gguf(pair.target.file.reader)
    eng = Engine(pair, tok, SpeculativeConfig("none")).start()
    warm_up(pair, eng, tok)
    print(f"# {machine_line()}")
    where = be.device_memory().name if args.backend == "ggml" else \
        f"{be.platform.name.strip()} / {be.device.name.strip()}"
    print(f"# {where}; {os.path.basename(pair.target.file.path)}; threads={args.threads or 'all'} "
          f"tokens={args.tokens} reps={args.reps}; one slot, greedy")
    rows: list = []
    instrument(eng, clock, rows)
    specs = {"off": SpeculativeConfig("none"), "ngram": SpeculativeConfig("ngram", n_max=args.n_max)}
    modes = {m: (spec, True) for m, spec in specs.items()}  # name -> (speculative config, launch replay on)
    if args.ab_replay:
        modes |= {f"{m}/ops": (spec, False) for m, spec in specs.items()}
    ctx = eng.target
    greedy = SamplingParams(temperature=0.0)
    print(f"{'prompt':17} {'spec':9} {'steps':>5} {'rows/step':>9} {'tok/step':>8} {'step ms':>8} "
          f"{'device ms':>9} {'decode ms':>9} {'host ms':>8} {'host %':>6} {'tok/s':>6}")
    for name, text in PROMPTS.items():
        ids = tuple(tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]), add_special=False))
        res = {m: [] for m in modes}
        for _ in range(args.reps):
            for m, (spec, replay) in modes.items():  # interleaved
                rows.clear()
                saved = ctx._passes
                if not replay:  # every pass op by op, as before compute/opencl/replay.py
                    ctx.backend.replay_max_rows, ctx._passes = 0, {}
                try:
                    r = eng.submit(GenRequest(ids, max_tokens=args.tokens, sampling=greedy, speculative=spec,
                                              cache_prompt=False)).result(600)  # drafts from this request only
                finally:
                    if not replay:
                        del ctx.backend.replay_max_rows  # back to the class's
                    ctx._passes = saved
                steps = rows[1:]  # the first step is the prefill
                res[m].append((steps, r.completion_tokens))
        for m in modes:
            per = []  # per rep: medians over its decode steps
            for steps, ntok in res[m]:
                wall, dec, dev, nrows = (statistics.median(c) for c in zip(*steps))
                per.append((len(steps), nrows, (ntok - 1) / max(len(steps), 1), wall, dev, dec))
            n, nrows, tps, wall, dev, dec = (statistics.median(c) for c in zip(*per))
            host = wall - dev
            print(f"{name:17} {m:9} {n:5.0f} {nrows:9.1f} {tps:8.2f} {wall * 1e3:8.2f} {dev * 1e3:9.2f} "
                  f"{dec * 1e3:9.2f} {host * 1e3:8.2f} {100 * host / wall:5.1f}% {tps / wall:6.1f}")
    if args.kernels:
        print("\n== device time by command, over every step above ==")
        tot = sum(v[0] for v in clock.by_kind.values())
        for what, (sec, cnt) in sorted(clock.by_kind.items(), key=lambda kv: -kv[1][0])[:args.kernels]:
            print(f"{100 * sec / tot:5.1f}%  {sec * 1e3:9.1f} ms  {cnt:7d} x {sec / cnt * 1e6:8.1f} us  {what}")
    eng.stop()
    pair.release()


if __name__ == "__main__":
    main()
