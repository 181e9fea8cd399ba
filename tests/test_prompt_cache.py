"""Prompt reuse (service/engine/prompt_cache.py) and cross-request drafting
(service/engine/spec/ngram_index.py): a cache hit is bit-identical to a cold run (KV cells, logits,
tokens; seeded samples too), the store serves a conversation evicted from its slot, evicts within its
planned blocks, and the n-gram index drafts a repeated answer."""

from __future__ import annotations

from dataclasses import replace

import grpc
import numpy as np
import pytest

from compute.backend import BufferSpec
from compute.llama import Batch
from compute.numpy_backend import NumpyBackend
from service.common.tokenizer import Tokenizer
from service.engine.engine import Engine
from service.engine.prompt_cache import common_prefix
from service.engine.request import GenRequest, SamplingParams
from service.engine.spec.ngram_index import SEP, NgramIndex
from service.fit.cache_layout import BLOCK_TOKENS, kv_token_bytes
from service.fit.factory import PairFactory, PairRequest
from service.fit.params import ContextParams, SpeculativeConfig
from service.pb.specserve.v1 import specserve_pb2 as pb
from tests.conftest import TINY, start_server, stop_server, tiny_config
from tests.ggml_backend import make_ggml
from tests.test_speculative import write_truncated_copy
from tests.tiny_gguf import write_tiny_llama

BACKENDS = ["numpy", "ggml"]
try:  # the OpenCL backend's copies (rectangular buffer copies) too, when PyOpenCL finds a device
    from compute.opencl.backend import OpenCLBackend
    from tests.opencl_runtimes import usable_device

    OPENCL_DEVICE = usable_device()
    if OPENCL_DEVICE is not None:
        BACKENDS.append("opencl")
except Exception:  # noqa: BLE001 - no OpenCL runtime: numpy only
    pass

GREEDY = SamplingParams(temperature=0.0)
SPECS = [SpeculativeConfig("none"), SpeculativeConfig("ngram", n_max=4), SpeculativeConfig("draft", n_max=4, p_min=0.0)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("pc")
    target = write_tiny_llama(d / "t.gguf", n_layer=3, seed=21, n_ctx_train=1024, scale=3.0)
    return target, write_truncated_copy(target, d / "d.gguf", n_layer=1)


@pytest.fixture(scope="module")
def windowed_models(tmp_path_factory):
    """A gemma3 target with a window of 8 (layers 0 and 1 local: rings of 8 + n_batch cells), and its
    first layer as the draft (a windowed draft too): the prompts below are many windows long."""
    d = tmp_path_factory.mktemp("pcw")
    target = write_tiny_llama(d / "t.gguf", arch="gemma3", head_dim=16, n_layer=3, seed=21, n_ctx_train=1024,
                              scale=3.0, sliding_window=8, swa_pattern=3)
    return target, write_truncated_copy(target, d / "d.gguf", n_layer=1)


def models_of(request, arch):
    return request.getfixturevalue("models" if arch == "llama" else "windowed_models")


def load(models, n_parallel=2, n_ctx_slot=512, n_batch=32, n_max=4, backend="numpy", **params):
    """A pair (target + draft) on a batch-invariant backend (NumPy row_tile 8, or OpenCL), its tokenizer
    and backend."""
    be = {"numpy": lambda: NumpyBackend(n_threads=1, row_tile=8), "ggml": make_ggml,
          "opencl": lambda: OpenCLBackend(device=OPENCL_DEVICE)}[backend]()
    pair = PairFactory(be, device_memory_bytes=1 << 34).load(PairRequest(
        target_path=models[0], draft_path=models[1],
        params=ContextParams(n_ctx=n_parallel * n_ctx_slot, n_parallel=n_parallel, n_batch=n_batch, **params),
        speculative=SpeculativeConfig("draft", n_max=n_max)))
    return pair, Tokenizer.from_gguf(pair.target.file.reader), be


def run(eng, prompt, spec=None, max_tokens=24, sampling=GREEDY, **kw):
    return eng.submit(GenRequest(tuple(prompt), max_tokens=max_tokens, sampling=sampling, speculative=spec,
                                 **kw)).result(timeout=120)


def slot_of(eng, tokens, other_than=None):
    """The slot whose tokens are `tokens` (its request just finished)."""
    (s,) = [s for s in eng.scheduler.slots if s.tokens == list(tokens) and s is not other_than]
    return s


def cells(ctx, slot, n):
    return [ctx.read_kv(layer, slot, n) for layer in range(ctx.hp.n_layer)]


def assert_same_cells(a, b):
    for (k1, v1), (k2, v2) in zip(a, b):
        np.testing.assert_array_equal(k1, k2)
        np.testing.assert_array_equal(v1, v2)


def next_logits(ctx, slot, seq, n):
    """Logits of decoding seq[n] at position n in `slot` over its cells 0..n-1."""
    return ctx.decode(Batch.make([seq[n]], [n], [slot], [0]))


PROMPT = list(range(5, 90))
FOLLOW = [7, 8, 9, 31, 32]


@pytest.mark.parametrize("arch", ["llama", "windowed"])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.type)
def test_a_follow_up_reuses_the_slot_and_is_bit_identical_to_a_cold_run(request, arch, spec):
    """Turn 2 of a conversation keeps turn 1's cells; its tokens, its target and draft KV cells and the
    logits they give equal those of the same prompt prefilled from nothing in another slot. Windowed:
    the prompt is ~10 windows long, so the local layers' rings wrapped many times before the reuse."""
    pair, tok, _ = load(models_of(request, arch), n_batch=16 if arch == "windowed" else 32)
    eng = Engine(pair, tok, spec).start()
    try:
        first = run(eng, PROMPT, spec)
        turn2 = PROMPT + list(first.tokens) + FOLLOW
        hit = run(eng, turn2, spec)
        hit_slot = slot_of(eng, turn2 + list(hit.tokens))
        cold = run(eng, turn2, spec, cache_prompt=False)  # the other slot is the least recently used
        cold_slot = slot_of(eng, turn2 + list(cold.tokens), other_than=hit_slot)
    finally:
        eng.stop()
    assert first.cached_prompt_tokens == 0 and cold.cached_prompt_tokens == 0
    assert hit.cached_prompt_tokens == len(PROMPT) + len(first.tokens) - 1  # the last generated token was never fed
    assert hit_slot.idx != cold_slot.idx
    assert hit.tokens == cold.tokens and len(hit.tokens) > 0
    seq = turn2 + list(hit.tokens)
    n = min(hit_slot.n_past, cold_slot.n_past)
    assert n >= len(turn2)
    assert_same_cells(cells(pair.target.context, hit_slot.idx, n), cells(pair.target.context, cold_slot.idx, n))
    if spec.type == "draft":
        nd = min(eng.drafter.valid[hit_slot.idx], eng.drafter.valid[cold_slot.idx])
        assert nd >= len(turn2)
        assert_same_cells(cells(pair.draft.context, hit_slot.idx, nd), cells(pair.draft.context, cold_slot.idx, nd))
    np.testing.assert_array_equal(next_logits(pair.target.context, hit_slot.idx, seq, n),
                                  next_logits(pair.target.context, cold_slot.idx, seq, n))
    stats = eng.prefix.stats()
    assert (stats["hits"], stats["misses"]) == (1, 1) and stats["cached_tokens"] == hit.cached_prompt_tokens


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.type)
def test_seeded_sampling_is_identical_with_a_cache_hit(models, spec):
    pair, tok, _ = load(models)
    eng = Engine(pair, tok, spec).start()
    sp = SamplingParams(temperature=0.9, seed=1234)
    try:
        first = run(eng, PROMPT, spec, sampling=sp)
        turn2 = PROMPT + list(first.tokens) + FOLLOW
        hit = run(eng, turn2, spec, sampling=sp, max_tokens=40)
        cold = run(eng, turn2, spec, sampling=sp, max_tokens=40, cache_prompt=False)
    finally:
        eng.stop()
    assert hit.cached_prompt_tokens > len(PROMPT) and cold.cached_prompt_tokens == 0
    assert hit.tokens == cold.tokens and len(hit.tokens) > 0


@pytest.mark.parametrize("arch", ["llama", "windowed"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_store_serves_a_conversation_its_slot_lost(request, arch, backend):
    """One slot, two conversations alternating: each evicts the other from the slot, the store keeps
    both, and every later turn restores its prefix (target and draft cells) bit for bit. Windowed: the
    store keeps the cells of the local layers' last ring, and a restore puts them back in the ring."""
    pair, tok, be = load(models_of(request, arch), n_parallel=1, n_ctx_slot=1024, backend=backend,
                         n_batch=16 if arch == "windowed" else 32)
    spec = SpeculativeConfig("draft", n_max=4, p_min=0.0)
    eng = Engine(pair, tok, spec).start()
    ledger = be.ledger.snapshot()
    convs = {"a": list(range(5, 70)), "b": list(range(100, 180))}
    try:
        results = []
        for turn in range(3):
            for name in ("a", "b"):
                r = run(eng, convs[name], spec)
                results.append((turn, r))
                convs[name] = convs[name] + list(r.tokens) + [11 + turn, 12]
        ref = run(eng, convs["a"], spec, cache_prompt=False)  # a cold run of conversation a's next turn
        hit = run(eng, convs["a"], spec)
        seq = convs["a"] + list(hit.tokens)
        n = eng.scheduler.slots[0].n_past
        got = cells(pair.target.context, 0, n)
        nd = eng.drafter.valid[0]
        got_draft = cells(pair.draft.context, 0, nd)
        run(eng, convs["a"], spec, cache_prompt=False)  # the same again from nothing, in the same slot
        assert eng.scheduler.slots[0].tokens == seq
        assert_same_cells(got, cells(pair.target.context, 0, n))
        assert_same_cells(got_draft, cells(pair.draft.context, 0, nd))
        stats = eng.prefix.stats()
    finally:
        eng.stop()
    assert all(r.cached_prompt_tokens == 0 for turn, r in results if turn == 0)
    assert all(r.cached_prompt_tokens > 60 for turn, r in results if turn > 0)  # from the store
    assert hit.tokens == ref.tokens and hit.cached_prompt_tokens > 100
    assert stats["entries"] >= 1 and stats["used_bytes"] > 0 and stats["evictions"] == 0
    assert be.ledger.snapshot() == ledger  # serving allocated nothing


def test_the_store_evicts_the_least_recently_used_within_its_blocks(models):
    pair, tok, be = load(models, n_parallel=1, n_ctx_slot=1024, prompt_cache_bytes=0)
    token_bytes = kv_token_bytes(pair.target.file.hparams, "f16") + kv_token_bytes(pair.draft.file.hparams, "f16")
    pair.release()
    pair, tok, be = load(models, n_parallel=1, n_ctx_slot=1024, prompt_cache_bytes=2 * BLOCK_TOKENS * token_bytes + 5)
    store = [s for s in pair.allocated() if s.kind == "prompt_cache"]
    assert sum(s.nbytes for s in store) == 2 * BLOCK_TOKENS * token_bytes  # whole blocks, target and draft
    eng = Engine(pair, tok, SpeculativeConfig("ngram", n_max=4)).start()
    ledger = be.ledger.snapshot()
    prompts = [list(range(10 * i + 3, 10 * i + 100)) for i in range(4)]  # 97 tokens: one block each
    try:
        for p in prompts:
            run(eng, p, max_tokens=4)
        stats = eng.prefix.stats()
        # prompts 0..2 went to the store as the next took the slot; two blocks hold two: 0 was evicted
        assert stats["entries"] == 2 and stats["evictions"] == 1
        # 1 is found first, then the slot's 3 is saved: it evicts 2, the least recently used, never 1
        assert run(eng, prompts[1], max_tokens=4).cached_prompt_tokens == len(prompts[1]) - 1
        assert run(eng, prompts[2], max_tokens=4).cached_prompt_tokens == 0
        assert run(eng, prompts[0], max_tokens=4).cached_prompt_tokens == 0
        assert run(eng, prompts[2], max_tokens=4).cached_prompt_tokens == len(prompts[2]) - 1
        assert eng.prefix.stats()["evictions"] == 4
    finally:
        eng.stop()
    assert be.ledger.snapshot() == ledger


def test_cache_prompt_false_neither_reuses_nor_leaves_a_state(models):
    pair, tok, _ = load(models, n_parallel=1)
    eng = Engine(pair, tok, SpeculativeConfig("none")).start()
    other, third = list(range(200, 260)), list(range(150, 190))
    try:
        a = run(eng, PROMPT, cache_prompt=False)
        b = run(eng, PROMPT)  # a left nothing in the slot
        c = run(eng, PROMPT)  # b did
        d = run(eng, other, cache_prompt=False)  # c's state goes to the store as d takes the slot
        e = run(eng, third)  # d's state is not kept
        f = run(eng, other)
        g = run(eng, PROMPT)  # from the store
    finally:
        eng.stop()
    assert a.cached_prompt_tokens == b.cached_prompt_tokens == d.cached_prompt_tokens == 0
    assert c.cached_prompt_tokens == g.cached_prompt_tokens == len(PROMPT) - 1
    assert e.cached_prompt_tokens == f.cached_prompt_tokens == 0
    assert d.tokens == f.tokens and a.tokens == b.tokens == c.tokens == g.tokens


def test_the_same_request_twice_drafts_from_the_first_ones_output(models):
    pair, tok, _ = load(models, n_max=8)
    spec = SpeculativeConfig("ngram", n_max=8)
    eng = Engine(pair, tok, spec).start()
    prompt = list(range(210, 250))
    try:
        hidden = run(eng, prompt, spec, max_tokens=64, cache_prompt=False)  # opted out: not indexed either
        first = run(eng, prompt, spec, max_tokens=64)
        second = run(eng, prompt, spec, max_tokens=64)
        seeded = [run(eng, prompt, spec, max_tokens=64, sampling=SamplingParams(temperature=0.8, seed=5))
                  for _ in range(2)]
    finally:
        eng.stop()
    assert second.tokens == first.tokens == hidden.tokens and len(first.tokens) == 64
    assert first.accepted == hidden.accepted
    assert second.accepted >= 0.8 * 63 and second.accepted > 2 * first.accepted
    assert seeded[0].tokens == seeded[1].tokens  # a seeded request drafts from its own tokens only


def test_the_ngram_index_ring():
    ring = np.zeros(16, np.int32)
    idx = NgramIndex(ring)
    assert (ring == SEP).all() and idx.match([1, 2], 4, 2) == (0, [])
    idx.add([1, 2, 3, 4, 5])
    assert idx.match([9, 1, 2], 4, 2) == (2, [3, 4, 5])  # stops at the separator
    assert idx.match([9, 2], 4, 2) == (0, [])  # shorter than ngram_min
    idx.add([7, 1, 2, 8, 8])
    assert idx.match([1, 2], 4, 2) == (2, [8, 8])  # the most recent occurrence
    assert idx.match([7, 1, 2], 1, 2) == (3, [8])  # the longest suffix
    idx.add(list(range(20, 30)))  # wraps: overwrites the oldest record
    assert idx.head == (6 + 6 + 11) % 16
    assert idx.match([1, 2], 4, 2) == (2, [8, 8]) and idx.match([3, 4], 4, 2) == (0, [])
    idx.add(list(range(100, 140)))  # longer than the ring: its last 15 tokens
    assert idx.match([125, 126], 3, 2) == (2, [127, 128, 129]) and idx.match([138, 139], 3, 2) == (0, [])


def test_common_prefix():
    assert common_prefix([], [1]) == 0 and common_prefix([1, 2, 3], [1, 2, 3, 4]) == 3
    assert common_prefix([1, 2, 3], [1, 5, 3]) == 1 and common_prefix((4, 5), [4, 5]) == 2


@pytest.mark.skipif("opencl" not in BACKENDS, reason="no OpenCL device")
def test_opencl_store_copies_equal_numpys():
    """kv_to_store / kv_from_store on OpenCL (rectangular copies) move the cells NumPy's slicing does."""
    import pyopencl as cl

    be = OpenCLBackend(device=OPENCL_DEVICE)
    rng = np.random.default_rng(0)
    L, S, C, E, NB, B = 3, 2, 40, 8, 3, 16
    cache_lay = {"cache": ((L, S, C, E), "f16")}
    store_lay = {"k": ((NB, L, B, E), "f16"), "v": ((NB, L, B, E), "f16")}
    cache = be.allocate("t", BufferSpec("target", "kv_cache", "k", "device", L * S * C * E * 2), cache_lay)
    store = be.allocate("t", BufferSpec("target", "prompt_cache", "store", "device", 2 * NB * L * B * E * 2), store_lay)
    host = rng.standard_normal((L, S, C, E)).astype(np.float16)
    c, sk = cache.array["cache"], store.array["k"]
    cl.enqueue_copy(be.queue, c.buf, host, dst_offset=c.off * 2, is_blocking=True)
    ref_store = np.zeros((NB, L, B, E), np.float16)
    for block, (slot, start, off, n) in enumerate([(1, 5, 0, 16), (0, 20, 3, 9), (1, 30, 10, 6)]):
        be.kv_to_store(c, slot, start, sk, block, off, n)
        ref_store[block, :, off:off + n] = host[:, slot, start:start + n]
    got = np.empty(NB * L * B * E, np.float16)
    cl.enqueue_copy(be.queue, got, sk.buf, src_offset=sk.off * 2, is_blocking=True)
    np.testing.assert_array_equal(got.reshape(NB, L, B, E), ref_store)
    be.kv_from_store(c, 0, 2, sk, 0, 4, 12)  # block 0 cells 4..15 into slot 0 cells 2..13
    host[:, 0, 2:14] = ref_store[0, :, 4:16]
    for layer in range(L):
        k, _ = be.kv_read(c, c, layer, 0, C)
        np.testing.assert_array_equal(k, host[layer, 0].astype(np.float32))
    be.release(store)
    be.release(cache)


# ---- over gRPC: usage, ListPairs, metrics, the operator's limit, Unload ----

def test_the_cache_over_grpc(tiny_models_dir):
    cfg = tiny_config(tiny_models_dir, startup=False, metrics_port=0)  # the operator's cache sizes:
    c = start_server(replace(cfg, params=replace(cfg.params, prompt_cache_bytes=4 << 20, ngram_cache_tokens=4096)))
    try:
        spec = pb.PairSpec(name="pc", target_path=TINY, params=pb.ContextParams(n_ctx=512, n_parallel=1, n_batch=32))
        loaded = c.model.Load(pb.LoadRequest(pair=spec), timeout=60)
        kinds = {b.kind: b.bytes for b in loaded.allocated}
        assert 0 < kinds["prompt_cache"] <= 4 << 20 and kinds["ngram_cache"] == 4 * 4096
        greedy = dict(pair="pc", max_tokens=8, sampling=pb.SamplingParams(temperature=0))
        convs = ["The cat sat on the mat and looked at the garden for a long while. " * 3,
                 "A ship sailed across the grey sea towards the harbour lights. " * 3]
        first = [c.gen.Generate(pb.GenerateRequest(prompt=p, **greedy), timeout=30) for p in convs]
        again = [c.gen.Generate(pb.GenerateRequest(prompt=p, **greedy), timeout=30) for p in convs]
        opted = c.gen.Generate(pb.GenerateRequest(prompt=convs[1], cache_prompt=False, **greedy), timeout=30)
        assert [r.usage.cached_prompt_tokens for r in first] == [0, 0]
        for f, a in zip(first, again):  # the store gave each its prefix back on the one slot
            assert a.usage.cached_prompt_tokens == a.usage.prompt_tokens - 1 and a.tokens == f.tokens
        assert opted.usage.cached_prompt_tokens == 0 and opted.tokens == first[1].tokens
        stats = c.pair_info("pc").prompt_cache
        assert (stats.hits, stats.misses) == (2, 2) and stats.evictions == 0  # the opted-out one is neither
        assert stats.capacity_bytes == kinds["prompt_cache"] and 0 < stats.used_bytes <= stats.capacity_bytes
        assert stats.entries == 2 and stats.cached_tokens == sum(a.usage.cached_prompt_tokens for a in again)
        m = c.server.metrics
        assert m.value("specserve_prompt_cache_hits_total", pair="pc") == 2
        assert m.value("specserve_prompt_cache_misses_total", pair="pc") == 2
        assert m.value("specserve_prompt_cache_tokens_total", pair="pc") == stats.cached_tokens
        assert m.value("specserve_prompt_cache_used_bytes", pair="pc") == stats.used_bytes
        assert m.value("specserve_prompt_cache_capacity_bytes", pair="pc") == stats.capacity_bytes
        # a client may lower the operator's sizes, never raise them
        for field, value in (("prompt_cache_bytes", 8 << 20), ("ngram_cache_tokens", 8192)):
            big = pb.PairSpec(name="big", target_path=TINY, params=pb.ContextParams(**{field: value}))
            try:
                c.model.Fit(pb.FitRequest(pair=big), timeout=30)
                raise AssertionError("a client raised the operator's cache size")
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and field in e.details()
        none = c.model.Fit(pb.FitRequest(pair=pb.PairSpec(
            name="none", target_path=TINY, params=pb.ContextParams(prompt_cache_bytes=0, ngram_cache_tokens=0))),
            timeout=30)
        assert not [b for b in none.plan.buffers if b.kind in ("prompt_cache", "ngram_cache")]
        assert none.plan.target.prompt_cache_bytes == 0 and none.plan.target.HasField("prompt_cache_bytes")
        released = c.model.Unload(pb.UnloadRequest(name="pc"), timeout=30).released_bytes
        assert released == sum(b.bytes for b in loaded.allocated)
        assert c.server.registry.factory.backend.ledger.entries() == []
    finally:
        stop_server(c)


def test_a_cache_hit_on_the_real_model_is_bit_identical(real_model):
    """The packaged SmolLM2 on the default NumPy backend: a follow-up turn that reuses the first turn's
    cells gives the cold run's tokens and KV cells."""
    be = NumpyBackend(n_threads=1)
    pair = PairFactory(be, device_memory_bytes=1 << 34).load(PairRequest(
        target_path=real_model, params=ContextParams(n_ctx=2 * 256, n_parallel=2, n_batch=64,
                                                     prompt_cache_bytes=16 << 20),
        speculative=SpeculativeConfig("ngram", n_max=4)))
    tok = Tokenizer.from_gguf(pair.target.file.reader)
    spec = SpeculativeConfig("ngram", n_max=4)
    eng = Engine(pair, tok, spec).start()
    chat = [{"role": "user", "content": "Name three colours of the rainbow."}]
    try:
        first = run(eng, tok.encode(tok.apply_chat_template(chat), add_special=False), spec, max_tokens=16)
        chat += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And two more?"}]
        turn2 = tok.encode(tok.apply_chat_template(chat), add_special=False)
        hit = run(eng, turn2, spec, max_tokens=16)
        hit_slot = slot_of(eng, list(turn2) + list(hit.tokens))
        cold = run(eng, turn2, spec, max_tokens=16, cache_prompt=False)
        cold_slot = slot_of(eng, list(turn2) + list(cold.tokens), other_than=hit_slot)
    finally:
        eng.stop()
    try:
        assert hit.cached_prompt_tokens > 20 and cold.cached_prompt_tokens == 0
        assert hit.tokens == cold.tokens and len(hit.tokens) > 0
        n = min(hit_slot.n_past, cold_slot.n_past)
        ctx = pair.target.context
        assert_same_cells(cells(ctx, hit_slot.idx, n), cells(ctx, cold_slot.idx, n))
    finally:
        pair.release()
