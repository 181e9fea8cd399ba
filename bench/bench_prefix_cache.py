"""Prompt reuse on the packaged SmolLM2: the prompt cache and the cross-request n-gram index.
Prints its figures; asserts nothing but says where outputs differ.

    python bench/bench_prefix_cache.py [--backend opencl|numpy] [--threads 2] [--reps 2]

1. chat: a 5-turn conversation over a long system prompt (history >= 1,500 tokens by turn 5),
   replayed turn by turn with the cache on and off (cache_prompt=false), interleaved per
   repetition: time to first token of each turn, and whether the outputs are identical.
2. alternating: two conversations taking turns on a -np 1 pair, so each evicts the other from
   the one slot; the prompt store serves them: hit rate, cached tokens and TTFT, on vs off.
3. repeat: the same open-ended request twice at temperature 0 (a different one each repetition):
   the second drafts from the first one's output through the cross-request index.

Every repetition tags its prompts so that nothing of an earlier repetition is reused.
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

GREEDY = SamplingParams(temperature=0.0)
PLACES = ["Lisbon", "Oslo", "Nairobi", "Lima", "Hanoi", "Quebec", "Perth", "Tbilisi", "Accra", "Riga", "Cusco",
          "Dakar"]
GOODS = ["copper wire", "tea", "wool blankets", "river salt", "glass beads", "dried figs", "cedar planks", "indigo dye",
         "tin cups", "rope", "olive oil", "paper"]


def document() -> str:
    """A long system prompt: a shipping ledger of 36 entries (about 1,100 tokens)."""
    lines = ["You are a clerk at a harbour office. Answer questions about the ledger below in one or two "
             "short sentences.", "", "LEDGER"]
    for i in range(36):
        p, g = PLACES[i % len(PLACES)], GOODS[(i * 5) % len(GOODS)]
        lines.append(f"Entry {i + 1}: the ship {['Aurora', 'Bittern', 'Cormorant', 'Dove'][i % 4]} left {p} on "
                     f"day {3 + 7 * i} carrying {10 + 13 * i % 90} crates of {g}; it paid a fee of "
                     f"{25 + 17 * i % 200} coins and docked at pier {1 + i % 6}.")
    return "\n".join(lines)


QUESTIONS = ["Which ship left Oslo first, and what did it carry?",
             "How many crates did entry 12 carry?",
             "Which pier did the ship from Hanoi use?",
             "What fee was paid for the cargo of tea?",
             "Summarise the three largest cargoes in one sentence."]
STORIES = ["Write a short story about a dragon who is afraid of the dark.",
           "Write a short story about a lighthouse keeper and a lost whale.",
           "Write a short story about a robot who learns to bake bread.",
           "Write a short story about a girl who finds a map inside a library book.",
           "Write a short story about a fox who wants to become a sailor."]


def make_backend(name: str, threads: int):
    if name == "opencl":
        from compute.select import make_backend as select

        return select("opencl", threads=threads)
    from compute.numpy_backend import NumpyBackend

    return NumpyBackend(n_threads=threads)


class Bench:
    """One loaded pair, its engine (warmed up) and tokenizer."""

    def __init__(self, backend, model: str, n_parallel: int, n_ctx_slot: int):
        self.pair = PairFactory(backend, device_memory_bytes=backend.device_memory().free_bytes).load(PairRequest(
            target_path=model, params=ContextParams(n_ctx=n_parallel * n_ctx_slot, n_parallel=n_parallel),
            speculative=SpeculativeConfig("ngram", n_max=8)))
        self.tok = Tokenizer.from_gguf(self.pair.target.file.reader)
        self.engine = Engine(self.pair, self.tok, SpeculativeConfig("ngram", n_max=8)).start()
        warm_up(self.pair, self.engine, self.tok)
        self.engine.prefix.clear_counters()

    def ids(self, messages) -> tuple[int, ...]:
        return tuple(self.tok.encode(self.tok.apply_chat_template(messages), add_special=False))

    def ask(self, messages, cache: bool, max_tokens: int):
        """(result, prompt tokens, time to first token, total seconds)."""
        prompt = self.ids(messages)
        t = time.perf_counter()
        res = self.engine.submit(GenRequest(prompt, max_tokens=max_tokens, sampling=GREEDY,
                                            cache_prompt=cache)).result(timeout=3600)
        return res, len(prompt), res.queue_seconds + res.prefill_seconds, time.perf_counter() - t

    def conversation(self, system: str, questions, cache: bool, max_tokens: int):
        """Replay a chat turn by turn; per turn (prompt tokens, ttft, tokens, cached tokens)."""
        messages, turns = [{"role": "system", "content": system}], []
        for q in questions:
            messages.append({"role": "user", "content": q})
            res, n, ttft, _ = self.ask(messages, cache, max_tokens)
            messages.append({"role": "assistant", "content": res.text})
            turns.append((n, ttft, res.tokens, res.cached_prompt_tokens))
        return turns

    def close(self):
        self.engine.stop()
        self.pair.release()


def med(xs) -> float:
    return statistics.median(xs) if xs else float("nan")


def chat(b: Bench, reps: int, max_tokens: int) -> None:
    print("\n== 1. a 5-turn chat replayed, cache on vs off (-np 2, TTFT medians over repetitions) ==")
    on, off, same = {i: [] for i in range(5)}, {i: [] for i in range(5)}, True
    sizes, cached = {}, {i: [] for i in range(5)}
    for rep in range(reps):
        system = f"Session {rep}. " + document()
        order = (True, False) if rep % 2 == 0 else (False, True)
        runs = {mode: b.conversation(system, QUESTIONS, mode, max_tokens) for mode in order}
        for i in range(5):
            (n, t_on, toks_on, c_on), (_, t_off, toks_off, _) = runs[True][i], runs[False][i]
            on[i].append(t_on)
            off[i].append(t_off)
            cached[i].append(c_on)
            sizes[i] = n
            same &= toks_on == toks_off
    print(f"{'turn':>4} {'prompt':>7} {'cached':>7} {'TTFT off':>9} {'TTFT on':>8} {'speed-up':>8}")
    for i in range(5):
        print(f"{i + 1:>4} {sizes[i]:>7} {int(med(cached[i])):>7} {med(off[i]):>8.3f}s {med(on[i]):>7.3f}s "
              f"{med(off[i]) / med(on[i]):>7.1f}x")
    later_off, later_on = sum(med(off[i]) for i in range(1, 5)), sum(med(on[i]) for i in range(1, 5))
    print(f"turns 2-5 together: {later_off:.2f}s off, {later_on:.2f}s on: {later_off / later_on:.1f}x; "
          f"outputs identical: {same}")


def alternating(model: str, backend, reps: int, max_tokens: int) -> None:
    print("\n== 2. two conversations alternating on a -np 1 pair (each evicts the other from the slot) ==")
    b = Bench(backend, model, n_parallel=1, n_ctx_slot=4096)
    try:
        ttft, cached = {True: [], False: []}, []
        same = True
        for rep in range(reps):
            for mode in ((True, False) if rep % 2 == 0 else (False, True)):
                convs = [[{"role": "system", "content": f"Session {rep}{name}. " + document()}] for name in "AB"]
                outs = []
                for q in QUESTIONS[:3]:
                    for msgs in convs:
                        msgs.append({"role": "user", "content": q})
                        res, n, t, _ = b.ask(msgs, mode, max_tokens)
                        msgs.append({"role": "assistant", "content": res.text})
                        outs.append(res.tokens)
                        if len(msgs) > 3:  # turns 2 and 3: their prefix left the slot when the other took it
                            ttft[mode].append(t)
                            if mode:
                                cached.append((res.cached_prompt_tokens, n))
                if mode:
                    outs_on = outs
                else:
                    outs_off = outs
            same &= outs_on == outs_off
        s = b.engine.prefix.stats()
        print(f"store: {s['capacity_bytes'] >> 20} MiB planned, {s['entries']} states, {s['used_bytes'] >> 20} MiB "
              f"used, {s['evictions']} evictions")
        print(f"requests with the cache on: {s['hits']} hits, {s['misses']} misses "
              f"(hit rate {s['hits'] / max(1, s['hits'] + s['misses']):.0%}; a first turn shares only the chat "
              f"template's first tokens, if anything), {s['cached_tokens']} prompt tokens served from the cache")
        served = [c for c, n in cached if c >= n - 64]  # all but the last user message and the template around it
        print(f"turns 2-3 with the cache on: {len(served)} of {len(cached)} restored their conversation from the "
              f"store (median {med([c for c, _ in cached]):.0f} of {med([n for _, n in cached]):.0f} prompt "
              f"tokens cached)")
        print(f"TTFT of turns 2-3 (median): off {med(ttft[False]):.3f}s, on {med(ttft[True]):.3f}s: "
              f"{med(ttft[False]) / med(ttft[True]):.1f}x; outputs identical: {same}")
    finally:
        b.close()


def repeat(b: Bench, reps: int, max_tokens: int) -> None:
    print(f"\n== 3. the same open-ended request twice at temperature 0 ({max_tokens} tokens) ==")
    rows = []
    for rep in range(reps):
        msgs = [{"role": "user", "content": STORIES[rep % len(STORIES)]}]
        (r1, _, t1, w1), (r2, _, t2, w2) = (b.ask(msgs, True, max_tokens) for _ in range(2))
        rows.append((w1, w2, r1.decode_seconds, r2.decode_seconds, r1, r2))
        print(f"rep {rep}: first {w1:.2f}s ({r1.completion_tokens} tokens, {r1.accepted}/{r1.drafted} drafts "
              f"accepted), second {w2:.2f}s ({r2.accepted}/{r2.drafted} accepted, {r2.cached_prompt_tokens} prompt "
              f"tokens cached): {w1 / w2:.1f}x; decode {r1.decode_seconds / r2.decode_seconds:.1f}x; "
              f"identical: {r1.tokens == r2.tokens}")
    w1, w2 = med([r[0] for r in rows]), med([r[1] for r in rows])
    d1, d2 = med([r[2] for r in rows]), med([r[3] for r in rows])
    print(f"median: first {w1:.2f}s, second {w2:.2f}s: {w1 / w2:.1f}x faster (decode alone {d1 / d2:.1f}x); "
          f"all identical: {all(r[4].tokens == r[5].tokens for r in rows)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="opencl", choices=["numpy", "opencl"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--answer-tokens", type=int, default=64, help="tokens of each chat answer")
    ap.add_argument("--story-tokens", type=int, default=160)
    ap.add_argument("--only", default="", help="run one part: chat, alternating or repeat")
    args = ap.parse_args()
    model = packaged_model_path()
    backend = make_backend(args.backend, args.threads)
    print(machine_line())
    print(f"backend: {backend!r}; model {os.path.basename(model)}")
    if args.only in ("", "chat", "repeat"):
        b = Bench(backend, model, n_parallel=2, n_ctx_slot=2048)
        try:
            if args.only in ("", "chat"):
                chat(b, args.reps, args.answer_tokens)
            if args.only in ("", "repeat"):
                repeat(b, max(args.reps, 3), args.story_tokens)
        finally:
            b.close()
    if args.only in ("", "alternating"):
        alternating(model, backend, args.reps, args.answer_tokens)


if __name__ == "__main__":
    main()
