"""Structured output: service/engine/grammar.py and the engine's use of it.

Unit: every kind compiles, bad ones are InvalidArgument with llguidance's message, the masks of a
draft equal the masks met by advancing token by token, EOS only where the grammar accepts.
Acceptance on the packaged SmolLM2: 100 concurrent generations under a nested JSON Schema all parse
and validate (jsonschema), and greedy output with the n-gram drafter equals that without it; the
model drafting for itself under the grammar has every draft accepted (row i's mask follows d_1..d_i).
"""

from __future__ import annotations

import json

import grpc
import jsonschema
import numpy as np
import pytest

from compute.numpy_backend import NumpyBackend
from service.common.errors import InvalidArgument
from service.common.tokenizer import Tokenizer
from service.engine.engine import Engine
from service.engine.grammar import Grammars
from service.engine.request import GenRequest, ResponseFormat, SamplingParams
from service.fit.factory import PairFactory, PairRequest
from service.fit.params import ContextParams, SpeculativeConfig
from service.pb.specserve.v1 import specserve_pb2 as pb
from tests.models import packaged_model_path

GREEDY = SamplingParams(temperature=0.0)
SCHEMA = {  # a nested object, an array of enums, enums; bounded, so every output ends
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "role": {"enum": ["admin", "user", "guest"]},
        "home": {"type": "object",
                 "properties": {"city": {"type": "string", "maxLength": 10},
                                "floor": {"type": "integer", "minimum": 0, "maximum": 99}},
                 "required": ["city", "floor"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 2},
    },
    "required": ["name", "role", "home", "tags"],
    "additionalProperties": False,
}
FMT = ResponseFormat("json_schema", json.dumps(SCHEMA))
PEOPLE = ["a librarian", "a pilot", "a baker", "a chess player", "a nurse", "a gardener", "a sailor", "a painter",
          "a student", "a farmer"]
PLACES = ["Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Quebec", "Perth", "Madrid", "Nairobi", "Seoul"]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    import gguf

    return Tokenizer.from_gguf(gguf.GGUFReader(packaged_model_path()))


@pytest.fixture(scope="module")
def grammars(tok) -> Grammars:
    return Grammars(tok, tok.vocab_size)


def ids(tok, text: str) -> list[int]:
    return tok.encode(text, add_special=False, parse_special=False)


# ---- the wrapper ----

@pytest.mark.parametrize("fmt,accepted", [
    (ResponseFormat("json_object"), '{"a":[1,2]}'),
    (FMT, '{"name":"Ann","role":"guest","home":{"city":"Oslo","floor":12},"tags":["red","blue"]}'),
    (ResponseFormat("regex", r"[0-9]{3}-[a-z]+"), "123-abc"),
    (ResponseFormat("lark", 'start: "yes" | "no" NUM\nNUM: /[0-9]+/'), "no42"),
    (ResponseFormat("gbnf", 'root ::= "(" item ("," item)* ")"\nitem ::= [a-c]+'), "(ab,c)"),
], ids=["json_object", "json_schema", "regex", "lark", "gbnf"])
def test_every_kind_accepts_its_text_and_then_only_eos(grammars, tok, fmt, accepted):
    m = grammars.matcher(fmt)
    t = ids(tok, accepted)
    assert m.valid_prefix(t) == len(t)
    assert m.valid_prefix(ids(tok, "}{" + accepted)) == 0  # text outside the format is refused at once
    eos = grammars.masks([(m, ())])[0][sorted(grammars.eos)]
    assert not eos.any()  # nothing generated yet: EOS forbidden
    for i, x in enumerate(t):
        assert grammars.masks([(m, ())])[0][x], f"token {i} of the accepted text is masked"
        m.advance(x)
    assert m.m.is_accepting()
    assert grammars.masks([(m, ())])[0][sorted(grammars.eos)].all()  # complete: EOS allowed


@pytest.mark.parametrize("fmt,needle", [
    (ResponseFormat("json_schema", '{"type": "wat"}'), "wat"),
    (ResponseFormat("json_schema", '{"type": "object", "properties": '), "Expecting"),
    (ResponseFormat("json_schema", "[1, 2]"), "object or a boolean"),
    (ResponseFormat("regex", "a(b"), "unclosed group"),
    (ResponseFormat("lark", "start: foo"), "unknown name"),
    (ResponseFormat("gbnf", "root ::= ("), "Expected"),
], ids=["schema-type", "schema-json", "schema-array", "regex", "lark", "gbnf"])
def test_an_invalid_format_is_invalid_argument_with_the_librarys_message(grammars, fmt, needle):
    with pytest.raises(InvalidArgument) as e:
        grammars.compile(fmt)
    assert f"response_format.{fmt.kind}" in str(e.value) and needle in str(e.value)


def test_the_masks_of_a_draft_are_those_met_advancing_token_by_token(grammars, tok):
    doc = ids(tok, '{"name":"Bo","role":"admin","home":{"city":"Rome","floor":4},"tags":["blue","red"]}')
    m = grammars.matcher(FMT)
    m.advance(doc[0])
    drafts = tuple(doc[1:9])
    along = grammars.masks([(m, drafts)])  # rows: after d_1..d_i, i = 0..8
    assert along.shape == (len(drafts) + 1, tok.vocab_size)
    assert m.valid_prefix(doc[1:]) == len(doc) - 1  # the state is where it was: after doc[0]
    step = grammars.matcher(FMT)
    step.advance(doc[0])
    for i in range(len(drafts) + 1):
        np.testing.assert_array_equal(along[i], grammars.masks([(step, ())])[0], err_msg=f"row {i}")
        if i < len(drafts):
            step.advance(drafts[i])
    # several slots in one call, each at its own place, rows in order
    other = grammars.matcher(ResponseFormat("regex", "[0-9]+"))
    both = grammars.masks([(other, ()), (m, drafts[:2])])
    np.testing.assert_array_equal(both[1:], along[:3])
    assert both[0][ids(tok, "7")[0]] and not both[0][ids(tok, "x")[0]]


def test_a_row_after_eos_allows_eos_and_completion_stops(grammars, tok):
    m = grammars.matcher(ResponseFormat("regex", "ab|abc"))
    a, b, c = (ids(tok, x)[0] for x in "abc")
    eos = min(grammars.eos)
    assert m.valid_prefix([a, b, eos, a]) == 3  # EOS is valid where the grammar accepts, nothing after it
    rows = grammars.masks([(m, (a, b, eos))])
    assert rows[2][c] and rows[2][eos]  # "ab" may end or go on
    assert set(np.flatnonzero(rows[3])) == set(grammars.eos)  # past the end: EOS only (a distribution)
    assert m.mask_after((a, b, eos)) is None  # what the draft model reads: drafting stops there
    assert m.advance(a) is False and m.advance(b) is False
    assert m.advance(c) is True  # "abc": complete, nothing may follow


def test_compiled_grammars_are_cached_within_a_bound(tok):
    g = Grammars(tok, tok.vocab_size, cache_max=2)
    fmts = [ResponseFormat("regex", f"x{i}") for i in range(3)]
    first = g.compile(fmts[0])
    assert g.compile(fmts[0]) is first
    for f in fmts[1:]:
        g.compile(f)
    assert len(g._cache) == 2 and g.compile(fmts[0]) is not first  # the least recently used was dropped
    m1, m2 = g.matcher(fmts[1]), g.matcher(fmts[1])
    m1.advance(ids(tok, "x")[0])
    assert m2.valid_prefix(ids(tok, "x1")) == 2  # each slot's matcher is its own copy


# ---- the engine, on the packaged model ----

@pytest.fixture(scope="module")
def pairs():
    model = packaged_model_path()
    f = PairFactory(NumpyBackend(n_threads=1, row_tile=8), device_memory_bytes=1 << 34)  # batch invariant
    out = {"ngram": f.load(PairRequest(name="g8", target_path=model,
                                       params=ContextParams(n_ctx=8 * 160, n_parallel=8, n_batch=128),
                                       speculative=SpeculativeConfig("ngram", n_max=4))),
           "self": f.load(PairRequest(name="gself", target_path=model, draft_path=model,
                                      params=ContextParams(n_ctx=2 * 160, n_parallel=2, n_batch=64),
                                      speculative=SpeculativeConfig("draft", n_max=4)))}
    yield out
    for p in out.values():
        p.release()


def run(pair, tok, reqs: list[GenRequest]):
    eng = Engine(pair, tok, SpeculativeConfig("none"), queue_max=len(reqs)).start()
    try:
        streams = [eng.submit(r) for r in reqs]  # all at once: the slots decode them batched
        return [s.result(timeout=900) for s in streams]
    finally:
        eng.stop()


def prompt(tok, i: int) -> tuple[int, ...]:
    """100 different short prompts (a short prompt keeps the test's prefill small)."""
    who, where = PEOPLE[i % len(PEOPLE)], PLACES[i // len(PEOPLE) % len(PLACES)]
    return tuple(tok.encode(f"{who.capitalize()} from {where}, as JSON: ", add_special=False))


@pytest.mark.slow
def test_100_generations_validate_and_ngram_speculation_is_lossless(pairs, tok):
    prompts = [prompt(tok, i) for i in range(100)]

    def reqs(spec):
        return [GenRequest(p, max_tokens=48, sampling=GREEDY, speculative=spec, response_format=FMT) for p in prompts]

    plain = run(pairs["ngram"], tok, reqs(SpeculativeConfig("none")))
    spec = run(pairs["ngram"], tok, reqs(SpeculativeConfig("ngram", n_max=4)))
    for i, r in enumerate(spec):
        assert r.finish_reason == "stop", f"generation {i} did not complete: {r.text!r}"
        jsonschema.validate(json.loads(r.text), SCHEMA)  # raises on anything invalid
        assert r.tokens == plain[i].tokens, f"generation {i}: n-gram speculation changed the constrained output"
    assert sum(r.drafted for r in spec) > 0  # drafts did go through the grammar check and the masked verify
    assert len({r.text for r in spec}) > 10  # the prompts do vary the output


@pytest.mark.slow
def test_the_model_drafting_for_itself_under_a_grammar_has_every_draft_accepted(pairs, tok):
    """The draft model's q is masked with the grammar after its own drafts, the target's row i with the
    grammar after d_1..d_i: the same model on both sides agrees on every token, so a mask off by one
    row would show as a rejection."""
    reqs = [GenRequest(prompt(tok, i), max_tokens=48, sampling=GREEDY, response_format=FMT) for i in range(2)]
    off = run(pairs["self"], tok, [GenRequest(r.prompt, r.max_tokens, r.sampling, speculative=SpeculativeConfig(
        "none"), response_format=FMT) for r in reqs])
    on = run(pairs["self"], tok, [GenRequest(r.prompt, r.max_tokens, r.sampling, speculative=SpeculativeConfig(
        "draft", n_max=4, p_min=0.0), response_format=FMT) for r in reqs])
    for a, b in zip(off, on):
        assert b.tokens == a.tokens
        assert b.drafted > 0 and b.accepted == b.drafted
        jsonschema.validate(json.loads(b.text), SCHEMA)


@pytest.mark.slow
def test_sampled_constrained_output_validates_and_follows_its_seed(pairs, tok):
    reqs = [GenRequest(prompt(tok, i), max_tokens=48, sampling=SamplingParams(temperature=0.9, seed=i),
                       speculative=SpeculativeConfig("ngram", n_max=4), response_format=FMT) for i in range(8)]
    first, again = run(pairs["ngram"], tok, reqs), run(pairs["ngram"], tok, reqs)
    for a, b in zip(first, again):
        assert a.finish_reason == "stop"
        jsonschema.validate(json.loads(a.text), SCHEMA)
        assert a.tokens == b.tokens


@pytest.mark.slow
def test_drafts_the_grammar_forbids_are_cut_and_the_output_is_unchanged(pairs, tok, monkeypatch):
    """The prompt shows JSON with spaces; the format asks for compact JSON, so n-gram drafts copied from
    the prompt hit forbidden tokens (' "'): they are cut there, and greedy output equals no speculation."""
    from service.engine.grammar import Matcher

    example = json.dumps({"name": "Ann", "role": "guest", "home": {"city": "Oslo", "floor": 1}, "tags": ["red"]})
    p = tuple(tok.encode(f"Example: {example}\nAnother one: ", add_special=False))
    cuts = []
    real = Matcher.valid_prefix

    def spy(self, tokens):
        n = real(self, tokens)
        cuts.append((n, len(tokens)))
        return n
    monkeypatch.setattr(Matcher, "valid_prefix", spy)
    reqs = [GenRequest(p, max_tokens=40, sampling=GREEDY, speculative=SpeculativeConfig(t, n_max=4, n_min=1),
                       response_format=FMT) for t in ("none", "ngram")]
    off, on = run(pairs["ngram"], tok, reqs[:1])[0], run(pairs["ngram"], tok, reqs[1:])[0]
    assert on.tokens == off.tokens
    jsonschema.validate(json.loads(on.text), SCHEMA)
    assert any(n < k for n, k in cuts), f"no draft was cut: {cuts}"
    assert on.drafted > 0


@pytest.mark.slow
def test_free_text_beside_constrained_requests_is_unchanged(pairs, tok):
    """The mask touches only its own slot's rows: a free-text request batched with constrained ones gives
    the tokens it gives alone (the backend is batch invariant)."""
    free = GenRequest(prompt(tok, 3), max_tokens=24, sampling=GREEDY, speculative=SpeculativeConfig("ngram", n_max=4))
    alone = run(pairs["ngram"], tok, [free])[0]
    mixed = run(pairs["ngram"], tok, [free] + [GenRequest(prompt(tok, i), max_tokens=24, sampling=GREEDY,
                                                          response_format=FMT) for i in range(3)])
    assert mixed[0].tokens == alone.tokens
    assert all(r.text.startswith('{"name":"') for r in mixed[1:])


@pytest.mark.slow
def test_submit_refuses_an_invalid_schema_before_a_slot_is_taken(pairs, tok):
    eng = Engine(pairs["ngram"], tok, SpeculativeConfig("none")).start()
    try:
        with pytest.raises(InvalidArgument, match="response_format.json_schema: type must be a string"):
            eng.submit(GenRequest(prompt(tok, 0), response_format=ResponseFormat("json_schema", '{"type": 3}')))
        assert eng.stats()["queued"] == 0 and eng.stats()["active_slots"] == 0
        r = eng.submit(GenRequest(prompt(tok, 0), max_tokens=8, sampling=GREEDY,
                                  response_format=ResponseFormat("regex", "(yes|no)!"))).result(timeout=300)
        assert r.text in ("yes!", "no!") and r.finish_reason == "stop"  # complete: stop without waiting for EOS
    finally:
        eng.stop()


@pytest.mark.slow
def test_grpc_response_format_and_its_errors(real_server):
    c = real_server
    r = c.gen.Generate(pb.GenerateRequest(prompt="Is the sky blue? Answer:", max_tokens=12,
                                          sampling=pb.SamplingParams(temperature=0),
                                          response_format=pb.ResponseFormat(regex=" ?(yes|no)\\.")), timeout=120)
    assert r.text.strip() in ("yes.", "no.") and r.finish_reason == pb.FINISH_REASON_STOP
    r = c.gen.Generate(pb.GenerateRequest(prompt="A JSON object:", max_tokens=16, sampling=pb.SamplingParams(
        temperature=0), response_format=pb.ResponseFormat(json_schema='{"enum": [{"a": 1}, [true]]}')), timeout=120)
    assert json.loads(r.text) in ({"a": 1}, [True])
    with pytest.raises(grpc.RpcError) as e:
        c.gen.Generate(pb.GenerateRequest(prompt="x", response_format=pb.ResponseFormat(lark="start: nope")),
                       timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown name" in e.value.details()
    r = c.gen.Generate(pb.GenerateRequest(prompt="The capital of France is", max_tokens=8, sampling=pb.SamplingParams(
        temperature=0)), timeout=120)
    assert "Paris" in r.text  # the server keeps serving


# ---- the CLI flags ----

def test_cli_format_flags(tmp_path, capsys):
    from service import cli
    from service.cli.flags import response_format

    def fmt(*argv):
        return response_format(cli.build_parser().parse_args(["generate", "hi", *argv]))

    schema = tmp_path / "user.schema.json"
    schema.write_text(json.dumps(SCHEMA))
    (tmp_path / "g.lark").write_text('start: "a"')
    (tmp_path / "g.gbnf").write_text('root ::= "a"')
    (tmp_path / "g.txt").write_text('root ::= "a"')
    assert fmt() is None
    assert fmt("--json-object") == ResponseFormat("json_object")
    assert fmt("--json-schema", str(schema)) == FMT
    assert fmt("--regex", "[0-9]+") == ResponseFormat("regex", "[0-9]+")
    assert fmt("--grammar", str(tmp_path / "g.lark")) == ResponseFormat("lark", 'start: "a"')
    assert fmt("--grammar", str(tmp_path / "g.gbnf")) == ResponseFormat("gbnf", 'root ::= "a"')
    assert fmt("--grammar", str(tmp_path / "g.txt"), "--grammar-syntax", "gbnf").kind == "gbnf"
    with pytest.raises(InvalidArgument, match="--grammar-syntax"):
        fmt("--grammar", str(tmp_path / "g.txt"))
    with pytest.raises(InvalidArgument, match="--json-schema"):
        fmt("--json-schema", str(tmp_path / "missing.json"))
    with pytest.raises(SystemExit):  # at most one format
        fmt("--json-object", "--regex", "x")
    capsys.readouterr()
