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


def test_an_oversize_prompt_is_refused_at_once_beside_a_normal_request(server, monkeypatch):
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
    assert normal.usage.completion_tokens == 4 and normal_seconds < 5.0
    e = refused["error"]
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e.details()
    assert "prompt is 15000000 bytes" in e.details() and "--max-prompt-bytes" in e.details()
    assert refused["seconds"] < 1.0
    assert all(n < MB for n in tokenized)  # the tokenizer never saw it

    for fn, req in ((c.gen.Tokenize, pb.TokenizeRequest(text=huge)),
                    (c.gen.Generate, _greedy(messages=pb.ChatMessages(
                        messages=[pb.ChatMessage(role="user", content=huge[:2 * MB])]))),
                    (c.gen.Generate, _greedy(tokens=pb.TokenIds(ids=[200] * MB)))):
        t0 = time.monotonic()
        e = _error(fn, req)
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "--max-prompt-bytes" in e.details(), e.details()
        assert time.monotonic() - t0 < 1.0
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
