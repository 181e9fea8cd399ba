"""The HTTP door under hostile clients: slow bodies cannot hold the workers, a body has a time limit
and bodies in flight a cap, a client that leaves mid-body is CANCELLED (no INTERNAL, no traceback),
the fields follow gRPC's rules, and a grammar that fails mid-generation over HTTP ends only its own
request (the victim on gRPC generates on).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import replace

import grpc
import httpx
import pytest

from service.pb.specserve.v1 import specserve_pb2 as pb
from tests.conftest import start_server, stop_server, tiny_config

CHAT = "POST /v1/chat/completions"
BODY = b'{"model": "default", "messages": [{"role": "user", "content": "the cat"}], "max_tokens": 4}'


@pytest.fixture(scope="module")
def door(tiny_models_dir):
    """Two --max-workers places (so four bodies may be read at once) and a 1.5 s body timeout."""
    c = start_server(replace(tiny_config(tiny_models_dir, n_parallel=2, n_ctx=1024), http_port=0, max_tokens=8,
                             max_workers=2, http_body_timeout_s=1.5, metrics_port=0))
    yield c
    stop_server(c)


def slow_client(port: int, sent: bytes = b'{"model": "default", "mess') -> socket.socket:
    """A connection that sends its headers and the start of a body, then nothing more."""
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % len(BODY) + sent)
    return s


def read_response(s: socket.socket) -> tuple[bytes, float]:
    """One whole HTTP/1.1 response from a raw socket (headers, then Content-Length bytes of body: they may
    come in separate segments), and the monotonic time its first bytes arrived."""
    data = s.recv(4096)
    first = time.monotonic()
    while b"\r\n\r\n" not in data and (chunk := s.recv(4096)):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length and (chunk := s.recv(4096)):
        body += chunk
    return head + b"\r\n\r\n" + body, first


def post(port: int, body: bytes = BODY, timeout: float = 30) -> httpx.Response:
    return httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", content=body,
                      headers={"Content-Type": "application/json"}, timeout=timeout)


def wait_reading(door, n: int, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while door.server.http_door.bodies.reading < n and time.monotonic() < deadline:
        time.sleep(0.01)
    assert door.server.http_door.bodies.reading >= n


def test_slow_bodies_as_many_as_the_workers_do_not_lock_the_door(door):
    port = door.server.http_port
    slow = [slow_client(port) for _ in range(2)]  # --max-workers 2
    try:
        wait_reading(door, 2)
        r = post(port)
        assert r.status_code == 200, r.text  # the workers are free: a slow body holds none
    finally:
        for s in slow:
            s.close()


def test_a_body_that_does_not_arrive_in_time_is_408_and_frees_its_place(door):
    port = door.server.http_port
    s = slow_client(port)
    try:
        t0 = time.monotonic()
        s.settimeout(10)
        answer, arrived = read_response(s)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:80]
        assert 1.4 < arrived - t0 < 5
        assert b"did not arrive within 1.5 s" in answer
    finally:
        s.close()
    assert door.server.http_door.bodies.reading == 0


def test_bodies_in_flight_are_capped_and_the_door_recovers_after_the_timeout(door):
    port = door.server.http_port
    cap = door.server.http_door.bodies.max_reading
    slow = [slow_client(port) for _ in range(cap)]
    try:
        wait_reading(door, cap)
        r = post(port)
        assert r.status_code == 429 and "request bodies are being read" in r.json()["error"]["message"]
        time.sleep(2.0)  # past the body timeout: the slow clients got 408 and left their places
        assert post(port).status_code == 200
    finally:
        for s in slow:
            s.close()


def test_a_client_that_leaves_mid_body_is_cancelled_without_a_traceback(door, caplog):
    m = door.server.metrics
    before = {code: m.value("specserve_requests_total", method=CHAT, code=code) for code in ("CANCELLED", "INTERNAL")}
    with caplog.at_level(logging.INFO, logger="specserve"):
        for _ in range(5):
            s = slow_client(door.server.http_port)
            wait_reading(door, 1)
            s.close()
        deadline = time.monotonic() + 5
        while m.value("specserve_requests_total", method=CHAT, code="CANCELLED") < before["CANCELLED"] + 5:
            assert time.monotonic() < deadline, "the departures were not counted as CANCELLED"
            time.sleep(0.02)
    assert m.value("specserve_requests_total", method=CHAT, code="INTERNAL") == before["INTERNAL"]
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


@pytest.mark.parametrize("field, value", [("top_k", -1), ("repeat_last_n", -2), ("max_tokens", 10 ** 30),
                                          ("top_k", 1 << 32), ("repeat_last_n", 1 << 32), ("max_tokens", 1 << 32)])
def test_fields_gRPC_cannot_express_are_refused_as_the_rules_refuse_them(door, field, value):
    body = BODY.replace(b'"max_tokens": 4', b'"max_tokens": 4, "%s": %d' % (field.encode(), value)) \
        if field != "max_tokens" else BODY.replace(b'"max_tokens": 4', b'"max_tokens": %d' % value)
    r = post(door.server.http_port, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field


def test_a_failing_grammar_over_http_does_not_fail_a_grpc_stream_beside_it(door):
    stream = door.gen.GenerateStream(pb.GenerateStreamRequest(prompt="the theme", max_tokens=200,
                                                              sampling=pb.SamplingParams(temperature=0)), timeout=120)
    got: list = []
    reader = threading.Thread(target=lambda: got.extend(stream))
    reader.start()
    bad = BODY.replace(b'"max_tokens": 4', b'"max_tokens": 32, "response_format": {"type": "json_schema", '
                       b'"json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"$ref": "#"}},'
                       b' "required": ["a"]}}}')
    r = post(door.server.http_port, bad)
    reader.join(120)
    assert r.status_code == 429 and "limits" in r.json()["error"]["message"], r.text
    assert got and got[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED
    with pytest.raises(grpc.RpcError) as e:  # and the other way round: the attacker on gRPC
        door.gen.Generate(pb.GenerateRequest(prompt="the", max_tokens=16, response_format=pb.ResponseFormat(
            lark='start: a\na: "x" a | a "y" | a a')), timeout=60)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert post(door.server.http_port).status_code == 200
