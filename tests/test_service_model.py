"""ModelService over real gRPC: Fit, Load, Unload, ListPairs, the live speculative config, and their errors."""

from __future__ import annotations

import os
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2

from service.pb.specserve.v1 import specserve_pb2 as pb
from tests.conftest import TINY, TINY_DRAFT, start_server, stop_server, tiny_config

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def code_of(fn, *args, **kw) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        fn(*args, timeout=30, **kw)
    return e.value.code(), e.value.details()


def spec(name="p", target=TINY, draft="", **params) -> pb.PairSpec:
    return pb.PairSpec(name=name, target_path=target, draft_path=draft,
                       params=pb.ContextParams(n_ctx=params.pop("n_ctx", 256), n_parallel=params.pop("n_parallel", 2),
                                               **params))


def buffers(msgs) -> list[tuple]:
    return [(b.owner, b.kind, b.tag, b.device, b.bytes) for b in msgs]


def test_fit_plans_without_allocating_and_load_allocates_exactly_the_plan(empty_server):
    c = empty_server
    before = c.server.backend.ledger.total_bytes()
    fit = c.model.Fit(pb.FitRequest(pair=spec(draft=TINY_DRAFT)), timeout=30)
    assert fit.fits and not fit.adjustments
    assert c.server.backend.ledger.total_bytes() == before  # Fit allocates nothing
    plan = fit.plan
    assert plan.total_bytes == sum(b.bytes for b in plan.buffers) == plan.device_bytes + plan.host_bytes
    assert {b.owner for b in plan.buffers} == {"target", "draft"}
    assert {b.kind for b in plan.buffers} == {"weights", "kv_cache", "outputs", "compute",
                                              "prompt_cache", "ngram_cache"}  # the pair's caches, by default
    # one derivation: an unset type with a draft path means the draft model; the draft decodes
    # one token per slot per step, the target verifies n_max + 1 per slot
    assert plan.speculative.type == pb.DRAFTER_TYPE_DRAFT_MODEL
    assert plan.draft.n_outputs_max == 2
    assert plan.target.n_outputs_max == 2 * (plan.speculative.n_max + 1)
    assert plan.target.n_ctx == plan.draft.n_ctx == 256

    load = c.model.Load(pb.LoadRequest(pair=spec(draft=TINY_DRAFT)), timeout=30)
    assert load.name == "p"
    assert buffers(load.allocated) == buffers(load.plan.buffers) == buffers(plan.buffers)
    assert c.server.backend.ledger.total_bytes() - before == plan.total_bytes
    listed = c.pair_info("p")
    assert listed.state == pb.PAIR_STATE_READY
    assert buffers(listed.allocated) == buffers(plan.buffers)
    assert listed.target_path.endswith(TINY) and listed.draft_path.endswith(TINY_DRAFT)
    assert listed.speculative.type == pb.DRAFTER_TYPE_DRAFT_MODEL

    un = c.model.Unload(pb.UnloadRequest(name="p"), timeout=30)
    assert un.released_bytes == plan.total_bytes
    assert c.server.backend.ledger.total_bytes() == before
    assert [p.name for p in c.model.ListPairs(pb.ListPairsRequest(), timeout=10).pairs] == []


def test_fit_reports_what_does_not_fit_and_load_refuses_it(empty_server):
    c = empty_server
    fit = c.model.Fit(pb.FitRequest(pair=pb.PairSpec(target_path=TINY, memory_budget_bytes=10_000)), timeout=30)
    assert not fit.fits and fit.deficit_bytes > 0 and fit.max_n_ctx == 0
    with pytest.raises(grpc.RpcError) as e:
        c.model.Load(pb.LoadRequest(pair=pb.PairSpec(target_path=TINY, memory_budget_bytes=10_000)), timeout=30)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "deficit" in e.value.details()
    trailers = dict(e.value.trailing_metadata())
    assert int(trailers["specserve-deficit-bytes"]) > 0
    assert c.model.ListPairs(pb.ListPairsRequest(), timeout=10).pairs == []
    assert c.server.backend.ledger.total_bytes() == 0


def test_fit_adjusts_n_ctx_to_the_budget(empty_server):
    c = empty_server
    big = c.model.Fit(pb.FitRequest(pair=spec(n_ctx=2048, n_parallel=1)), timeout=30)
    budget = int((big.plan.total_bytes - 1000) / 0.98)  # just too small for n_ctx 2048
    fit = c.model.Fit(pb.FitRequest(pair=pb.PairSpec(target_path=TINY, memory_budget_bytes=budget,
                                                     params=pb.ContextParams(n_ctx=2048, n_parallel=1))), timeout=30)
    assert fit.fits and fit.adjustments and 0 < fit.plan.target.n_ctx < 2048
    assert "n_ctx" in fit.adjustments[0]


def test_paths_outside_the_models_dir_are_refused_without_opening(empty_server, outside_model, tiny_models_dir,
                                                                  monkeypatch):
    import service.fit.factory as factory

    opened = []
    real_open = factory.open_model
    monkeypatch.setattr(factory, "open_model", lambda p: opened.append(p) or real_open(p))
    link = tiny_models_dir / "link-outside.gguf"
    if not link.exists():
        os.symlink(outside_model, link)
    c = empty_server
    for path in (str(outside_model), f"../{outside_model.parent.name}/{outside_model.name}", link.name):
        for rpc, req in ((c.model.Load, pb.LoadRequest), (c.model.Fit, pb.FitRequest)):
            code, details = code_of(rpc, req(pair=pb.PairSpec(target_path=path)))
            assert code == grpc.StatusCode.PERMISSION_DENIED, (path, details)
            assert "outside the models directory" in details
        code, _ = code_of(c.model.Load, pb.LoadRequest(pair=pb.PairSpec(target_path=TINY, draft_path=path)))
        assert code == grpc.StatusCode.PERMISSION_DENIED
    assert not [p for p in opened if os.path.realpath(p) == os.path.realpath(outside_model)]
    assert c.server.backend.ledger.total_bytes() == 0


def test_load_errors(empty_server, tiny_models_dir):
    c = empty_server
    code, details = code_of(c.model.Load, pb.LoadRequest(pair=pb.PairSpec(target_path="missing.gguf")))
    assert code == grpc.StatusCode.NOT_FOUND and "missing.gguf" in details
    junk = tiny_models_dir / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    code, details = code_of(c.model.Load, pb.LoadRequest(pair=pb.PairSpec(target_path="junk.gguf")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    c.model.Load(pb.LoadRequest(pair=spec("dup")), timeout=30)
    code, details = code_of(c.model.Load, pb.LoadRequest(pair=spec("dup")))
    assert code == grpc.StatusCode.ALREADY_EXISTS and "dup" in details
    assert [p.name for p in c.model.ListPairs(pb.ListPairsRequest(), timeout=10).pairs] == ["dup"]


@pytest.mark.parametrize("pair, needle", [
    (pb.PairSpec(name="bad name!", target_path=TINY), "pair name"),
    (pb.PairSpec(target_path=TINY, params=pb.ContextParams(kv_type=7)), "kv_type"),
    (pb.PairSpec(target_path=TINY, params=pb.ContextParams(n_gpu_layers=-5)), "n_gpu_layers"),
    (pb.PairSpec(target_path=TINY, params=pb.ContextParams(n_ctx=3, n_parallel=4)), "n_ctx"),
    (pb.PairSpec(target_path=TINY, speculative=pb.SpeculativeConfig(n_max=2, n_min=3)), "n_min"),
    (pb.PairSpec(target_path=TINY, speculative=pb.SpeculativeConfig(p_min=1.5)), "p_min"),
    (pb.PairSpec(target_path=TINY, speculative=pb.SpeculativeConfig(ngram_min=0)), "ngram"),
    (pb.PairSpec(target_path=TINY, speculative=pb.SpeculativeConfig(type=9)), "type"),
    (pb.PairSpec(target_path=TINY, speculative=pb.SpeculativeConfig(type=pb.DRAFTER_TYPE_DRAFT_MODEL)), "draft"),
])
def test_bad_pair_fields_are_invalid_argument(empty_server, pair, needle):
    for rpc, req in ((empty_server.model.Fit, pb.FitRequest), (empty_server.model.Load, pb.LoadRequest)):
        code, details = code_of(rpc, req(pair=pair))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        assert needle in details
    assert empty_server.server.backend.ledger.total_bytes() == 0


def test_nothing_loaded_is_failed_precondition_and_not_serving(empty_server):
    c = empty_server
    assert c.health_status() == NOT_SERVING
    for rpc, req in ((c.gen.Generate, pb.GenerateRequest(prompt="hi")),
                     (c.gen.Tokenize, pb.TokenizeRequest(text="hi")),
                     (c.model.GetSpeculativeConfig, pb.GetSpeculativeConfigRequest())):
        code, details = code_of(rpc, req)
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "Load" in details
    code, _ = code_of(lambda r, timeout: list(c.gen.GenerateStream(r, timeout=timeout)),
                      pb.GenerateStreamRequest(prompt="hi"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    code, _ = code_of(c.model.Unload, pb.UnloadRequest(name="default"))
    assert code == grpc.StatusCode.NOT_FOUND

    c.model.Load(pb.LoadRequest(pair=spec("default")), timeout=30)
    assert c.health_status() == SERVING
    assert c.health_status("specserve.v1.GenerationService") == SERVING
    code, details = code_of(c.gen.Generate, pb.GenerateRequest(pair="other", prompt="hi"))
    assert code == grpc.StatusCode.NOT_FOUND and "other" in details
    c.model.Unload(pb.UnloadRequest(), timeout=30)  # empty name = default
    assert c.health_status() == NOT_SERVING


def test_a_loading_pair_is_unavailable(empty_server):
    c = empty_server
    release = threading.Event()
    reg = c.server.registry
    real = reg._tokenizer_factory
    reg._tokenizer_factory = lambda pair: release.wait(30) and real(pair)
    t = threading.Thread(target=lambda: c.model.Load(pb.LoadRequest(pair=spec("default")), timeout=60))
    t.start()
    try:
        deadline = time.monotonic() + 10
        while not c.model.ListPairs(pb.ListPairsRequest(), timeout=10).pairs:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert c.pair_info().state == pb.PAIR_STATE_LOADING
        code, details = code_of(c.gen.Generate, pb.GenerateRequest(prompt="hi"))
        assert code == grpc.StatusCode.UNAVAILABLE and "loading" in details
        code, _ = code_of(c.model.Load, pb.LoadRequest(pair=spec("default")))
        assert code == grpc.StatusCode.ALREADY_EXISTS
        assert c.health_status() == NOT_SERVING
    finally:
        release.set()
        t.join(60)
    assert c.pair_info().state == pb.PAIR_STATE_READY
    assert c.health_status() == SERVING


def test_a_failed_load_releases_everything(empty_server):
    c = empty_server

    def boom(pair):
        raise RuntimeError("tokenizer exploded")

    c.server.registry._tokenizer_factory = boom
    code, details = code_of(c.model.Load, pb.LoadRequest(pair=spec("default", draft=TINY_DRAFT)))
    assert code == grpc.StatusCode.INTERNAL and "exploded" not in details
    assert c.server.backend.ledger.total_bytes() == 0
    assert c.model.ListPairs(pb.ListPairsRequest(), timeout=10).pairs == []


def test_speculative_config_get_and_update(tiny_models_dir):
    c = start_server(tiny_config(tiny_models_dir, spec_type="draft", n_max=4))
    try:
        got = c.model.GetSpeculativeConfig(pb.GetSpeculativeConfigRequest(), timeout=10)
        assert got.pair == "default" and got.config.type == pb.DRAFTER_TYPE_DRAFT_MODEL and got.config.n_max == 4
        up = c.model.UpdateSpeculativeConfig(pb.UpdateSpeculativeConfigRequest(
            config=pb.SpeculativeConfig(type=pb.DRAFTER_TYPE_NGRAM, n_max=2)), timeout=10)
        assert up.config.type == pb.DRAFTER_TYPE_NGRAM and up.config.n_max == 2
        assert up.config.p_min == pytest.approx(got.config.p_min)  # unset fields keep their values
        assert c.model.GetSpeculativeConfig(pb.GetSpeculativeConfigRequest(), timeout=10).config == up.config
        assert c.pair_info().speculative == up.config
        r = c.gen.Generate(pb.GenerateRequest(prompt="the the the", max_tokens=8), timeout=30)
        assert r.usage.completion_tokens > 0

        code, details = code_of(c.model.UpdateSpeculativeConfig, pb.UpdateSpeculativeConfigRequest(
            config=pb.SpeculativeConfig(n_max=64)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "n_max" in details
        code, _ = code_of(c.model.UpdateSpeculativeConfig, pb.UpdateSpeculativeConfigRequest(
            config=pb.SpeculativeConfig(n_min=3, n_max=2)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        code, _ = code_of(c.model.GetSpeculativeConfig, pb.GetSpeculativeConfigRequest(pair="nope"))
        assert code == grpc.StatusCode.NOT_FOUND
        c.model.Load(pb.LoadRequest(pair=spec("nodraft")), timeout=30)
        code, details = code_of(c.model.UpdateSpeculativeConfig, pb.UpdateSpeculativeConfigRequest(
            pair="nodraft", config=pb.SpeculativeConfig(type=pb.DRAFTER_TYPE_DRAFT_MODEL)))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "draft" in details
        assert c.model.GetSpeculativeConfig(pb.GetSpeculativeConfigRequest(pair="nodraft"),
                                            timeout=10).config.type == pb.DRAFTER_TYPE_NGRAM
    finally:
        stop_server(c)


def test_unload_drains_in_flight_requests(tiny_models_dir):
    c = start_server(tiny_config(tiny_models_dir, n_parallel=1, n_ctx=1024))
    try:
        stream = c.gen.GenerateStream(pb.GenerateStreamRequest(prompt="a", max_tokens=600), timeout=60)
        first = next(stream)
        assert first.tokens
        un = c.model.Unload(pb.UnloadRequest(name="default", drain_timeout_seconds=30), timeout=60)
        assert un.released_bytes > 0
        rest = list(stream)
        assert rest[-1].finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP)
        assert c.server.backend.ledger.total_bytes() == 0
    finally:
        stop_server(c)
