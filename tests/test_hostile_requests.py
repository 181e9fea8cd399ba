"""Hostile requests over real gRPC: an oversize prompt is refused before the tokenizer runs and does
not hold up a normal request beside it; a request id that cannot go back as a header is refused
up front, so the status the client sees and the server's metrics agree."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from service.pb.specserve.v1 import specserve_pb2 as pb
from tests.conftest import start_server, stop_server, tiny_config

GENERATE = "/specserve.v1.GenerationService/Generate"
STREAM = "/specserve.v1.GenerationService/GenerateStream"
MB = 1_000_000


@pytest.fixture(scope="module")
def server(tiny_models_dir):
    c = start_server(tiny_config(tiny_models_dir, n_parallel=2, n_ctx=512, metrics_port=0))
    yield c
    stop_server(c)


def _error(fn, request, **kw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        fn(request, timeout=30, **kw)
    return e.value


def _greedy(**kw):
    return pb.GenerateRequest(max_tokens=4, sampling=pb.SamplingParams(temperature=0), **kw)


def _refusals(caplog) -> list[float]:
    """The server's own handling time (ms, from the parsed request to the status) of each INVALID_ARGUMENT
    RPC logged so far: what "refused at once" promises, apart from the client's upload of the message."""
    return [r.kv["ms"] for r in caplog.records
            if r.getMessage() == "rpc" and getattr(r, "kv", {}).get("code") == "INVALID_ARGUMENT"]


def test_an_oversize_prompt_is_refused_at_once_beside_a_normal_request(server, monkeypatch, caplog):
    c = server
    tokenized = []
    tok = c.server.registry.get("default").tokenizer
    real_encode = tok.encode
    monkeypatch.setattr(tok, "encode", lambda text, **kw: tokenized.append(len(text)) or real_encode(text, **kw))
    huge = "the cat " * (15 * MB // 8)  # 15 MB: under the 16 MiB message limit, far over the 1 MiB prompt limit
    refused = {}

    def send_huge():
        t0 = time.monotonic()
        refused["error"] = _error(c.gen.Generate, _greedy(prompt=huge))
        refused["seconds"] = time.monotonic() - t0

    sender = threading.Thread(target=send_huge)
    sender.start()
    t0 = time.monotonic()
    normal = c.gen.Generate(_greedy(prompt="the cat"), timeout=30)
    normal_seconds = time.monotonic() - t0
    sender.join(30)
    print(f"normal request beside the 15 MB one: {normal_seconds:.3f} s")
    assert normal.usage.completion_tokens == 4 and normal_seconds < 1.0  # a huge neighbour never holds it up
    e = refused["error"]
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e.details()
    assert "prompt is 15000000 bytes" in e.details() and "--max-prompt-bytes" in e.details()
    # refused at once: the server's handling, from the parsed request to the status, takes tens of ms (the
    # client's wall time also holds its own upload of 15 MB, which on two shared vCPUs can pass a second)
    print(f"15 MB prompt refused after {refused['seconds']:.3f} s at the client, {_refusals(caplog)} ms in the server")
    assert len(_refusals(caplog)) == 1 and _refusals(caplog)[0] < 500
    assert all(n < MB for n in tokenized)  # the tokenizer never saw it

    for fn, req in ((c.gen.Tokenize, pb.TokenizeRequest(text=huge)),
                    (c.gen.Generate, _greedy(messages=pb.ChatMessages(
                        messages=[pb.ChatMessage(role="user", content=huge[:2 * MB])]))),
                    (c.gen.Generate, _greedy(tokens=pb.TokenIds(ids=[200] * MB)))):
        n_before = len(_refusals(caplog))
        e = _error(fn, req)
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "--max-prompt-bytes" in e.details(), e.details()
        assert len(_refusals(caplog)) == n_before + 1 and _refusals(caplog)[-1] < 500
    stream = c.gen.GenerateStream(pb.GenerateStreamRequest(prompt=huge, max_tokens=4), timeout=30)
    with pytest.raises(grpc.RpcError) as e:
        list(stream)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert all(n < MB for n in tokenized)


def test_the_prompt_limit_is_the_operators(tiny_models_dir):
    c = start_server(tiny_config(tiny_models_dir, n_parallel=1, n_ctx=512, max_prompt_bytes=100))
    try:
        ok = c.gen.Generate(_greedy(prompt="é" * 50), timeout=30)  # 100 bytes as UTF-8: at the limit
        assert ok.usage.completion_tokens == 4
        e = _error(c.gen.Generate, _greedy(prompt="é" * 50 + "x"))  # 51 characters, 101 bytes
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "101 bytes" in e.details(), e.details()
    finally:
        stop_server(c)


def _requests(c, method: str, code: str) -> float:
    return c.server.metrics.value("specserve_requests_total", method=method, code=code)


BAD_IDS = ["line\nbreak", "tab\there", "naïve", "a" * 129, "has space", "\x7f"]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_a_request_id_that_cannot_be_a_header_is_refused_and_counted_so(server, bad):
    c = server
    for method, call in ((GENERATE, lambda **kw: c.gen.Generate(_greedy(**kw), timeout=30)),
                         (STREAM, lambda **kw: list(c.gen.GenerateStream(
                             pb.GenerateStreamRequest(prompt="the cat", max_tokens=4, **kw), timeout=30)))):
        ok, invalid = _requests(c, method, "OK"), _requests(c, method, "INVALID_ARGUMENT")
        with pytest.raises(grpc.RpcError) as e:
            call(prompt="the cat", request_id=bad) if method == GENERATE else call(request_id=bad)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
        assert "request_id" in e.value.details() and "visible ASCII" in e.value.details()
        rid = dict(e.value.trailing_metadata())["x-request-id"]
        assert rid != bad and len(rid) == 16  # a fresh id the log lines of the refusal carry
        assert _requests(c, method, "INVALID_ARGUMENT") == invalid + 1  # the metrics agree with the client
        assert _requests(c, method, "OK") == ok


@pytest.mark.parametrize("bad", ["a" * 129, "has space", "ends-with-space "])
def test_a_bad_x_request_id_header_is_refused_before_the_handler_runs(server, bad):
    """The header values a gRPC client lets through (it refuses control characters and non-ASCII itself)."""
    c = server
    ok, invalid = _requests(c, GENERATE, "OK"), _requests(c, GENERATE, "INVALID_ARGUMENT")
    e = _error(c.gen.Generate, _greedy(prompt="the cat"), metadata=(("x-request-id", bad),))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "x-request-id header" in e.details(), e.details()
    assert dict(e.trailing_metadata())["x-request-id"] != bad
    assert (_requests(c, GENERATE, "INVALID_ARGUMENT"), _requests(c, GENERATE, "OK")) == (invalid + 1, ok)
    ids = [("x-request-id", "req-" + "x" * 124)]  # 128 visible characters: taken as it is
    r, call = c.gen.Generate.with_call(_greedy(prompt="the cat"), metadata=ids, timeout=30)
    assert dict(call.trailing_metadata())["x-request-id"] == ids[0][1] and r.request_id == ids[0][1]
    assert _requests(c, GENERATE, "OK") == ok + 1


@pytest.mark.parametrize("method, streaming", [
    (GENERATE, False), (STREAM, True), ("/specserve.v1.ModelService/Fit", False),
    ("/specserve.v1.ModelService/Load", False), ("/grpc.health.v1.Health/Check", False)])
@pytest.mark.parametrize("garbage", [b"\xff\xff", b"\x0a\xff\xff\xff\xff\x0f", b"\x08" + b"\x80" * 11, b"\x12\x05ab"])
def test_undecodable_request_bytes_are_invalid_argument(server, method, streaming, garbage):
    """Bytes that are no message of the method's type (bad tags, a length past the end, a varint of 11
    bytes, a truncated string) get INVALID_ARGUMENT with a request id, not grpc's own INTERNAL."""
    c = server
    raw = (c.channel.unary_stream if streaming else c.channel.unary_unary)(
        method, request_serializer=None, response_deserializer=None)
    before = c.server.metrics.value("specserve_requests_total", method=method, code="INVALID_ARGUMENT")
    with pytest.raises(grpc.RpcError) as e:
        result = raw(garbage, timeout=30)
        if streaming:
            list(result)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert "not a valid" in e.value.details() and "x-request-id" in dict(e.value.trailing_metadata())
    if method.startswith("/specserve."):
        assert c.server.metrics.value("specserve_requests_total", method=method,
                                      code="INVALID_ARGUMENT") == before + 1
    assert c.gen.Generate(_greedy(prompt="the cat"), timeout=30).tokens  # and the server still serves


def test_a_refusal_quoting_a_huge_field_still_reaches_the_client(server):
    """Found by tests/test_fuzz.py: a 30 kB path quoted in the status details overflowed grpc's 16 KiB
    metadata limit, and the client saw RESOURCE_EXHAUSTED "Stream removed" instead of the refusal."""
    c = server
    for path in ("x" * 30_000, "ö" * 5_000):
        e = _error(c.model.Fit, pb.FitRequest(pair=pb.PairSpec(target_path=path)))
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e.details()  # a name longer than the OS allows
        assert "characters left out" in e.details() and "cannot be read" in e.details()[-60:]
        assert len(e.details()) < 1100
