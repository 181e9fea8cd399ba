"""The OpenAI-compatible HTTP door (--http-port), driven by the official `openai` package over real HTTP:
chat and text completions, unary and streamed; errors in OpenAI's shape with the HTTP status of
the gRPC code; an unknown model is 404; closing a stream frees the slot at once; the same token
file and roles as gRPC; TLS from the same files; and at temperature 0 (or with a seed) the same
prompt gives the same text through gRPC and HTTP."""

from __future__ import annotations

import json
import ssl
import threading
import time
from dataclasses import replace

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.pb.specserve.v1 import specserve_pb2 as pb
from tests.conftest import start_server, stop_server, tiny_config

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "the cat sat"}]
GREEDY = dict(temperature=0, max_tokens=24)
CHAT_PATH = "POST /v1/chat/completions"


def _client(port: int, key: str = "unused", scheme: str = "http", **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{scheme}://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=60, **kw)


@pytest.fixture(scope="module")
def door(tiny_models_dir):
    """A tiny server with draft-model speculation, 2 slots of 1024 cells, and the HTTP door on a free port."""
    c = start_server(replace(tiny_config(tiny_models_dir, spec_type="draft", n_parallel=2, n_ctx=2048),
                             http_port=0, max_tokens=32))
    yield c
    stop_server(c)


@pytest.fixture(scope="module")
def oa(door) -> openai.OpenAI:
    return _client(door.server.http_port)


def _grpc_text(c, **fields) -> str:
    sampling = pb.SamplingParams(temperature=fields.pop("temperature"), **fields.pop("sampling", {}))
    return c.gen.Generate(pb.GenerateRequest(sampling=sampling, **fields), timeout=60).text


def _grpc_messages(messages) -> pb.ChatMessages:
    return pb.ChatMessages(messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages])


# ---- generation ----

def test_chat_completion_is_what_grpc_generates_at_temperature_0(door, oa):
    r = oa.chat.completions.create(model="default", messages=MESSAGES, **GREEDY)
    assert r.object == "chat.completion" and r.model == "default" and len(r.choices) == 1
    choice = r.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert 0 < r.usage.completion_tokens <= 24 and r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details.cached_tokens == 0  # no prefix cache on this server
    assert r.id.startswith("chatcmpl-")
    grpc_text = _grpc_text(door, messages=_grpc_messages(MESSAGES), max_tokens=24, temperature=0)
    assert choice.message.content == grpc_text and grpc_text


def test_text_completion_is_what_grpc_generates_at_temperature_0(door, oa):
    r = oa.completions.create(model="default", prompt="the cat sat on the", **GREEDY)
    assert r.object == "text_completion" and r.choices[0].finish_reason in ("stop", "length")
    assert r.choices[0].text == _grpc_text(door, prompt="the cat sat on the", max_tokens=24, temperature=0)
    ids = door.gen.Tokenize(pb.TokenizeRequest(text="the cat sat on the", add_special=True), timeout=30).tokens
    by_ids = oa.completions.create(model="default", prompt=list(ids), **GREEDY)  # a prompt of token ids
    assert by_ids.choices[0].text == r.choices[0].text and by_ids.usage.prompt_tokens == len(ids)


def test_a_seed_gives_the_same_sample_through_both_doors(door, oa):
    kw = dict(model="default", prompt="once upon", max_tokens=16, temperature=0.9, seed=1234)
    a, b = (oa.completions.create(**kw).choices[0].text for _ in range(2))
    assert a == b == _grpc_text(door, prompt="once upon", max_tokens=16, temperature=0.9, sampling={"seed": 1234})


def test_streamed_chat_is_the_unary_text_with_role_finish_and_usage(oa):
    unary = oa.chat.completions.create(model="default", messages=MESSAGES, **GREEDY)
    chunks = list(oa.chat.completions.create(model="default", messages=MESSAGES, stream=True,
                                             stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == unary.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [unary.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == unary.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_streamed_completion_ends_with_done(door):
    body = dict(model="default", prompt="the cat", stream=True, **GREEDY)
    with httpx.stream("POST", f"http://127.0.0.1:{door.server.http_port}/v1/completions", json=body,
                      timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["specserve"]["request_id"] == r.headers["x-request-id"]
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text == _grpc_text(door, prompt="the cat", max_tokens=24, temperature=0)


def test_stop_strings_and_unknown_fields(oa):
    full = oa.completions.create(model="default", prompt="the cat", **GREEDY).choices[0].text
    assert len(full) > 4
    cut = full[2:4]
    r = oa.completions.create(model="default", prompt="the cat", stop=[cut], extra_body={"no_such_field": [1]},
                              user="someone", **GREEDY)
    assert r.choices[0].text == full[:full.index(cut)] and r.choices[0].finish_reason == "stop"


def test_the_vendor_speculative_field_sets_this_requests_drafting(oa):
    base = dict(model="default", prompt="the cat sat", **GREEDY)
    on = oa.completions.create(**base).model_extra["specserve"]
    off = oa.completions.create(**base, extra_body={"speculative": {"type": "none"}}).model_extra["specserve"]
    assert on["drafted"] > 0 and off["drafted"] == 0
    spelled = oa.completions.create(**base, extra_body={"speculative.n_max": 1}).model_extra["specserve"]
    assert spelled["drafted"] > 0
    with pytest.raises(openai.BadRequestError) as e:  # more drafts than the pair's plan has rows for
        oa.completions.create(**base, extra_body={"speculative": {"n_max": 64}})
    assert e.value.param == "speculative" and "n_max" in e.value.message


def test_models_and_health(door, oa):
    assert [m.id for m in oa.models.list().data] == ["default"]
    assert oa.models.retrieve("default").id == "default"
    with pytest.raises(openai.NotFoundError):
        oa.models.retrieve("nope")
    r = httpx.get(f"http://127.0.0.1:{door.server.http_port}/health", timeout=10)
    assert r.status_code == 200 and r.json() == {"status": "SERVING"}


def test_health_is_503_while_no_pair_is_ready(tiny_models_dir):
    c = start_server(replace(tiny_config(tiny_models_dir, startup=False), http_port=0))
    try:
        r = httpx.get(f"http://127.0.0.1:{c.server.http_port}/health", timeout=10)
        assert r.status_code == 503 and r.json() == {"status": "NOT_SERVING"}
        with pytest.raises(openai.BadRequestError) as e:  # FAILED_PRECONDITION: nothing loaded
            _client(c.server.http_port).completions.create(model="default", prompt="x")
        assert e.value.code == "failed_precondition" and "Load" in e.value.message
    finally:
        stop_server(c)


# ---- errors ----

def _error(exc: openai.APIStatusError) -> dict:
    body = exc.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize("kw, param", [
    (dict(temperature=-1), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(max_tokens=-3), "max_tokens"),
    (dict(stop=["", "x"]), "stop"),
    (dict(stop=[str(i) for i in range(17)]), "stop"),
    (dict(messages=[]), "messages"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     "messages.0.content.0"),
    (dict(logprobs=False, top_logprobs=2), "top_logprobs"),
    (dict(seed=-1), "seed"),
])
def test_a_bad_request_is_400_in_openais_shape(door, oa, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        oa.chat.completions.create(model="default", **{"messages": MESSAGES, **kw})
    err = _error(e.value)
    assert e.value.status_code == 400 and err["type"] == "invalid_request_error"
    assert err["code"] == "invalid_argument" and err["param"] == param and err["message"]
    assert door.wait_idle().active_slots == 0  # the server keeps serving, nothing left behind


def test_bodies_that_are_not_requests(door):
    base = f"http://127.0.0.1:{door.server.http_port}/v1"
    for body in (b"{not json", b"[]", b'{"messages": "hi"}'):
        r = httpx.post(f"{base}/chat/completions", content=body, timeout=10)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", body
    r = httpx.post(f"{base}/completions", content=b"x" * (17 << 20), timeout=30)  # over --max-message-size
    assert r.status_code == 413 and "max-message-size" in r.json()["error"]["message"]
    r = httpx.post(f"{base}/completions", json={"prompt": "x" * ((1 << 20) + 1)}, timeout=30)
    assert r.status_code == 400 and "max-prompt-bytes" in r.json()["error"]["message"]
    r = httpx.get(f"{base}/chat/completions", timeout=10)
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(f"{base}/embeddings", json={}, timeout=10)  # not served: 404 in the same shape
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


SCALARS = st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=False, allow_infinity=False) | \
    st.text(max_size=8)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) |
                    st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
FIELDS = ("model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed",
          "stop", "n", "stream", "stream_options", "logprobs", "top_logprobs", "response_format", "speculative",
          "top_k", "min_p", "repeat_penalty", "presence_penalty", "tools", "echo", "best_of", "speculative.n_max")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]),
       body=st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), JSON, max_size=6),
       messages=st.booleans())
def test_any_json_body_is_answered_without_a_server_error(door, path, body, messages):
    if messages:  # often a valid prompt, so the other fields get checked too
        body.setdefault("messages", [{"role": "user", "content": "hi"}])
        body.setdefault("prompt", "hi")
    for name in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(name), int):
            body[name] = min(body[name], 4)
    r = httpx.post(f"http://127.0.0.1:{door.server.http_port}{path}", json=body, timeout=60)
    assert r.status_code in (200, 400, 404, 501), (r.status_code, r.text)
    if r.status_code != 200:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_an_unknown_model_is_404(oa):
    for model in ("gpt-4o", "no/such:model"):
        with pytest.raises(openai.NotFoundError) as e:
            oa.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2)
        err = _error(e.value)
        assert err["code"] == "model_not_found" and err["param"] == "model" and err["type"] == "not_found_error"


def test_fields_this_server_cannot_honour_are_501_not_dropped(oa):
    for kw in (dict(presence_penalty=0.5), dict(frequency_penalty=1.0), dict(logit_bias={"5": 10}),
               dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])):
        with pytest.raises(openai.APIStatusError) as e:
            oa.chat.completions.create(model="default", messages=MESSAGES, max_tokens=2, **kw)
        assert e.value.status_code == 501 and _error(e.value)["param"] == next(iter(kw))
    r = oa.chat.completions.create(model="default", messages=MESSAGES, max_tokens=2, presence_penalty=0)
    assert r.choices[0].finish_reason  # a neutral value is served


def test_request_ids(door):
    url = f"http://127.0.0.1:{door.server.http_port}/v1/completions"
    body = {"prompt": "the", "max_tokens": 1}
    r = httpx.post(url, json=body, headers={"x-request-id": "my-id-42"}, timeout=30)
    assert r.status_code == 200 and r.headers["x-request-id"] == "my-id-42" and r.json()["id"] == "cmpl-my-id-42"
    r = httpx.post(url, json=body, headers={"x-request-id": "has space"}, timeout=30)
    assert r.status_code == 400 and "x-request-id" in r.json()["error"]["message"]


# ---- cancellation ----

def test_closing_a_stream_frees_its_slot_at_once(door, oa):
    m = door.server.metrics
    before = m.value("specserve_requests_total", method=CHAT_PATH, code="CANCELLED")
    tokens_before = m.value("specserve_completion_tokens_total", pair="default")
    stream = oa.chat.completions.create(model="default", messages=MESSAGES, stream=True, temperature=0,
                                        max_tokens=900, extra_body={"speculative": {"type": "none"}})
    seen = 0
    for chunk in stream:
        seen += bool(chunk.choices and chunk.choices[0].delta.content)
        if seen >= 2:
            break
    assert door.pair_info().active_slots == 1
    t0 = time.monotonic()
    stream.close()
    door.wait_idle(timeout=10)
    freed_s = time.monotonic() - t0
    generated = m.value("specserve_completion_tokens_total", pair="default") - tokens_before
    assert generated < 900, "the generation ran to its end: the disconnect was not seen"
    assert m.value("specserve_requests_total", method=CHAT_PATH, code="CANCELLED") == before + 1
    assert freed_s < 5, freed_s
    assert door.server.in_flight.wait_idle(5)  # the drain would not wait for it


def test_a_unary_client_that_gives_up_frees_its_slot(door):
    m = door.server.metrics
    before = m.value("specserve_requests_total", method="POST /v1/completions", code="CANCELLED")
    tokens_before = m.value("specserve_completion_tokens_total", pair="default")
    body = {"prompt": "the cat", "max_tokens": 900, "temperature": 0, "speculative": {"type": "none"}}
    with pytest.raises(httpx.ReadTimeout):  # the client closes the connection when its timeout passes
        httpx.post(f"http://127.0.0.1:{door.server.http_port}/v1/completions", json=body, timeout=0.3)
    door.wait_idle(timeout=10)
    assert m.value("specserve_completion_tokens_total", pair="default") - tokens_before < 900
    deadline = time.monotonic() + 5
    while m.value("specserve_requests_total", method="POST /v1/completions", code="CANCELLED") == before:
        assert time.monotonic() < deadline, "the request was not recorded as cancelled"
        time.sleep(0.02)


def test_a_pair_unloaded_under_a_stream_ends_it_with_an_error_event(tiny_models_dir):
    c = start_server(replace(tiny_config(tiny_models_dir, n_parallel=1, n_ctx=2048), http_port=0))
    try:
        stream = _client(c.server.http_port).completions.create(
            model="default", prompt="the cat", max_tokens=1500, temperature=0, stream=True,
            extra_body={"speculative": {"type": "none"}})
        chunks = iter(stream)
        assert next(chunks).choices[0].text is not None  # generating
        unload = threading.Thread(target=c.model.Unload, args=(pb.UnloadRequest(name="default",
                                                                               drain_timeout_seconds=0.05),))
        unload.start()
        with pytest.raises(openai.APIError) as e:
            for _ in chunks:
                pass
        unload.join(30)
        assert "cancelled by the server" in str(e.value)
        assert c.server.metrics.value("specserve_requests_total", method="POST /v1/completions",
                                      code="UNAVAILABLE") == 1
    finally:
        stop_server(c)


# ---- security: the gRPC port's token file and TLS files ----

GEN_TOKEN, ADMIN_TOKEN = "gen-http-1f", "adm-http-2e"


def test_bearer_tokens_as_grpc(tiny_models_dir, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"generate:{GEN_TOKEN}\nadmin:{ADMIN_TOKEN}\n")
    c = start_server(replace(tiny_config(tiny_models_dir, n_parallel=1, n_ctx=512), http_port=0,
                             auth_token_file=str(tokens), metrics_port=0))
    port = c.server.http_port
    try:
        for key in ("wrong", GEN_TOKEN + "x"):
            with pytest.raises(openai.AuthenticationError) as e:
                _client(port, key=key).completions.create(model="default", prompt="x", max_tokens=1)
            assert _error(e.value)["type"] == "authentication_error"
            with pytest.raises(openai.AuthenticationError):
                _client(port, key=key).models.list()
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "x"}, timeout=10)  # no header
        assert r.status_code == 401 and "Bearer" in r.json()["error"]["message"]
        for key in (GEN_TOKEN, ADMIN_TOKEN):  # both roles may generate and list (Generate, ListPairs)
            oa = _client(port, key=key)
            assert oa.completions.create(model="default", prompt="x", max_tokens=1).usage.completion_tokens >= 0
            assert [m.id for m in oa.models.list().data] == ["default"]
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200  # open, as gRPC's
        assert c.server.metrics.value("specserve_requests_total", method="POST /v1/completions",
                                      code="UNAUTHENTICATED") == 3
    finally:
        stop_server(c)


def test_tls_from_the_grpc_ports_files(tiny_models_dir, tmp_path):
    from tests.test_tls import make_pki

    pki = make_pki(tmp_path)
    c = start_server(replace(tiny_config(tiny_models_dir, n_parallel=1, n_ctx=512), http_port=0,
                             tls_cert=str(pki.server_cert), tls_key=str(pki.server_key)))
    port = c.server.http_port
    try:
        trusting = httpx.Client(verify=ssl.create_default_context(cafile=str(pki.ca)))
        oa = _client(port, scheme="https", http_client=trusting)
        assert oa.completions.create(model="default", prompt="x", max_tokens=2).choices[0].finish_reason
        assert trusting.get(f"https://127.0.0.1:{port}/health", timeout=10).status_code == 200
        with pytest.raises(httpx.ConnectError):  # a client that does not trust the server's CA
            httpx.get(f"https://127.0.0.1:{port}/health", timeout=10,
                      verify=ssl.create_default_context(cafile=str(pki.other_ca)))
        with pytest.raises(httpx.TransportError):  # plaintext to the TLS port
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=10)
    finally:
        stop_server(c)


def test_mutual_tls_asks_every_http_client_for_a_certificate(tiny_models_dir, tmp_path):
    from tests.test_tls import make_pki

    pki = make_pki(tmp_path)
    c = start_server(replace(tiny_config(tiny_models_dir, n_parallel=1, n_ctx=512), http_port=0,
                             tls_cert=str(pki.server_cert), tls_key=str(pki.server_key), tls_client_ca=str(pki.ca)))
    url = f"https://127.0.0.1:{c.server.http_port}/health"
    try:
        with_cert = ssl.create_default_context(cafile=str(pki.ca))
        with_cert.load_cert_chain(str(pki.client_cert), str(pki.client_key))
        assert httpx.get(url, verify=with_cert, timeout=10).status_code == 200
        with pytest.raises(httpx.TransportError):  # no client certificate: refused, /health included
            httpx.get(url, verify=ssl.create_default_context(cafile=str(pki.ca)), timeout=10)
    finally:
        stop_server(c)


def test_the_drain_lets_a_stream_finish_and_refuses_new_requests(tiny_models_dir):
    c = start_server(replace(tiny_config(tiny_models_dir, n_parallel=2, n_ctx=2048), http_port=0))
    base = f"http://127.0.0.1:{c.server.http_port}"
    body = {"prompt": "the cat", "max_tokens": 900, "temperature": 0, "stream": True,
            "speculative": {"type": "none"}}
    drain = threading.Thread(target=c.server.drain_and_stop, kwargs={"grace": 60})
    try:
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")  # generating
            drain.start()
            while c.server.registry.any_ready():  # until the registry refuses new requests
                time.sleep(0.01)
            health = httpx.get(f"{base}/health", timeout=10)
            refused = httpx.post(f"{base}/v1/completions", json={"prompt": "x"}, timeout=10)
            rest = [line for line in lines if line]
        assert health.status_code == 503 and refused.status_code == 503
        assert refused.json()["error"]["type"] == "service_unavailable_error"
        assert rest[-1] == "data: [DONE]" and json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
        drain.join(30)
        assert not drain.is_alive()
    finally:
        c.channel.close()
        if not drain.is_alive():
            c.server.stop()
