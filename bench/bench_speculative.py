"""Speculative decoding speed on the packaged SmolLM2: with and without speculation, and aggregate
throughput at 1, 2, 4 and 8 concurrent streams. Prints its figures; asserts nothing.

    python bench/bench_speculative.py [--backend numpy|opencl] [--threads 1] [--tokens 96] [--reps 3]

Copy-heavy prompts (repeat a paragraph; print a code snippet back with one variable renamed) are
where prompt lookup shines; open-ended prompts show its overhead when drafts rarely match.
Every configuration runs in the same process, interleaved per repetition; medians are printed.
Every request opts out of the prompt cache (cache_prompt=False): no run reuses another's prompt KV
or drafts from another's output through the cross-request n-gram index, so the figures are the
drafter's on each request alone (bench/bench_prefix_cache.py measures what the caches add).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # run as a script from a clone: the repository root

from service.common.packaged_model import packaged_model_path  # noqa: E402
from service.common.tokenizer import Tokenizer  # noqa: E402
from service.engine.engine import Engine  # noqa: E402
from service.engine.request import GenRequest, SamplingParams  # noqa: E402
from service.fit.factory import PairFactory, PairRequest  # noqa: E402
from service.fit.params import ContextParams, SpeculativeConfig  # noqa: E402

PARAGRAPH = ("The lighthouse keeper climbed the spiral stairs every evening at dusk. He trimmed the wick, "
             "polished the great lens until it gleamed, and wrote the weather in a leather logbook. Ships "
             "passing the rocky point relied on his light, and in forty years it had never once gone dark.")
CODE = '''def total_price(items, tax_rate):
    subtotal = 0
    for item in items:
        subtotal += item.price * item.quantity
    tax = subtotal * tax_rate
    return subtotal + tax
'''
COPY = {
    "repeat-paragraph": f"Repeat the following paragraph exactly, word for word:\n\n{PARAGRAPH}",
    "rename-variable": f"Rewrite this Python code, renaming the variable `subtotal` to `amount`. "
                       f"Print the whole code.\n\n{CODE}",
}
OPEN = {
    "story": "Write a short story about a dragon who is afraid of the dark.",
    "explain": "Explain why the sky is blue to a ten year old.",
}
GREEDY = SamplingParams(temperature=0.0)


def make_backend(name: str, threads: int, row_tile: int | None = None):
    if name == "opencl":
        from compute.opencl.backend import OpenCLBackend

        return OpenCLBackend()
    from compute.numpy_backend import NumpyBackend

    return NumpyBackend(n_threads=threads) if row_tile is None else NumpyBackend(n_threads=threads, row_tile=row_tile)


def encode(tok, text):
    return tuple(tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]), add_special=False))


def timed(engine, prompts, spec, n_tokens):
    """Run prompts concurrently (each opting out of the prompt cache and the cross-request index);
    return (completion tokens, wall seconds, drafted, accepted)."""
    t = time.perf_counter()
    streams = [engine.submit(GenRequest(p, max_tokens=n_tokens, sampling=GREEDY, speculative=spec, cache_prompt=False))
               for p in prompts]
    res = [s.result(timeout=3600) for s in streams]
    wall = time.perf_counter() - t
    return sum(r.completion_tokens for r in res), wall, sum(r.drafted for r in res), sum(r.accepted for r in res), \
        sum(r.decode_seconds for r in res) / len(res), res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="numpy", choices=["numpy", "opencl"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--row-tile", type=int, default=None, help="NumPy row_tile (default: the backend's default)")
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--n-max", type=int, default=8)
    ap.add_argument("--n-min", type=int, default=SpeculativeConfig().n_min)
    ap.add_argument("--ngram-min", type=int, default=SpeculativeConfig().ngram_min)
    ap.add_argument("--ngram-max", type=int, default=SpeculativeConfig().ngram_max)
    ap.add_argument("--skip-streams", action="store_true")
    ap.add_argument("--row-cost", choices=("measured", "backend"), default="measured",
                    help="draft-length cost model: measured at warm-up as the server does (default), "
                         "or the backend's built-in constants")
    args = ap.parse_args()

    be = make_backend(args.backend, args.threads, args.row_tile)
    f = PairFactory(be, device_memory_bytes=1 << 34)
    pair = f.load(PairRequest(target_path=packaged_model_path(),
                              params=ContextParams(n_ctx=8 * 640, n_parallel=8, n_batch=128),
                              speculative=SpeculativeConfig("ngram", n_max=args.n_max)))
    tok = Tokenizer.from_gguf(pair.target.file.reader)
    eng = Engine(pair, tok, SpeculativeConfig("none")).start()
    off = SpeculativeConfig("none")
    on = SpeculativeConfig("ngram", n_max=args.n_max, n_min=args.n_min, ngram_min=args.ngram_min,
                           ngram_max=args.ngram_max)
    print(f"backend={args.backend} row_tile={getattr(be, 'row_tile', '-')} threads={args.threads} "
          f"tokens={args.tokens} reps={args.reps} n_max={args.n_max}")
    from service.pairs.warmup import warm_up

    warm_up(pair, eng, tok)  # as the server does before a pair is ready: kernels, row-cost curve, one request
    if args.row_cost == "backend":
        eng.row_cost = None
    print(f"row cost ({args.row_cost}): " + (eng.row_cost.describe() if eng.row_cost is not None else
                                             " ".join(f"{r}:{be.row_cost(r):.2f}" for r in range(1, args.n_max + 2))))

    print("\n== single stream, speculation off vs n-gram (decode tok/s, medians) ==")
    print(f"{'prompt':18} {'kind':5} {'off tok/s':>10} {'ngram tok/s':>12} {'ratio':>6} {'accept':>7} {'same':>5}")
    for kind, group in (("copy", COPY), ("open", OPEN)):
        for name, text in group.items():
            p = encode(tok, text)
            offs, ons, acc, same = [], [], [], True
            for _ in range(args.reps):
                n0, w0, _, _, d0, r0 = timed(eng, [p], off, args.tokens)
                n1, w1, dr, ac, d1, r1 = timed(eng, [p], on, args.tokens)
                offs.append(n0 / d0)
                ons.append(n1 / d1)
                acc.append(ac / dr if dr else 0.0)
                same &= r0[0].tokens == r1[0].tokens
            a, b = statistics.median(offs), statistics.median(ons)
            print(f"{name:18} {kind:5} {a:10.1f} {b:12.1f} {b / a:6.2f} {statistics.median(acc):7.2f} {str(same):>5}")

    if not args.skip_streams:
        print("\n== aggregate throughput by concurrent streams (open-ended prompts, speculation off) ==")
        prompts = [encode(tok, t) for t in list(OPEN.values()) + list(COPY.values())]
        base = None
        for n in (1, 2, 4, 8):
            rates = []
            for _ in range(max(1, args.reps - 1)):
                ps = [prompts[i % 2] for i in range(n)]  # open-ended prompts only
                ntok, wall, *_ = timed(eng, ps, off, args.tokens // 2)
                rates.append(ntok / wall)
            r = statistics.median(rates)
            base = base or r
            print(f"streams={n}: {r:7.1f} tok/s aggregate  ({r / base:4.2f}x of 1 stream)")
    eng.stop()
    pair.release()


if __name__ == "__main__":
    main()
