"""Aggregate throughput of 8 concurrent greedy streams vs one stream, through the engine.

    python bench/bench_streams.py [--backend opencl|numpy] [--device ""] [--threads 2] [--streams 8]
                                  [--tokens 128] [--reps 3] [--n-batch 128]

Eight different open-ended chat prompts (speculation off, greedy, cache_prompt off so no run reuses
another's KV). Each repetition runs, interleaved: every prompt alone, one after the other (the
1-stream figure), then all of them submitted at once (the N-stream figure). Printed, as medians:

  end-to-end  completion tokens / wall seconds from the first submit to the last result; the
              1-stream figure serves the prompts one after the other, so both include every prefill.
  decode      tokens after each stream's first / seconds of the decode phase: for one stream its
              decode_seconds, for N streams from the moment the last stream got its first token
              to the last result (the tokens sampled in that window, estimated per stream as its
              tokens 2..n spread evenly over its decode_seconds).
  row cost    the fastest of a few timed decode calls of 1 row and of N rows (one per slot, at the
              position of the middle of a generation): the kernels' bound on the decode ratio is
              N * cost(1) / cost(N); the host share says how much of the rest the engine adds.
  host share  of the engine's step time, the part outside the target's decode call (scheduling,
              sampling, detokenising, bookkeeping), for 1 and N streams.

And whether every stream's tokens equal its solo run's (batch invariance through the scheduler).
Asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # run as a script from a clone: the repository root

from bench.common import machine_line  # noqa: E402
from service.common.packaged_model import packaged_model_path  # noqa: E402
from service.common.tokenizer import Tokenizer  # noqa: E402
from service.engine.engine import Engine  # noqa: E402
from service.engine.request import GenRequest, SamplingParams  # noqa: E402
from service.fit.factory import PairFactory, PairRequest  # noqa: E402
from service.fit.params import ContextParams, SpeculativeConfig  # noqa: E402
from service.pairs.warmup import warm_up  # noqa: E402

PROMPTS = (
    "Write a short story about a dragon who is afraid of the dark.",
    "Explain why the sky is blue to a ten year old.",
    "Describe a busy market in a small coastal town in the morning.",
    "Give me a recipe for a simple vegetable soup and explain each step.",
    "Write a letter to a friend about your summer holiday in the mountains.",
    "What are the main differences between cats and dogs as pets?",
    "Tell me about the history of the bicycle in a few paragraphs.",
    "Write a poem about the sea at night, then explain its imagery.",
)
GREEDY = SamplingParams(temperature=0.0)
OFF = SpeculativeConfig("none")


def make_backend(name: str, device: str, threads: int):
    if name == "opencl":
        from compute.select import opencl_backend

        return opencl_backend(device, threads)
    from compute.numpy_backend import NumpyBackend

    return NumpyBackend(n_threads=threads)


class StepClock:
    """Accumulates the engine thread's step seconds and the target decode seconds inside them."""

    def __init__(self, engine: Engine):
        self.step = self.decode = 0.0
        step, decode = engine.step, engine.target.decode

        def timed_step():
            t = time.perf_counter()
            step()
            self.step += time.perf_counter() - t

        def timed_decode(batch):
            t = time.perf_counter()
            out = decode(batch)
            self.decode += time.perf_counter() - t
            return out

        engine.step, engine.target.decode = timed_step, timed_decode  # instance attributes: the loop's calls

    def take(self) -> tuple[float, float]:
        """(step seconds, decode seconds) since the last take."""
        out = self.step, self.decode
        self.step = self.decode = 0.0
        return out


def row_seconds(ctx, n: int, pos: int, reps: int = 5) -> tuple[float, float]:
    """Fastest decode call of 1 row and of n rows (slots 0..n-1 at position pos), interleaved."""
    from compute.llama import Batch

    one = Batch.make([1], [pos], [0], [0])
    many = Batch.make([1] * n, [pos] * n, range(n), range(n))
    t1, tn = [], []
    for _ in range(reps):
        for b, acc in ((one, t1), (many, tn)):
            t = time.perf_counter()
            ctx.decode(b)
            acc.append(time.perf_counter() - t)
    return min(t1), min(tn)


def run(engine: Engine, prompts, n_tokens: int):
    """Submit prompts at once; (results, wall seconds, decode-phase tokens, decode-phase seconds)."""
    t0 = time.perf_counter()
    streams = [engine.submit(GenRequest(p, max_tokens=n_tokens, sampling=GREEDY, speculative=OFF,
                                        cache_prompt=False)) for p in prompts]
    res = [s.result(timeout=3600) for s in streams]
    t1 = time.perf_counter()
    firsts = [s.submitted_at + r.queue_seconds + r.prefill_seconds for s, r in zip(streams, res)]
    t_all = max(firsts)  # every stream has its first token: from here on each step is decode rows only
    # tokens after t_all: a stream's decode_seconds spans its tokens 2..n evenly enough at one step per token
    n_dec = sum((r.completion_tokens - 1) * min(1.0, (t1 - t_all) / r.decode_seconds) if r.decode_seconds else 0.0
                for r in res)
    return res, t1 - t0, n_dec, t1 - t_all


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="opencl", choices=["numpy", "opencl"])
    ap.add_argument("--device", default="", help="OpenCL device: index or name substring (default: the first)")
    ap.add_argument("--threads", type=int, default=0, help="0: the runtime's / BLAS default")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--n-batch", type=int, default=128)
    args = ap.parse_args()
    n = args.streams

    be = make_backend(args.backend, args.device, args.threads)
    tok_path = packaged_model_path()
    pair = PairFactory(be, device_memory_bytes=1 << 34).load(PairRequest(
        target_path=tok_path, params=ContextParams(n_ctx=n * 512, n_parallel=n, n_batch=args.n_batch),
        speculative=SpeculativeConfig("none")))
    tok = Tokenizer.from_gguf(pair.target.file.reader)
    eng = Engine(pair, tok, OFF).start()
    warm_up(pair, eng, tok)
    prompts = [tuple(tok.encode(tok.apply_chat_template([{"role": "user", "content": t}]), add_special=False))
               for t in (PROMPTS * (n // len(PROMPTS) + 1))[:n]]
    dev = getattr(be, "device", None)
    print(f"machine   {machine_line()}")
    print(f"backend   {args.backend}" + (f": {be.platform.name.strip()} / {dev.name.strip()}" if dev else "")
          + f"; threads {args.threads or 'default'}; n_batch {args.n_batch}")
    print(f"streams   {n} x {args.tokens} greedy tokens; prompts {[len(p) for p in prompts]} tokens; "
          f"{args.reps} interleaved repetitions; medians")
    c1, cn = row_seconds(pair.target.context, n, max(len(p) for p in prompts) + args.tokens // 2)
    print(f"row cost  1 row {c1 * 1e3:.1f} ms, {n} rows {cn * 1e3:.1f} ms ({cn / c1:.2f}x): "
          f"bound on the decode ratio {n * c1 / cn:.2f}x")
    clock = StepClock(eng)
    host1, hostN = [0.0, 0.0], [0.0, 0.0]

    e2e1, e2eN, dec1, decN, same = [], [], [], [], True
    solo_tokens: list[tuple[int, ...]] = []
    for rep in range(args.reps):
        walls, toks, dtok, dsec = [], [], [], []
        for i, p in enumerate(prompts):
            (r,), wall, *_ = run(eng, [p], args.tokens)
            walls.append(wall)
            toks.append(r.completion_tokens)
            dtok.append(r.completion_tokens - 1)
            dsec.append(r.decode_seconds)
            if rep == 0:
                solo_tokens.append(r.tokens)
            same &= r.tokens == solo_tokens[i]
        host1 = [a + b for a, b in zip(host1, clock.take())]
        e2e1.append(sum(toks) / sum(walls))
        dec1.append(sum(dtok) / sum(dsec))
        res, wall, n_dec, t_dec = run(eng, prompts, args.tokens)
        hostN = [a + b for a, b in zip(hostN, clock.take())]
        e2eN.append(sum(r.completion_tokens for r in res) / wall)
        decN.append(n_dec / t_dec)
        same &= all(r.tokens == s for r, s in zip(res, solo_tokens))
    eng.stop()
    m = statistics.median
    print(f"{'':12} {'1 stream':>10} {f'{n} streams':>10} {'ratio':>7}")
    print(f"{'end-to-end':12} {m(e2e1):10.1f} {m(e2eN):10.1f} {m(e2eN) / m(e2e1):6.2f}x   tok/s aggregate")
    print(f"{'decode':12} {m(dec1):10.1f} {m(decN):10.1f} {m(decN) / m(dec1):6.2f}x   tok/s aggregate")
    print(f"host share of the step time (outside the target decode call): 1 stream "
          f"{1 - host1[1] / host1[0]:.1%}, {n} streams {1 - hostN[1] / hostN[0]:.1%}")
    print(f"completion tokens per stream: {[len(t) for t in solo_tokens]}")
    print(f"every stream's tokens equal its solo run's: {same}")
    pair.release()


if __name__ == "__main__":
    main()
