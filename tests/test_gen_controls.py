"""Generation controls on tiny models: logprobs, prompt scoring, n completions of one prompt.

The real-model acceptance checks (64 greedy tokens with top-5 logprobs, n = 4 at temperature 0.8,
prompt logprobs against a float64 forward) are in tests/test_gen_controls_real.py.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from compute.llama import Batch
from compute.numpy_backend import NumpyBackend
from service.common.errors import InvalidArgument
from service.common.tokenizer import Tokenizer
from service.engine import logprobs as lp
from service.engine.engine import Engine
from service.engine.request import GenRequest, SamplingParams
from service.engine.scheduler import Scheduler
from service.fit.factory import PairFactory, PairRequest
from service.fit.params import ContextParams, SpeculativeConfig
from service.pb.specserve.v1 import specserve_pb2 as pb
from tests.conftest import TINY, TINY_DRAFT
from tests.ggml_backend import ggml_param
from tests.opencl_runtimes import device_params

GREEDY = SamplingParams(temperature=0.0)
PROMPT_TEXT = "the cat sat on the mat and the dog sat on the cat, the mat"


# ---- the distributions ----

def test_top_k_is_most_likely_first_ties_by_token_id():
    v = np.log(np.array([0.1, 0.3, 0.05, 0.3, 0.25]))
    assert [t for t, _ in lp.top_k(v, 3)] == [1, 3, 4]
    assert [t for t, _ in lp.top_k(v, 9)] == [1, 3, 4, 0, 2]
    assert lp.top_k(v, 0) == ()


def test_generated_logprobs_are_after_penalty_and_temperature_before_the_filters():
    logits = np.array([2.0, 1.0, 0.5, -1.0], np.float32)
    sp = SamplingParams(temperature=0.5, top_k=1, repeat_penalty=2.0, repeat_last_n=8)
    got = lp.processed_logprobs(logits, sp, history=[0])
    z = np.array([1.0, 1.0, 0.5, -1.0]) / 0.5  # token 0 penalised (2.0 / 2), then / temperature
    np.testing.assert_allclose(got, z - np.log(np.exp(z).sum()), rtol=1e-12)
    assert np.isfinite(got).all()  # top_k = 1 truncates sampling, not the reported distribution
    greedy = lp.processed_logprobs(logits, GREEDY)  # temperature 0 counts as 1
    np.testing.assert_allclose(greedy, lp.log_softmax(logits), rtol=1e-12)


# ---- the scheduler: scoring rows and n slots ----

def _assign(slot, prompt, **req):
    from service.engine.stream import Stream, TextOutput

    st = Stream(GenRequest(tuple(prompt), **req))
    slot.assign(st, TextOutput(None, ()))
    return st


def test_scoring_prefill_is_cut_to_the_output_rows_and_returns_a_row_per_prompt_token():
    sched = Scheduler(n_slots=2, n_batch=64, n_outputs_max=6)
    a, b = sched.slots
    _assign(a, range(1, 15), prompt_logprobs=0)  # 14 prompt tokens: 13 to score
    _assign(b, range(1, 30))  # plain prefill shares the batch
    fed = []
    while a.n_past < a.n_prompt:
        step = sched.schedule({})
        w = next(w for w in step.work if w.slot is a)
        fed.append((w.n_fed, w.n_scored, w.complete))
        assert len(step.batch.outputs) <= 6
        rows = step.batch.outputs[list(w.score_rows)]  # batch rows of the fed tokens n_past .. n_past+n_scored-1
        assert list(step.batch.positions[rows]) == list(range(a.n_past, a.n_past + w.n_scored))
        for x in step.work:
            x.slot.n_past += x.n_fed
    assert fed == [(6, 6, False), (6, 6, False), (2, 1, True)]  # 13 rows scored, then the first token's row


@settings(max_examples=60, deadline=None)
@given(hs.lists(hs.tuples(hs.integers(1, 40), hs.booleans(), hs.integers(0, 4)), min_size=1, max_size=4),
       hs.integers(4, 48), hs.integers(1, 12))
def test_scoring_plans_stay_within_the_rows_and_score_every_prompt_token(slots, n_batch, n_outputs_max):
    """Random prompts (some scored), drafts and budgets: every step's batch stays within n_batch rows
    and n_outputs_max outputs, and every scored prompt gets exactly one row per token after its first."""
    sched = Scheduler(n_slots=len(slots), n_batch=n_batch, n_outputs_max=n_outputs_max)
    scored = {}
    for slot, (n_prompt, scoring, _) in zip(sched.slots, slots):
        _assign(slot, range(1, n_prompt + 1), prompt_logprobs=0 if scoring else None)
        scored[slot.idx] = []
    for _ in range(200):
        if all(s.n_past >= s.n_prompt for s in sched.slots):
            break
        step = sched.schedule({s.idx: (7,) * slots[s.idx][2] for s in sched.slots if s.n_pending == 1})
        assert len(step.batch) <= n_batch and len(step.batch.outputs) <= n_outputs_max
        for w in step.work:
            rows = step.batch.outputs[list(w.score_rows)]
            scored[w.slot.idx] += step.batch.positions[rows].tolist()
            w.slot.n_past += w.n_fed
    for s, (n_prompt, scoring, _) in zip(sched.slots, slots):
        assert s.n_past == n_prompt  # every prompt went in (progress)
        assert scored[s.idx] == (list(range(n_prompt - 1)) if scoring else [])


def test_admission_gives_n_slots_in_queue_order():
    from service.engine.stream import Stream

    sched = Scheduler(n_slots=3, n_batch=16, n_outputs_max=12)
    first, big, small = (Stream(GenRequest((1, 2), n=n)) for n in (2, 3, 1))
    for st in (first, big, small):
        sched.enqueue(st)
    adm = sched.admit()
    assert [(a.stream, len(a.siblings)) for a in adm.started] == [(first, 1)]
    assert list(sched.waiting) == [big, small]  # small waits behind big although a slot is free
    for a in adm.started:
        for s in (a.slot,) + a.siblings:
            s.stream = a.stream
    assert sched.admit().started == ()


# ---- the engine on tiny models ----

@pytest.fixture(scope="module")
def tiny(tiny_models_dir):
    return str(tiny_models_dir / TINY), str(tiny_models_dir / TINY_DRAFT)


def _engine(backend, tiny, spec: SpeculativeConfig, n_parallel=4, n_batch=32, draft=False, **params):
    pair = PairFactory(backend, device_memory_bytes=1 << 32).load(PairRequest(
        name="t", target_path=tiny[0], draft_path=tiny[1] if draft else "",
        params=ContextParams(n_ctx=n_parallel * 256, n_parallel=n_parallel, n_batch=n_batch, **params),
        speculative=spec))
    tok = Tokenizer.from_gguf(pair.target.file.reader)
    return Engine(pair, tok, spec).start(), pair, tok


def _close(eng, pair):
    eng.stop()
    pair.release()


def _backends():
    return [pytest.param(lambda: NumpyBackend(n_threads=1, row_tile=8), id="numpy"), ggml_param()] + [
        pytest.param(lambda d=p.values[0]: _opencl(d), id=f"opencl-{p.id}", marks=(*p.marks, pytest.mark.opencl))
        for p in device_params()]


def _opencl(device):
    from compute.opencl.backend import OpenCLBackend

    return OpenCLBackend(device=device)


@pytest.mark.parametrize("make_backend", _backends())
def test_greedy_logprobs_with_speculation_equal_without_bit_for_bit(tiny, make_backend):
    """Tokens and top-5 logprobs from verify rows (n-gram and draft model) equal one-token steps'."""
    eng, pair, tok = _engine(make_backend(), tiny, SpeculativeConfig("draft", n_max=3, p_min=0.0), draft=True)
    try:
        prompt = tuple(tok.encode(PROMPT_TEXT))
        runs = {}
        for name, spec in [("off", SpeculativeConfig("none")), ("ngram", SpeculativeConfig("ngram", n_max=3)),
                           ("draft", SpeculativeConfig("draft", n_max=3, p_min=0.0))]:
            runs[name] = eng.submit(GenRequest(prompt, max_tokens=40, sampling=GREEDY, speculative=spec,
                                               logprobs=5)).result(120)
        off = runs.pop("off")
        assert len(off.logprobs) == len(off.tokens) > 0
        assert [e.token for e in off.logprobs] == list(off.tokens)
        assert all(len(e.top) == 5 and e.top[0][1] == e.logprob for e in off.logprobs)  # greedy: the argmax
        for name, r in runs.items():
            assert r.drafted > 0 and r.accepted > 0, name
            assert r.tokens == off.tokens and r.logprobs == off.logprobs, name  # floats compared exactly
    finally:
        _close(eng, pair)


def test_prompt_logprobs_in_chunks_equal_one_forward_pass(tiny):
    """Scored in chunks of 6 output rows (3 slots x (n_max 1 + 1)), or by a pair planned with 64 output
    rows, every prompt row's logprobs equal the rows of one forward pass over the whole prompt, bit for
    bit (the backend is batch invariant)."""
    got = {}
    for rows in (0, 64):  # 0: derived, 6
        be = NumpyBackend(n_threads=1, row_tile=1)
        eng, pair, tok = _engine(be, tiny, SpeculativeConfig("ngram", n_max=1), n_parallel=3, n_batch=64,
                                 n_outputs_max=rows)
        try:
            assert eng.n_outputs_max == (rows or 6)
            prompt = tuple(tok.encode(PROMPT_TEXT))
            r = eng.submit(GenRequest(prompt, max_tokens=3, sampling=GREEDY, prompt_logprobs=4)).result(60)
            assert [e.token for e in r.prompt_logprobs] == list(prompt) and len(r.tokens) == 3
            assert r.prompt_logprobs[0] == lp.first_prompt_token(prompt[0])
            scored_only = eng.submit(GenRequest(prompt, max_tokens=0, prompt_logprobs=4)).result(60)
            assert scored_only.tokens == () and scored_only.finish_reason == "length"
            assert scored_only.prompt_logprobs == r.prompt_logprobs
            got[rows] = r.prompt_logprobs
        finally:
            eng.stop()
        if rows:
            n = len(prompt)
            logits = pair.target.context.decode(Batch.make(prompt, range(n), [0] * n, range(n)))
            assert list(got[rows][1:]) == lp.prompt(logits, range(n - 1), prompt[1:], 4)
        pair.release()
    assert got[0] == got[64]


@pytest.mark.parametrize("make_backend", _backends())
def test_kv_copy_between_slots(tiny, make_backend):
    """Cells copied from one slot to another hold the same K and V, and the next token decodes the same
    in both; the cells past n and the other slots are untouched."""
    pair = PairFactory(make_backend(), device_memory_bytes=1 << 32).load(PairRequest(
        name="t", target_path=tiny[0], params=ContextParams(n_ctx=3 * 64, n_parallel=3, n_batch=32),
        speculative=SpeculativeConfig("none")))
    try:
        ctx = pair.target.context
        ctx.decode(Batch.make([5, 9, 31, 7, 2], range(5), [0] * 5, []))
        ctx.decode(Batch.make([3, 4, 8], range(3), [1] * 3, []))
        before = [ctx.read_kv(layer, 1, 3) for layer in range(ctx.hp.n_layer)]
        ctx.copy_cells(0, 2, 4)
        for layer in range(ctx.hp.n_layer):
            assert all(np.array_equal(a, b) for a, b in zip(ctx.read_kv(layer, 0, 4), ctx.read_kv(layer, 2, 4)))
            assert all(np.array_equal(a, b) for a, b in zip(ctx.read_kv(layer, 1, 3), before[layer]))
            assert not np.array_equal(ctx.read_kv(layer, 2, 5)[0][4], ctx.read_kv(layer, 0, 5)[0][4])
        a = ctx.decode(Batch.make([11], [4], [0], [0]))
        b = ctx.decode(Batch.make([11], [4], [2], [0]))
        assert np.array_equal(a, b)
    finally:
        pair.release()


@pytest.mark.parametrize("make_backend", _backends())
def test_n_completions_prefilled_once_different_and_reproducible(tiny, make_backend):
    be = make_backend()
    eng, pair, tok = _engine(be, tiny, SpeculativeConfig("draft", n_max=3, p_min=0.0), draft=True)
    fed = {"target": [], "draft": []}  # (slot, position) of every row each model is fed
    for name, ctx in (("target", pair.target.context), ("draft", pair.draft.context)):
        decode = ctx.decode

        def counting(batch, decode=decode, rows=fed[name]):
            rows += zip(batch.slots.tolist(), batch.positions.tolist())
            return decode(batch)
        ctx.decode = counting
    try:
        prompt = tuple(tok.encode(PROMPT_TEXT))
        sampling = SamplingParams(temperature=0.8, seed=1234)

        def run(n, **kw):
            for rows in fed.values():
                rows.clear()
            st = eng.submit(GenRequest(prompt, max_tokens=16, sampling=sampling, n=n, logprobs=2, **kw))
            deltas = list(st)
            return st.result(60), deltas

        res, deltas = run(4)
        assert [c.index for c in res.choices] == [0, 1, 2, 3]
        texts = [c.tokens for c in res.choices]
        assert len(set(texts)) == 4, texts
        assert res.completion_tokens == sum(len(t) for t in texts) and res.tokens == texts[0]
        assert all(len(c.logprobs) == len(c.tokens) for c in res.choices)
        for i, c in enumerate(res.choices):  # each completion's deltas carry its index and end with its summary
            mine = [d for d in deltas if d.index == i]
            assert tuple(t for d in mine for t in d.tokens) == c.tokens and mine[-1].end == c
        for name, rows in fed.items():  # the prompt went through each model once, in one slot
            prompt_rows = [r for r in rows if r[1] < len(prompt)]
            assert len(prompt_rows) == len(prompt) and len({s for s, _ in prompt_rows}) == 1, name
        again, _ = run(4)
        assert [c.tokens for c in again.choices] == texts  # reproducible with the seed
        off = SpeculativeConfig("none")  # (speculation at temperature > 0 spends the random stream on
        one, four = run(1, speculative=off)[0], run(4, speculative=off)[0]  # drafts a batch may trim)
        assert one.tokens == four.choices[0].tokens  # completion 0 draws from the seed as n = 1 does
        with pytest.raises(InvalidArgument, match="n = 5 completions"):
            eng.submit(GenRequest(prompt, n=5))
    finally:
        _close(eng, pair)


# ---- over gRPC (the session's tiny server: 4 slots, draft-model speculation) ----

def test_generate_logprobs_and_choices_over_grpc(tiny_server):
    c = tiny_server
    r = c.gen.Generate(pb.GenerateRequest(prompt="the cat", max_tokens=12, sampling=pb.SamplingParams(temperature=0),
                                          logprobs=True, top_logprobs=3, prompt_logprobs=2), timeout=60)
    assert len(r.logprobs) == len(r.tokens) > 0
    for e, t in zip(r.logprobs, r.tokens):
        assert e.token == t and len(e.top) == 3 and e.top[0].logprob >= e.logprob
        assert e.bytes and e.text == e.bytes.decode("utf-8", errors="replace")
    prompt = c.gen.Tokenize(pb.TokenizeRequest(text="the cat", add_special=True), timeout=10).tokens
    assert [e.token for e in r.prompt_logprobs] == list(prompt) and r.prompt_logprobs[0].logprob == 0
    assert all(len(e.top) == 2 for e in r.prompt_logprobs[1:])
    assert len(r.choices) == 1 and r.choices[0].tokens == r.tokens and r.choices[0].logprobs == r.logprobs
    bare = c.gen.Generate(pb.GenerateRequest(prompt="the cat", max_tokens=4), timeout=60)
    assert not bare.logprobs and not bare.prompt_logprobs


def test_generate_stream_n_completions_by_index(tiny_server):
    c = tiny_server
    req = pb.GenerateRequest(prompt="the cat", max_tokens=10, n=3, logprobs=True,
                             sampling=pb.SamplingParams(temperature=0.9, seed=7), prompt_logprobs=0)
    unary = c.gen.Generate(req, timeout=60)
    assert [ch.index for ch in unary.choices] == [0, 1, 2] and unary.tokens == unary.choices[0].tokens
    assert unary.usage.completion_tokens == sum(len(ch.tokens) for ch in unary.choices)
    msgs = list(c.gen.GenerateStream(pb.GenerateStreamRequest.FromString(req.SerializeToString()), timeout=60))
    assert msgs[0].prompt_logprobs and not any(m.prompt_logprobs for m in msgs[1:])
    finals = [m for m in msgs if m.finish_reason != pb.FINISH_REASON_UNSPECIFIED]
    assert sorted(m.index for m in finals) == [0, 1, 2] and msgs[-1] in finals
    for ch in unary.choices:  # the same seed: the stream's completions are the unary ones
        mine = [m for m in msgs if m.index == ch.index]
        assert [t for m in mine for t in m.tokens] == list(ch.tokens)
        assert [e.token for m in mine for e in m.logprobs] == list(ch.tokens)
        assert "".join(m.text for m in mine) == ch.text
        assert mine[-1].finish_reason == ch.finish_reason and mine[-1].usage.completion_tokens == len(ch.tokens)


def test_bad_generation_controls_are_invalid_argument(tiny_server):
    c = tiny_server
    for req, words in [(pb.GenerateRequest(prompt="x", n=5), "as many slots"),
                       (pb.GenerateRequest(prompt="x", n=17), "n must be within"),
                       (pb.GenerateRequest(prompt="x", logprobs=True, top_logprobs=21), "top alternatives"),
                       (pb.GenerateRequest(prompt="x", prompt_logprobs=21), "prompt_logprobs")]:
        with pytest.raises(grpc.RpcError) as e:
            c.gen.Generate(req, timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in e.value.details(), req
    assert c.gen.Generate(pb.GenerateRequest(prompt="x", max_tokens=2), timeout=30).usage.completion_tokens <= 2
