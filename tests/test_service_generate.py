"""GenerationService over real gRPC on tiny models: inputs, outputs, streaming, errors, concurrency,
request ids, the interceptor, health, reflection and metrics."""

from __future__ import annotations

import logging
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2

from service.pb.specserve.v1 import specserve_pb2 as pb
from tests.conftest import start_server, stop_server, tiny_config

GREEDY = pb.SamplingParams(temperature=0)


def rpc_error(fn, *args, **kw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        fn(*args, timeout=30, **kw)
    return e.value


def stream_all(c, req: pb.GenerateStreamRequest, **kw) -> list[pb.GenerateStreamResponse]:
    return list(c.gen.GenerateStream(req, timeout=60, **kw))


def as_stream(req: pb.GenerateRequest) -> pb.GenerateStreamRequest:
    return pb.GenerateStreamRequest.FromString(req.SerializeToString())  # same fields, same numbers


def test_generate_prompt(tiny_server):
    c = tiny_server
    r = c.gen.Generate(pb.GenerateRequest(prompt="the cat", max_tokens=20, sampling=GREEDY), timeout=30)
    assert r.finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP)
    assert r.usage.completion_tokens == len(r.tokens) <= 20
    prompt = c.gen.Tokenize(pb.TokenizeRequest(text="the cat", add_special=True, parse_special=True), timeout=10)
    assert r.usage.prompt_tokens == len(prompt.tokens)
    assert c.gen.Detokenize(pb.DetokenizeRequest(tokens=r.tokens), timeout=10).text.startswith(r.text)
    assert r.request_id and r.timings.decode_seconds >= 0 and r.timings.time_to_first_token_seconds > 0
    assert r.speculative_stats.accepted <= r.speculative_stats.drafted


def test_temperature_zero_is_deterministic_and_speculation_is_lossless(tiny_server):
    c = tiny_server
    req = pb.GenerateRequest(prompt="the the the", max_tokens=40, sampling=GREEDY)
    first = c.gen.Generate(req, timeout=30)
    assert c.gen.Generate(req, timeout=30).tokens == first.tokens
    for spec in (pb.SpeculativeConfig(type=pb.DRAFTER_TYPE_NONE), pb.SpeculativeConfig(type=pb.DRAFTER_TYPE_NGRAM),
                 pb.SpeculativeConfig(n_max=1)):
        other = pb.GenerateRequest(prompt="the the the", max_tokens=40, sampling=GREEDY, speculative=spec)
        assert c.gen.Generate(other, timeout=30).tokens == first.tokens, spec
    off = c.gen.Generate(pb.GenerateRequest(prompt="the the the", max_tokens=40, sampling=GREEDY,
                                            speculative=pb.SpeculativeConfig(type=pb.DRAFTER_TYPE_NONE)), timeout=30)
    assert off.speculative_stats.drafted == 0


def test_seeded_sampling_is_reproducible(tiny_server):
    c = tiny_server
    req = pb.GenerateRequest(prompt="the", max_tokens=16, sampling=pb.SamplingParams(temperature=1.0, seed=7))
    assert c.gen.Generate(req, timeout=30).tokens == c.gen.Generate(req, timeout=30).tokens


def test_chat_messages_and_token_ids(tiny_server):
    c = tiny_server
    msgs = pb.ChatMessages(messages=[pb.ChatMessage(role="system", content="be brief"),
                                     pb.ChatMessage(role="user", content="the cat")])
    r = c.gen.Generate(pb.GenerateRequest(messages=msgs, max_tokens=8, sampling=GREEDY), timeout=30)
    rendered = ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nthe cat<|im_end|>\n"
                "<|im_start|>assistant\n")
    ids = c.gen.Tokenize(pb.TokenizeRequest(text=rendered, parse_special=True), timeout=10).tokens
    assert r.usage.prompt_tokens == len(ids)
    by_ids = c.gen.Generate(pb.GenerateRequest(tokens=pb.TokenIds(ids=ids), max_tokens=8, sampling=GREEDY), timeout=30)
    assert by_ids.tokens == r.tokens


def test_stream_equals_unary(tiny_server):
    c = tiny_server
    req = pb.GenerateRequest(prompt="the cat", max_tokens=30, sampling=GREEDY)
    unary = c.gen.Generate(req, timeout=30)
    msgs = stream_all(c, as_stream(req))
    *deltas, final = msgs
    assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED for m in deltas)
    assert final.finish_reason == unary.finish_reason and not final.tokens
    assert [t for m in msgs for t in m.tokens] == list(unary.tokens)
    assert "".join(m.text for m in msgs) == unary.text
    assert final.usage == unary.usage
    assert len({m.request_id for m in msgs}) == 1


def test_stop_strings(tiny_server):
    c = tiny_server
    base = c.gen.Generate(pb.GenerateRequest(prompt="the cat", max_tokens=30, sampling=GREEDY), timeout=30)
    if len(base.text) < 6:
        pytest.skip("the tiny model generated too little text to pick a stop string")
    stop = base.text[3:6]
    r = c.gen.Generate(pb.GenerateRequest(prompt="the cat", max_tokens=30, sampling=GREEDY, stop=[stop]), timeout=30)
    assert r.finish_reason == pb.FINISH_REASON_STOP
    assert stop not in r.text and base.text.startswith(r.text)
    msgs = stream_all(c, pb.GenerateStreamRequest(prompt="the cat", max_tokens=30, sampling=GREEDY, stop=[stop]))
    assert "".join(m.text for m in msgs) == r.text


@pytest.mark.parametrize("fields, needle", [
    (dict(), "prompt"),
    (dict(prompt=""), "no tokens"),
    (dict(messages=pb.ChatMessages()), "messages"),
    (dict(messages=pb.ChatMessages(messages=[pb.ChatMessage(content="x")])), "role"),
    (dict(tokens=pb.TokenIds(ids=[1, 99999])), "99999"),
    (dict(prompt="x", sampling=pb.SamplingParams(temperature=-1)), "temperature"),
    (dict(prompt="x", sampling=pb.SamplingParams(top_p=0)), "top_p"),
    (dict(prompt="x", sampling=pb.SamplingParams(min_p=2)), "min_p"),
    (dict(prompt="x", sampling=pb.SamplingParams(repeat_penalty=0)), "repeat_penalty"),
    (dict(prompt="x", stop=[""]), "stop"),
    (dict(prompt="x", stop=["s"] * 17), "stop"),
    (dict(prompt="x", pair="bad name"), "pair name"),
    (dict(prompt="x", speculative=pb.SpeculativeConfig(n_max=100)), "n_max"),
    (dict(prompt="x", speculative=pb.SpeculativeConfig(p_min=-0.5)), "p_min"),
])
def test_bad_generate_fields_are_invalid_argument(tiny_server, fields, needle):
    for rpc, req in ((tiny_server.gen.Generate, pb.GenerateRequest(**fields)),
                     (lambda r, timeout: list(tiny_server.gen.GenerateStream(r, timeout=timeout)),
                      pb.GenerateStreamRequest(**fields))):
        e = rpc_error(rpc, req)
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e.details()
        assert needle in e.details()


def test_unknown_pair_is_not_found(tiny_server):
    for rpc, req in ((tiny_server.gen.Generate, pb.GenerateRequest(pair="nope", prompt="x")),
                     (tiny_server.gen.Tokenize, pb.TokenizeRequest(pair="nope", text="x")),
                     (tiny_server.gen.Detokenize, pb.DetokenizeRequest(pair="nope", tokens=[1])),
                     (tiny_server.model.Unload, pb.UnloadRequest(name="nope"))):
        e = rpc_error(rpc, req)
        assert e.code() == grpc.StatusCode.NOT_FOUND and "nope" in e.details()


def test_prompt_longer_than_the_context_names_the_limit(tiny_server):
    n_ctx_slot = tiny_server.pair_info().plan.target.n_ctx // tiny_server.pair_info().plan.target.n_parallel
    ids = [10 + i % 200 for i in range(n_ctx_slot + 20)]
    e = rpc_error(tiny_server.gen.Generate, pb.GenerateRequest(tokens=pb.TokenIds(ids=ids)))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert str(n_ctx_slot) in e.details()
    text = "the " * (n_ctx_slot * 2)
    e = rpc_error(lambda r, timeout: list(tiny_server.gen.GenerateStream(r, timeout=timeout)),
                  pb.GenerateStreamRequest(prompt=text))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and str(n_ctx_slot) in e.details()
    tiny_server.wait_idle()


def test_tokenize_detokenize(tiny_server):
    c = tiny_server
    ids = c.gen.Tokenize(pb.TokenizeRequest(text="the cat <|im_end|>", parse_special=True), timeout=10).tokens
    unset = c.gen.Tokenize(pb.TokenizeRequest(text="the cat <|im_end|>"), timeout=10).tokens
    assert unset == ids  # unset parse_special means true, as Generate and llama-server's /tokenize parse
    plain = c.gen.Tokenize(pb.TokenizeRequest(text="the cat <|im_end|>", parse_special=False), timeout=10).tokens
    assert len(plain) > len(ids)  # with parse_special false the control token is spelled out
    assert c.gen.Detokenize(pb.DetokenizeRequest(tokens=ids), timeout=10).text == "the cat <|im_end|>"
    assert c.gen.Detokenize(pb.DetokenizeRequest(tokens=ids, skip_special=True), timeout=10).text == "the cat "
    e = rpc_error(c.gen.Detokenize, pb.DetokenizeRequest(tokens=[1, 1 << 20]))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_many_concurrent_clients(tiny_server):
    c = tiny_server
    greedy = c.gen.Generate(pb.GenerateRequest(prompt="the cat", max_tokens=24, sampling=GREEDY), timeout=30)

    def one(i: int):
        if i % 2:
            msgs = stream_all(c, pb.GenerateStreamRequest(prompt="the cat", max_tokens=24, sampling=GREEDY))
            return [t for m in msgs for t in m.tokens], msgs[-1].finish_reason
        r = c.gen.Generate(pb.GenerateRequest(prompt="the cat", max_tokens=24, sampling=GREEDY), timeout=60)
        return list(r.tokens), r.finish_reason

    with ThreadPoolExecutor(32) as ex:
        results = list(ex.map(one, range(48)))
    assert all(tokens == list(greedy.tokens) for tokens, _ in results)  # batching does not change greedy output
    assert all(reason != pb.FINISH_REASON_UNSPECIFIED for _, reason in results)
    c.wait_idle()


def test_a_full_queue_is_resource_exhausted(tiny_models_dir):
    c = start_server(tiny_config(tiny_models_dir, n_parallel=1, n_ctx=1024, queue_max=1))
    try:
        def one(_):
            try:
                c.gen.Generate(pb.GenerateRequest(prompt="a", max_tokens=800), timeout=60)
                return "OK"
            except grpc.RpcError as e:
                assert e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or "queue" in e.details()
                return e.code().name

        with ThreadPoolExecutor(8) as ex:
            codes = list(ex.map(one, range(8)))
        assert "OK" in codes and "RESOURCE_EXHAUSTED" in codes, codes
        assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}
        c.wait_idle()
    finally:
        stop_server(c)


def test_request_ids_travel_with_the_request(tiny_server, caplog):
    c = tiny_server
    with caplog.at_level(logging.INFO, logger="specserve"):
        r, call = c.gen.Generate.with_call(pb.GenerateRequest(prompt="x", max_tokens=2),
                                           metadata=(("x-request-id", "req-abc-123"),), timeout=30)
    assert r.request_id == "req-abc-123"
    assert dict(call.trailing_metadata())["x-request-id"] == "req-abc-123"
    assert any(getattr(rec, "request_id", "") == "req-abc-123" for rec in caplog.records)
    r, call = c.gen.Generate.with_call(pb.GenerateRequest(prompt="x", max_tokens=2, request_id="body-id"),
                                       timeout=30)
    assert r.request_id == "body-id" and dict(call.trailing_metadata())["x-request-id"] == "body-id"
    e = rpc_error(c.gen.Generate, pb.GenerateRequest(pair="nope", prompt="x"), metadata=(("x-request-id", "err-1"),))
    assert dict(e.trailing_metadata())["x-request-id"] == "err-1"


def test_unexpected_errors_are_internal_without_traceback(empty_server, caplog, monkeypatch):
    c = empty_server

    def boom():
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(c.server.registry, "list", boom)
    with caplog.at_level(logging.ERROR, logger="specserve"):
        e = rpc_error(c.model.ListPairs, pb.ListPairsRequest(), metadata=(("x-request-id", "boom-1"),))
    assert e.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in e.details() and "Traceback" not in e.details() and "boom-1" in e.details()
    logged = [r for r in caplog.records if r.levelno == logging.ERROR and r.exc_info]
    assert logged and logged[0].request_id == "boom-1"
    assert c.health_status() == health_pb2.HealthCheckResponse.NOT_SERVING  # the server still answers


def test_health_and_reflection(tiny_server):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    c = tiny_server
    for service in ("", "specserve.v1.GenerationService", "specserve.v1.ModelService"):
        assert c.health_status(service) == health_pb2.HealthCheckResponse.SERVING
    db = ProtoReflectionDescriptorDatabase(c.channel)
    services = set(db.get_services())
    assert {"specserve.v1.ModelService", "specserve.v1.GenerationService", "grpc.health.v1.Health"} <= services
    for symbol in ("specserve.v1.GenerationService", "specserve.v1.GenerationService.Generate",
                   "specserve.v1.GenerateRequest"):  # ghz and grpcurl ask for the method's file
        assert db.FindFileContainingSymbol(symbol).name == "specserve/v1/specserve.proto"


def test_metrics(tiny_server):
    c = tiny_server
    m = c.server.metrics
    before = m.value("specserve_spec_decode_num_draft_tokens_total", pair="default")
    c.gen.Generate(pb.GenerateRequest(prompt="the the the", max_tokens=16, sampling=GREEDY), timeout=30)
    assert m.value("specserve_requests_total", method="/specserve.v1.GenerationService/Generate", code="OK") >= 1
    assert m.value("specserve_prompt_tokens_total", pair="default") > 0
    assert m.value("specserve_completion_tokens_total", pair="default") >= 16
    assert m.value("specserve_spec_decode_num_draft_tokens_total", pair="default") > before
    assert m.value("specserve_spec_decode_num_drafts_total", pair="default") > 0
    assert m.value("specserve_time_to_first_token_seconds_count", pair="default") >= 1
    body = urllib.request.urlopen(f"http://127.0.0.1:{c.server.metrics_port}/metrics", timeout=10).read().decode()
    for name in ("specserve_spec_decode_num_drafts_total", "specserve_spec_decode_num_draft_tokens_total",
                 "specserve_spec_decode_num_accepted_tokens_total", "specserve_request_duration_seconds_bucket",
                 "specserve_active_slots"):
        assert name in body
