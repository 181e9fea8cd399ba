"""Drafters, verification and the engine on tiny models: distribution, rollback, queue, cancellation."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from compute.llama import Batch
from compute.numpy_backend import NumpyBackend
from service.common.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from service.common.tokenizer import Tokenizer
from service.engine.engine import Engine
from service.engine.request import GenRequest, SamplingParams
from service.engine.sampling import logits_to_probs
from service.engine.spec.policy import DraftStats, acceptance, best_k, learn
from service.engine.spec.verify import ngram_match, ngram_propose, verify
from service.fit.factory import PairFactory, PairRequest
from service.fit.params import ContextParams, SpeculativeConfig
from tests.ggml_backend import make_ggml
from tests.tiny_gguf import write_tiny_llama, write_truncated_copy

GREEDY = SamplingParams(temperature=0.0)


# ---- n-gram drafter ----

def test_ngram_proposes_what_followed_the_most_recent_match():
    toks = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    assert ngram_propose(toks, 3, 1, 3) == [7, 8, 5]  # the later "1 2 3" wins
    assert ngram_propose(toks, 1, 1, 3) == [7]


def test_ngram_prefers_the_longest_match_and_honours_ngram_min():
    toks = [4, 5, 6, 0, 6, 1, 5, 6]  # "5 6" was followed by 0; "6" alone last by 1
    assert ngram_propose(toks, 2, 1, 2) == [0, 6]
    assert ngram_propose(toks, 2, 3, 3) == []  # "4 5 6" != "6 5 6": no 3-gram match


def test_ngram_no_match_and_suffix_itself_excluded():
    assert ngram_propose([1, 2, 3, 4], 4, 1, 3) == []
    assert ngram_propose([7, 7], 3, 1, 1) == [7]


def _ngram_by_windows(toks, n_max, lo, hi):
    """The definition, spelt out: for n from hi down to lo, the last earlier n-token window equal to the suffix."""
    for n in range(min(hi, len(toks) - 1), lo - 1, -1):
        starts = [s for s in range(len(toks) - n) if toks[s:s + n] == toks[len(toks) - n:]]
        if starts:
            return n, toks[starts[-1] + n:starts[-1] + n + n_max]
    return 0, []


def test_ngram_match_equals_its_definition_on_random_sequences():
    rng = np.random.default_rng(7)
    for _ in range(400):
        toks = rng.integers(0, int(rng.integers(2, 6)), size=int(rng.integers(0, 40))).tolist()
        lo = int(rng.integers(1, 4))
        hi = lo + int(rng.integers(0, 5))
        k = int(rng.integers(0, 6))
        want = _ngram_by_windows(toks, k, lo, hi) if k > 0 else (0, [])
        assert ngram_match(toks, k, lo, hi) == want, (toks, k, lo, hi)


# ---- verification ----

def test_greedy_verification_accepts_the_agreeing_prefix_then_the_target_token():
    onehot = lambda i: np.eye(6)[i]  # noqa: E731
    rng = np.random.default_rng(0)
    j, out = verify([3, 4, 5], [onehot(3), onehot(4), onehot(1), onehot(2)], None, rng)
    assert (j, out) == (2, [3, 4, 1])
    j, out = verify([3, 4], [onehot(3), onehot(4), onehot(2)], None, rng)
    assert (j, out) == (2, [3, 4, 2])  # all accepted + bonus


def _tv(p, q):
    return 0.5 * np.abs(p - q).sum()


@pytest.mark.parametrize("deterministic_draft", [False, True])
def test_rejection_sampling_reproduces_the_target_distribution(deterministic_draft):
    """The first emitted token's distribution is the target's, whatever the draft (vLLM-style test):
    the total-variation distance to p shrinks with the number of samples and ends below 0.01."""
    rng = np.random.default_rng(1234)
    V = 8
    p = rng.dirichlet(np.ones(V))  # target's next-token distribution
    q = rng.dirichlet(np.ones(V) * 0.5)  # a poor draft distribution
    p2 = rng.dirichlet(np.ones(V))  # target after the draft token (used for the bonus)
    dists = []
    counts = np.zeros(V)
    n_done = 0
    for n in (1_000, 10_000, 100_000):
        while n_done < n:
            if deterministic_draft:
                d = 3
                j, out = verify([d], [p, p2], None, rng)
            else:
                d = int(rng.choice(V, p=q))
                j, out = verify([d], [p, p2], [q], rng)
            counts[out[0]] += 1
            n_done += 1
        dists.append(_tv(counts / n_done, p))
    assert dists[-1] < 0.01, dists
    assert dists[-1] < dists[0], dists


# ---- engine on a tiny model ----

@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("spec")
    target = write_tiny_llama(d / "t.gguf", n_layer=3, seed=11, n_ctx_train=512, scale=3.0)
    draft = write_truncated_copy(target, d / "d.gguf", n_layer=1)
    be = NumpyBackend(n_threads=1, row_tile=8)  # the batch-invariant mode
    f = PairFactory(be, device_memory_bytes=1 << 34)
    pair = f.load(PairRequest(target_path=target, draft_path=draft,
                              params=ContextParams(n_ctx=4 * 128, n_parallel=4, n_batch=64),
                              speculative=SpeculativeConfig("draft", n_max=8)))
    tok = Tokenizer.from_gguf(pair.target.file.reader)
    yield pair, tok, be
    pair.release()


def _run(engine, prompts, spec, max_tokens=40, sampling=GREEDY):
    streams = [engine.submit(GenRequest(tuple(p), max_tokens=max_tokens, sampling=sampling, speculative=spec))
               for p in prompts]
    return [s.result(timeout=120) for s in streams]


PROMPTS = [[5, 6, 7, 8, 9, 10], [100, 101, 102, 100, 101], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 40, 41], [200, 3]]


@pytest.mark.parametrize("spec", [SpeculativeConfig("ngram", n_max=n) for n in (1, 4, 8)]
                         + [SpeculativeConfig("draft", n_max=n, p_min=0.0) for n in (1, 4, 8)],
                         ids=lambda s: f"{s.type}-{s.n_max}")
def test_greedy_speculation_is_lossless_on_tiny_model(tiny_pair, spec):
    pair, tok, _ = tiny_pair
    eng = Engine(pair, tok, SpeculativeConfig("none")).start()
    try:
        ref = _run(eng, PROMPTS, SpeculativeConfig("none"))
        got = _run(eng, PROMPTS, spec)
    finally:
        eng.stop()
    for r, g in zip(ref, got):
        assert g.tokens == r.tokens
    drafted = sum(g.drafted for g in got)
    accepted = sum(g.accepted for g in got)
    assert drafted > 0
    if spec.type == "draft":
        assert accepted < drafted, "the truncated draft should be rejected sometimes"


@pytest.mark.parametrize("backend", ["numpy", "ggml"])
@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
def test_greedy_speculation_is_lossless_with_a_sliding_window(tmp_path, backend, arch):
    """qwen3, and a gemma3 target whose local layers see 8 positions, in rings of 8 + n_batch (6) cells,
    each with its first two layers as the draft: 60 generated tokens wrap the rings many times while verify
    batches of up to 5 rows write ahead and rejected drafts are rolled back; the tokens equal speculation off."""
    target = write_tiny_llama(tmp_path / "t.gguf", arch=arch, head_dim=16, n_layer=3, seed=11, n_ctx_train=512,
                              scale=3.0, sliding_window=8, swa_pattern=3, tied=False)  # tied: it repeats its input
    draft = write_truncated_copy(target, tmp_path / "d.gguf", n_layer=2)
    be = NumpyBackend(n_threads=1, row_tile=8) if backend == "numpy" else make_ggml()
    pair = PairFactory(be, device_memory_bytes=1 << 34).load(PairRequest(
        target_path=target, draft_path=draft, params=ContextParams(n_ctx=128, n_parallel=1, n_batch=6),
        speculative=SpeculativeConfig("draft", n_max=4)))
    assert pair.target.context.k_swa is None if arch == "qwen3" else pair.target.context.k_swa.shape[2] == 14
    eng = Engine(pair, Tokenizer.from_gguf(pair.target.file.reader), SpeculativeConfig("none")).start()
    try:
        ref = _run(eng, PROMPTS, SpeculativeConfig("none"), max_tokens=60)
        got = {spec.type: _run(eng, PROMPTS, spec, max_tokens=60)
               for spec in (SpeculativeConfig("ngram", n_max=4), SpeculativeConfig("draft", n_max=4, p_min=0.0))}
    finally:
        eng.stop()
        pair.release()
    for runs in got.values():
        assert [g.tokens for g in runs] == [r.tokens for r in ref]
    drafted = sum(g.drafted for g in got["draft"])
    assert drafted > sum(g.accepted for g in got["draft"]) > 0  # accepted and rejected drafts both


def test_rollback_leaves_the_cache_a_fresh_run_would_hold(tiny_pair):
    """After speculation with rejections, the slot's KV cells 0..n_past equal a fresh single-batch run."""
    pair, tok, be = tiny_pair
    eng = Engine(pair, tok, SpeculativeConfig("draft", n_max=4, p_min=0.0)).start()
    try:
        (res,) = _run(eng, [PROMPTS[0]], None, max_tokens=30)
    finally:
        eng.stop()
    assert res.drafted > res.accepted  # there were rejections to roll back
    ctx = pair.target.context
    seq = list(PROMPTS[0]) + list(res.tokens)
    n_past = len(seq) - 1  # the last token was sampled, never fed
    got = [ctx.read_kv(layer, 0, n_past) for layer in range(ctx.hp.n_layer)]
    ctx.decode(Batch.make(seq[:n_past], range(n_past), [1] * n_past, [n_past - 1]))  # fresh run in slot 1
    for layer, (k, v) in enumerate(got):
        k2, v2 = ctx.read_kv(layer, 1, n_past)
        np.testing.assert_array_equal(k, k2)
        np.testing.assert_array_equal(v, v2)


def test_sampling_with_a_seed_is_reproducible(tiny_pair):
    pair, tok, _ = tiny_pair
    eng = Engine(pair, tok, SpeculativeConfig("draft", n_max=4, p_min=0.0)).start()
    try:
        s = SamplingParams(temperature=0.9, seed=42)
        a = _run(eng, [PROMPTS[1]], None, sampling=s)[0]
        b = _run(eng, [PROMPTS[1]], None, sampling=s)[0]
    finally:
        eng.stop()
    assert a.tokens == b.tokens and len(a.tokens) > 0


def test_bounded_queue_and_no_slot_leak_after_100_cancellations(tiny_pair):
    pair, tok, _ = tiny_pair
    eng = Engine(pair, tok, SpeculativeConfig("ngram", n_max=4), queue_max=8).start()
    try:
        streams = []
        for i in range(100):
            try:
                st = eng.submit(GenRequest((5, 6, 7, i % 200 + 3), max_tokens=200, sampling=GREEDY))
            except ResourceExhausted:
                continue
            streams.append(st)
            if i % 3 == 0:
                time.sleep(0.002)
            st.cancel()
        rejected = 100 - len(streams)
        for st in streams:
            st.result(timeout=60)
        deadline = time.time() + 10
        while time.time() < deadline and (eng.stats()["active_slots"] or eng.stats()["queued"]):
            time.sleep(0.01)
        assert eng.stats()["active_slots"] == 0 and eng.stats()["queued"] == 0
        assert all(s.result().finish_reason in ("cancelled", "length", "stop") for s in streams)
        # the queue bound holds: with every slot busy, at most queue_max more wait, the rest are refused
        fillers = []
        with pytest.raises(ResourceExhausted, match="queue is full"):
            for _ in range(50):
                fillers.append(eng.submit(GenRequest((5, 6), max_tokens=400, sampling=GREEDY)))
        assert 8 <= len(fillers) <= 4 + 8
        for f in fillers:
            f.cancel()
        for f in fillers:
            f.result(timeout=60)
        deadline = time.time() + 10
        while time.time() < deadline and eng.stats()["active_slots"]:
            time.sleep(0.01)
        assert eng.stats()["active_slots"] == 0
        assert rejected >= 0
    finally:
        eng.stop()


def test_config_validation_against_the_plan(tiny_pair):
    pair, tok, _ = tiny_pair
    eng = Engine(pair, tok, SpeculativeConfig("ngram", n_max=4))
    with pytest.raises(InvalidArgument, match="n_max 9 exceeds 8"):
        eng.set_speculative(SpeculativeConfig("ngram", n_max=9))
    with pytest.raises(InvalidArgument, match="n_min"):
        eng.set_speculative(SpeculativeConfig("ngram", n_max=2, n_min=3))
    assert eng.set_speculative(SpeculativeConfig("draft", n_max=8)).type == "draft"
    eng2 = Engine(_NoDraft(pair), tok, SpeculativeConfig("ngram", n_max=4))
    with pytest.raises(FailedPrecondition):
        eng2.set_speculative(SpeculativeConfig("draft", n_max=2))


class _NoDraft:
    """The same pair seen without its draft model."""

    def __init__(self, pair):
        self.target, self.draft, self.params, self.request = pair.target, None, pair.params, pair.request


def test_prompt_longer_than_the_slot_context_is_refused(tiny_pair):
    pair, tok, _ = tiny_pair
    eng = Engine(pair, tok, SpeculativeConfig("none")).start()
    try:
        with pytest.raises(InvalidArgument, match="at most 127"):
            eng.submit(GenRequest(tuple([5] * 128), max_tokens=4))
        res = eng.submit(GenRequest(tuple([5] * 120), max_tokens=50, sampling=GREEDY)).result(timeout=60)
        assert res.finish_reason == "length" and 120 + len(res.tokens) == 128
    finally:
        eng.stop()


def test_stop_strings_and_streaming_text(tiny_pair):
    pair, tok, _ = tiny_pair
    eng = Engine(pair, tok, SpeculativeConfig("ngram", n_max=4)).start()
    try:
        full = eng.submit(GenRequest(tuple(PROMPTS[2]), max_tokens=30, sampling=GREEDY)).result(timeout=60)
        assert len(full.text) > 4
        stop = full.text[2:4]
        st = eng.submit(GenRequest(tuple(PROMPTS[2]), max_tokens=30, sampling=GREEDY, stop=(stop,)))
        streamed = "".join(d.text for d in st)
        res = st.result()
        assert res.finish_reason == "stop"
        assert res.text == full.text[:full.text.find(stop)] == streamed
    finally:
        eng.stop()


def test_concurrent_requests_are_batched_together(tiny_pair):
    """n_parallel requests run in the same steps: target decode calls < the sum of their tokens."""
    pair, tok, _ = tiny_pair
    ctx = pair.target.context
    calls = {"n": 0}
    orig = ctx.decode

    def counting(batch):
        calls["n"] += 1
        return orig(batch)

    ctx.decode = counting
    eng = Engine(pair, tok, SpeculativeConfig("none")).start()
    try:
        res = _run(eng, PROMPTS, SpeculativeConfig("none"), max_tokens=20)
    finally:
        eng.stop()
        del ctx.decode
    total = sum(len(r.tokens) for r in res)
    assert total >= 40 and calls["n"] < total * 0.6, (calls, total)


def test_draft_probabilities_match_target_when_draft_is_the_target(tiny_pair, tmp_path):
    """Sanity of the draft path: with the target as its own draft, greedy drafts are all accepted."""
    pair, tok, be = tiny_pair
    path = pair.target.file.path
    f = PairFactory(be, device_memory_bytes=1 << 34)
    same = f.load(PairRequest(name="same", target_path=path, draft_path=path,
                              params=ContextParams(n_ctx=256, n_parallel=2, n_batch=32),
                              speculative=SpeculativeConfig("draft", n_max=4)))
    eng = Engine(same, tok, SpeculativeConfig("draft", n_max=4, p_min=0.0)).start()
    try:
        (res,) = _run(eng, [PROMPTS[0]], None, max_tokens=24)
    finally:
        eng.stop()
        same.release()
    assert res.drafted > 0 and res.accepted == res.drafted
    # and logits_to_probs of identical logits are identical distributions
    x = np.random.default_rng(0).standard_normal(50).astype(np.float32)
    np.testing.assert_array_equal(logits_to_probs(x, GREEDY), logits_to_probs(x.copy(), GREEDY))


def test_engine_survives_a_failing_step(tiny_pair):
    pair, tok, _ = tiny_pair
    eng = Engine(pair, tok, SpeculativeConfig("none")).start()
    ctx = pair.target.context
    orig = ctx.decode
    fail = threading.Event()
    fail.set()

    def flaky(batch):
        if fail.is_set():
            fail.clear()
            raise RuntimeError("injected step failure")
        return orig(batch)

    ctx.decode = flaky
    try:
        st = eng.submit(GenRequest((5, 6, 7), max_tokens=5, sampling=GREEDY))
        with pytest.raises(RuntimeError, match="injected"):
            st.result(timeout=30)
        ok = eng.submit(GenRequest((5, 6, 7), max_tokens=5, sampling=GREEDY)).result(timeout=30)
        assert len(ok.tokens) == 5 or ok.finish_reason == "stop"
    finally:
        del ctx.decode
        eng.stop()


def test_draft_length_follows_acceptance_and_backend_cost():
    """The draft policy drafts the k that yields the most expected tokens per unit of cost."""
    s = DraftStats()
    costs = {"tiles": lambda r: float(-(-r // 8)), "per_row": lambda r: float(r),
             "pocl": lambda r: 1.0 if r == 1 else 1.5 * -(-r // 8)}
    k = lambda cost, k_max: best_k(acceptance(s), k_max, costs[cost])  # noqa: E731
    assert k("tiles", 8) == 7  # 7 drafts are free in an 8-row tile; the 8th costs a tile
    assert k("per_row", 8) == 0  # every row costs a decode: drafting never pays
    for _ in range(6):
        s = learn(s, 7, 0)  # all rejected: the estimate falls, drafting stops
    assert k("pocl", 8) == 0
    for _ in range(200):
        s = learn(s, 0, 0)  # idle steps: the estimate returns to the prior, drafting resumes
    assert k("pocl", 8) == 7
    for _ in range(10):
        s = learn(s, 7, 7)  # all accepted
    assert k("pocl", 16) == 7  # 15 drafts would fill two tiles for ~1.8x the tokens: not worth 2x the cost


def test_lossless_with_a_repetition_penalty(tiny_pair):
    """Verify rows see the history their own drafts extend, so penalties match plain decoding."""
    pair, tok, _ = tiny_pair
    sp = SamplingParams(temperature=0.0, repeat_penalty=1.3, repeat_last_n=16)
    eng = Engine(pair, tok, SpeculativeConfig("none")).start()
    try:
        ref = _run(eng, PROMPTS, SpeculativeConfig("none"), sampling=sp)
        got = _run(eng, PROMPTS, SpeculativeConfig("draft", n_max=6, p_min=0.0), sampling=sp)
        plain = _run(eng, PROMPTS, SpeculativeConfig("none"))
    finally:
        eng.stop()
    assert [r.tokens for r in got] == [r.tokens for r in ref]
    assert sum(g.drafted for g in got) > 0
    assert [r.tokens for r in ref] != [r.tokens for r in plain]  # the penalty changed the output
