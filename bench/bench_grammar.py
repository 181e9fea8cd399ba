"""Structured output costs: llguidance vs xgrammar on the SmolLM2 vocabulary, and what the mask costs
a decode on the packaged model. Prints its figures; asserts nothing.

    python bench/bench_grammar.py [--reps 5] [--tokens 40] [--threads 1]

1. Libraries (the choice of service/engine/grammar.py): the nested JSON Schema below compiled for the
   49152-token vocabulary (fresh compiler each time, no cache), and the per-token mask along a
   valid document of it (the mask of each prefix, then the token consumed). xgrammar is measured
   when it is installed (`pip install xgrammar`: it brings torch, transformers and triton).
2. The engine: greedy decode tok/s of the same prompts with the schema enforced and without,
   1 slot and 4 concurrent slots, speculation off; the ratio constrained / unconstrained.
Repetitions are interleaved (A B A B ...); medians are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # run as a script from a clone: the repository root

import numpy as np  # noqa: E402

from bench.common import machine_line  # noqa: E402
from service.common.packaged_model import packaged_model_path  # noqa: E402
from service.common.tokenizer import Tokenizer  # noqa: E402
from service.engine.engine import Engine  # noqa: E402
from service.engine.grammar import JSON_OPTIONS, Grammars, constrain  # noqa: E402
from service.engine.request import GenRequest, ResponseFormat, SamplingParams  # noqa: E402
from service.fit.factory import PairFactory, PairRequest  # noqa: E402
from service.fit.params import ContextParams, SpeculativeConfig  # noqa: E402

SCHEMA = {  # nested objects (three deep), arrays of strings and of objects, enums, numbers
    "type": "object",
    "properties": {
        "name": {"type": "string"}, "age": {"type": "integer"},
        "status": {"enum": ["active", "inactive", "banned"]},
        "address": {"type": "object",
                    "properties": {"street": {"type": "string"}, "city": {"type": "string"},
                                   "geo": {"type": "object", "properties": {"lat": {"type": "number"},
                                                                            "lon": {"type": "number"}},
                                           "required": ["lat", "lon"]}},
                    "required": ["street", "city", "geo"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
        "orders": {"type": "array", "items": {"type": "object",
                                              "properties": {"id": {"type": "integer"},
                                                             "kind": {"enum": ["book", "food", "tool"]}},
                                              "required": ["id", "kind"]}},
    },
    "required": ["name", "age", "status", "address", "tags", "orders"],
}
DOC = {"name": "Ada Lovelace", "age": 36, "status": "active",
       "address": {"street": "12 St James's Square", "city": "London", "geo": {"lat": 51.5, "lon": -0.13}},
       "tags": ["math", "poetry"], "orders": [{"id": 1, "kind": "book"}, {"id": 2, "kind": "food"}]}
PROMPTS = ["A user profile as JSON: ", "Ada Lovelace, as JSON: ", "The customer record: ", "JSON for a librarian: "]


def ms(xs) -> str:
    return f"{statistics.median(xs) * 1e3:8.3f}"


def llguidance_side(tok):
    """(compile, walk): compile the schema from scratch; walk = the mask time of each prefix of DOC."""
    import llguidance as llg

    g = Grammars(tok, tok.vocab_size, cache_max=0)  # no cache: every compile is a fresh one
    fmt = ResponseFormat("json_schema", json.dumps(SCHEMA))
    ids = tok.encode(json.dumps(DOC, separators=(",", ":")), add_special=False)
    bits = np.zeros((1, g.n_words), np.int32)

    def compile_():
        return g.compile(fmt)

    def walk(m: llg.LLMatcher) -> list[float]:
        m = m.deep_copy()
        out = []
        for t in ids:
            t0 = time.perf_counter()
            m.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
            out.append(time.perf_counter() - t0)
            assert (bits[0, t >> 5] >> (t & 31)) & 1 and m.consume_token(t)
        return out
    return compile_, walk, len(ids)


def xgrammar_side(tok):
    """The same for xgrammar, or None when it is not installed."""
    try:
        import xgrammar as xgr
    except ImportError:
        return None
    info = xgr.TokenizerInfo(list(tok.token_pieces), xgr.VocabType.RAW, vocab_size=tok.vocab_size,
                             stop_token_ids=sorted(tok.eog_ids))
    ids = tok.encode(json.dumps(DOC, separators=(",", ":")), add_special=False)
    bits = xgr.allocate_token_bitmask(1, tok.vocab_size)

    def compile_():
        c = xgr.GrammarCompiler(info, cache_enabled=False)
        return c.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":"))

    def walk(compiled) -> list[float]:
        m = xgr.GrammarMatcher(compiled)
        out = []
        for t in ids:
            t0 = time.perf_counter()
            m.fill_next_token_bitmask(bits)
            out.append(time.perf_counter() - t0)
            assert (int(bits[0, t >> 5]) >> (t & 31)) & 1 and m.accept_token(t)
        return out
    return compile_, walk, len(ids)


def compare_libraries(tok, reps: int) -> None:
    sides = {"llguidance": llguidance_side(tok), "xgrammar": xgrammar_side(tok)}
    n_doc = sides["llguidance"][2]
    print(f"\n== libraries: nested JSON Schema, vocabulary {tok.vocab_size}, document of {n_doc} tokens ==")
    comp = {k: [] for k in sides}
    mask = {k: [] for k in sides}
    for _ in range(reps):
        for name, side in sides.items():
            if side is None:
                continue
            t0 = time.perf_counter()
            c = side[0]()
            comp[name].append(time.perf_counter() - t0)
            mask[name] += side[1](c)
    print(f"{'library':11} {'compile ms':>10} {'mask ms/token (median)':>23} {'p90':>8} {'max':>8}")
    for name, side in sides.items():
        if side is None:
            print(f"{name:11} not installed (pip install {name} to compare)")
            continue
        m = sorted(mask[name])
        print(f"{name:11} {ms(comp[name]):>10} {ms(m):>23} {m[int(len(m) * 0.9)] * 1e3:8.3f} {m[-1] * 1e3:8.3f}")


def engine_mask_cost(tok) -> None:
    """What the engine adds per constrained row: llguidance's mask, unpacking it, -inf on the logits."""
    g = Grammars(tok, tok.vocab_size)
    m = g.matcher(ResponseFormat("json_schema", json.dumps(SCHEMA)))
    ids = tok.encode(json.dumps(DOC, separators=(",", ":")), add_special=False)
    logits = np.random.default_rng(0).standard_normal(tok.vocab_size).astype(np.float32)
    masks, applies = [], []
    for t in ids:
        t0 = time.perf_counter()
        allowed = g.masks([(m, ())])[0]
        t1 = time.perf_counter()
        constrain(logits, allowed)
        masks.append(t1 - t0)
        applies.append(time.perf_counter() - t1)
        m.advance(t)
    print(f"engine, per constrained row: mask + unpack {ms(masks)} ms, -inf on the logits {ms(applies)} ms")


def decode_ratio(tok, pair, reps: int, n_tokens: int) -> None:
    fmt = ResponseFormat("json_schema", json.dumps(SCHEMA))
    eng = Engine(pair, tok, SpeculativeConfig("none")).start()
    greedy = SamplingParams(temperature=0.0)
    print(f"\n== packaged model, greedy, {n_tokens} tokens max, decode tok/s (medians of {reps}) ==")
    print(f"{'slots':>5} {'free tok/s':>11} {'schema tok/s':>13} {'ratio':>6}")
    try:
        for slots in (1, 4):
            prompts = [tuple(tok.encode(PROMPTS[i % len(PROMPTS)], add_special=False)) for i in range(slots)]
            rate = {None: [], "schema": []}
            for _ in range(reps):
                for key, f in ((None, None), ("schema", fmt)):
                    streams = [eng.submit(GenRequest(p, max_tokens=n_tokens, sampling=greedy, response_format=f))
                               for p in prompts]
                    res = [s.result(timeout=3600) for s in streams]
                    rate[key].append(sum(r.completion_tokens for r in res) / max(r.decode_seconds for r in res))
            free, sch = statistics.median(rate[None]), statistics.median(rate["schema"])
            print(f"{slots:5} {free:11.1f} {sch:13.1f} {sch / free:6.2f}")
    finally:
        eng.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-engine", action="store_true", help="only the library comparison")
    args = ap.parse_args()
    from importlib.metadata import PackageNotFoundError, version

    print(machine_line())
    try:
        xgr = f"xgrammar {version('xgrammar')}"
    except PackageNotFoundError:
        xgr = "xgrammar not installed"
    print(f"llguidance {version('llguidance')}, {xgr}")
    print(f"JSON layout: {JSON_OPTIONS} (both libraries compile compact JSON)")
    from compute.numpy_backend import NumpyBackend

    model = packaged_model_path()
    pair = PairFactory(NumpyBackend(n_threads=args.threads), device_memory_bytes=1 << 34).load(
        PairRequest(target_path=model, params=ContextParams(n_ctx=4 * 256, n_parallel=4, n_batch=64),
                    speculative=SpeculativeConfig("none")))
    try:
        tok = Tokenizer.from_gguf(pair.target.file.reader)
        compare_libraries(tok, args.reps)
        engine_mask_cost(tok)
        if not args.skip_engine:
            decode_ratio(tok, pair, args.reps, args.tokens)
    finally:
        pair.release()


if __name__ == "__main__":
    main()
