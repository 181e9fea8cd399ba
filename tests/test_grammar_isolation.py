"""One client's grammar must never hurt another: grammars that pass the submit-time check and fail
while matching end their own request alone (RESOURCE_EXHAUSTED with the reason), never a step of
the others; compile and match are bounded; messages carry no library panic or backtrace.

Every hostile grammar here compiles (so submit accepts it) and then fails at its first tokens
under llguidance's limits: an infinitely recursive Lark rule, a JSON Schema whose required
property refers back to itself, regexes that explode when the lexer builds them lazily, and a
GBNF rule that recurses through two others.
"""

from __future__ import annotations

import json
import time

import grpc
import pytest

from compute.numpy_backend import NumpyBackend
from service.common.errors import InvalidArgument, ResourceExhausted
from service.common.tokenizer import Tokenizer
from service.engine.engine import Engine
from service.engine.grammar import MAX_GRAMMAR_BYTES, GrammarFailed, Grammars, library_message
from service.engine.request import GenRequest, ResponseFormat, SamplingParams
from service.fit.factory import PairFactory, PairRequest
from service.fit.params import ContextParams, SpeculativeConfig
from service.pb.specserve.v1 import specserve_pb2 as pb
from tests.conftest import TINY, TINY_DRAFT

GREEDY = SamplingParams(temperature=0.0)
HOSTILE = {
    "lark_infinite_recursion": ResponseFormat("lark", 'start: a\na: "x" a | a "y" | a a'),
    "schema_required_self_reference": ResponseFormat("json_schema", json.dumps(
        {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]})),
    "regex_lazy_explosion": ResponseFormat("regex", "^(a{1000}){1000}$"),
    "regex_lazy_explosion_other_letter": ResponseFormat("regex", "^(q{999}){1001}$"),
    "gbnf_mutual_recursion": ResponseFormat("gbnf", 'root ::= a\na ::= b "x" | "y" b | a a\nb ::= a | a b'),
}


@pytest.fixture(scope="module")
def engine(tiny_models_dir):
    """The tiny model, 4 slots, n-gram drafting, on NumPy."""
    spec = SpeculativeConfig("ngram", n_max=4)
    pair = PairFactory(NumpyBackend(n_threads=1), device_memory_bytes=1 << 32).load(PairRequest(
        name="iso", target_path=str(tiny_models_dir / TINY), draft_path="",
        params=ContextParams(n_ctx=4 * 256, n_parallel=4, n_batch=32), speculative=spec))
    tok = Tokenizer.from_gguf(pair.target.file.reader)
    eng = Engine(pair, tok, spec).start()
    yield eng
    eng.stop()
    pair.release()


def prompt(eng, text: str) -> tuple[int, ...]:
    return tuple(eng.tok.encode(text, add_special=False))


def together(eng, *reqs):
    """Submit every request before the engine thread can step: they are admitted into the same steps."""
    with eng._cv:  # the engine's lock (reentrant): its thread waits until all are queued
        return [eng.submit(r) for r in reqs]


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_grammar_that_fails_mid_generation_ends_its_own_request_alone(engine, name):
    victim, hostile = together(engine, GenRequest(prompt(engine, "the theme"), max_tokens=40, sampling=GREEDY),
                               GenRequest(prompt(engine, "the"), max_tokens=40, sampling=GREEDY,
                                          response_format=HOSTILE[name]))
    with pytest.raises(ResourceExhausted) as e:
        hostile.result(timeout=120)
    assert isinstance(e.value, GrammarFailed)
    msg = str(e.value)
    assert msg.startswith(f"response_format.{HOSTILE[name].kind}:") and "limits" in msg
    assert "<backtrace>" not in msg and "<state>" not in msg and "panic" not in msg and len(msg) < 600
    r = victim.result(timeout=120)  # the other request of the same steps ends as it would alone
    assert r.finish_reason in ("length", "stop") and r.completion_tokens > 0
    assert engine.stats()["active_slots"] == 0


def test_the_victim_gets_the_tokens_it_gets_alone(engine):
    req = GenRequest(prompt(engine, "the theme"), max_tokens=24, sampling=GREEDY)
    alone = engine.submit(req).result(timeout=120)
    *hostile, beside = together(engine, *[GenRequest(prompt(engine, "th"), max_tokens=24, sampling=GREEDY,
                                                     response_format=f) for f in list(HOSTILE.values())[:3]], req)
    beside = beside.result(timeout=120)
    for h in hostile:
        with pytest.raises(GrammarFailed):
            h.result(timeout=120)
    assert beside.tokens == alone.tokens


def test_a_failed_grammar_is_dropped_from_the_cache(engine):
    fmt = HOSTILE["regex_lazy_explosion"]
    with pytest.raises(GrammarFailed):
        engine.submit(GenRequest(prompt(engine, "a"), max_tokens=8, sampling=GREEDY, response_format=fmt)).result(60)
    assert (fmt.kind, fmt.value) not in engine.grammars._cache


def test_good_grammars_still_generate_beside_failing_ones(engine):
    good, bad = together(engine, GenRequest(prompt(engine, "the"), max_tokens=12, sampling=GREEDY,
                                            response_format=ResponseFormat("regex", "(yes|no)!")),
                         GenRequest(prompt(engine, "the"), max_tokens=12, sampling=GREEDY,
                                    response_format=HOSTILE["lark_infinite_recursion"]))
    with pytest.raises(GrammarFailed):
        bad.result(timeout=60)
    r = good.result(timeout=60)
    assert r.text in ("yes!", "no!") and r.finish_reason == "stop"


# ---- compile-time bounds and messages ----

@pytest.fixture(scope="module")
def grammars(tiny_models_dir):
    import gguf

    tok = Tokenizer.from_gguf(gguf.GGUFReader(str(tiny_models_dir / TINY)))
    return Grammars(tok, tok.vocab_size)


@pytest.mark.parametrize("fmt", [
    ResponseFormat("gbnf", "root ::= " + " | ".join(f'"w{i}"' for i in range(100_000))),
    ResponseFormat("lark", "start: " + " | ".join(f'"w{i}"' for i in range(100_000))),
    ResponseFormat("json_schema", json.dumps({"type": "object", "properties": {
        f"p{i}": {"type": "string", "pattern": f"^[a-z]{{{i % 50 + 1}}}x$"} for i in range(20_000)}})),
    ResponseFormat("regex", "(" + "|".join(f"w{i}" for i in range(100_000)) + ")"),
], ids=["gbnf_100k_alternatives", "lark_100k_alternatives", "json_schema_1mb", "regex_100k_alternatives"])
def test_a_huge_grammar_is_refused_in_under_a_second_without_a_backtrace(grammars, fmt):
    t0 = time.perf_counter()
    with pytest.raises(InvalidArgument) as e:
        grammars.compile(fmt)
    assert time.perf_counter() - t0 < 1.0
    assert f"at most {MAX_GRAMMAR_BYTES}" in str(e.value) and "<backtrace>" not in str(e.value)


def test_a_grammar_just_under_the_size_bound_compiles_quickly(grammars):
    n = 9000  # ~97 kB of GBNF
    fmt = ResponseFormat("gbnf", "root ::= " + " | ".join(f'"w{i}"' for i in range(n)))
    assert len(fmt.value) < MAX_GRAMMAR_BYTES
    t0 = time.perf_counter()
    grammars.compile(fmt)
    assert time.perf_counter() - t0 < 2.0


def test_library_messages_lose_panics_backtraces_and_state_dumps():
    panic = ("panic: assertion failed: grammar.symbols.len() < u16::MAX as usize - 10\n<backtrace>\n   0: <unknown>\n"
             "  16: type_call\n             at /tmp/python-build/Objects/typeobject.c:1091:11\n")
    out = library_message(panic)
    assert "backtrace" not in out and "typeobject" not in out and not out.startswith("panic")
    assert "grammar.symbols.len()" in out
    state = "parser error: Too many items (limit 50000; ff_tokens)\n<state>\nTokens: ⟦{\"⟧\nParser: {\"rows\": 1}"
    assert library_message(state) == "parser error: Too many items (limit 50000; ff_tokens)"
    assert len(library_message("x" * 5000)) <= 300


def test_the_cache_is_bounded_by_bytes(tiny_models_dir):
    import gguf

    tok = Tokenizer.from_gguf(gguf.GGUFReader(str(tiny_models_dir / TINY)))
    g = Grammars(tok, tok.vocab_size, cache_max=1000, cache_bytes=4 << 20)
    for i in range(40):
        g.compile(ResponseFormat("gbnf", "root ::= " + " | ".join(f'"v{i}x{k}"' for k in range(400))))
    assert len(g._cache) < 40 and g.cache_bytes <= 4 << 20


# ---- over gRPC: attacker and victim on the same pair ----

@pytest.mark.parametrize("name", ["lark_infinite_recursion", "regex_lazy_explosion"])
def test_over_grpc_the_attacker_gets_resource_exhausted_and_the_victims_stream_ends_well(tiny_server, name):
    c = tiny_server
    stream = c.gen.GenerateStream(pb.GenerateStreamRequest(prompt="the theme", max_tokens=200,
                                                           sampling=pb.SamplingParams(temperature=0)), timeout=120)
    fmt = HOSTILE[name]
    with pytest.raises(grpc.RpcError) as e:
        c.gen.Generate(pb.GenerateRequest(prompt="the", max_tokens=32, response_format=pb.ResponseFormat(
            **{fmt.kind: fmt.value})), timeout=120)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "limits" in e.value.details()
    assert "<backtrace>" not in e.value.details()
    assert list(stream)[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED  # the victim's stream ends well


def test_draft_model_pairs_isolate_grammar_failures_too(tiny_models_dir):
    spec = SpeculativeConfig("draft", n_max=3)
    pair = PairFactory(NumpyBackend(n_threads=1), device_memory_bytes=1 << 32).load(PairRequest(
        name="isod", target_path=str(tiny_models_dir / TINY), draft_path=str(tiny_models_dir / TINY_DRAFT),
        params=ContextParams(n_ctx=2 * 256, n_parallel=2, n_batch=32), speculative=spec))
    tok = Tokenizer.from_gguf(pair.target.file.reader)
    eng = Engine(pair, tok, spec).start()
    try:
        victim, bad = together(eng, GenRequest(tuple(tok.encode("the theme", add_special=False)), max_tokens=24,
                                               sampling=GREEDY),
                               GenRequest(tuple(tok.encode("the", add_special=False)), max_tokens=24, sampling=GREEDY,
                                          response_format=HOSTILE["schema_required_self_reference"]))
        with pytest.raises(GrammarFailed):
            bad.result(timeout=120)
        assert victim.result(timeout=120).completion_tokens > 0
    finally:
        eng.stop()
        pair.release()
