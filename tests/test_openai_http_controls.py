"""The generation controls through the OpenAI HTTP door, with the official `openai` package:
logprobs / top_logprobs, response_format (json_object, json_schema) and n = 2, unary and streamed.

They run against the packaged SmolLM2 (a model that writes JSON when asked)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace

import openai
import pytest

from service.fit.factory import PairRequest
from service.fit.params import ContextParams, SpeculativeConfig
from service.server import ServerConfig
from tests.conftest import start_server, stop_server

ASK = [{"role": "user", "content": "Describe a cat as JSON."}]
SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"enum": ["black", "white", "orange", "grey"]},
        "indoor": {"type": "boolean"},
        "toys": {"type": "array", "items": {"enum": ["ball", "mouse", "string"]}, "maxItems": 3},
    },
    "required": ["color", "indoor", "toys"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def oa(real_model):
    """SmolLM2-135M with the n-gram drafter, 2 slots of 512 cells, the HTTP door on a free port."""
    params = ContextParams(n_ctx=1024, n_parallel=2, n_batch=64)
    spec = SpeculativeConfig(type="ngram", n_max=4)
    req = PairRequest(name="default", target_path=real_model, params=params, speculative=spec)
    c = start_server(replace(ServerConfig(models_dir=os.path.dirname(real_model), startup=req, params=params,
                                          speculative=spec, default_target=real_model, backend="numpy", threads=1,
                                          max_tokens=48),
                             http_port=0), ready_timeout=300)
    yield openai.OpenAI(base_url=f"http://127.0.0.1:{c.server.http_port}/v1", api_key="unused", max_retries=0,
                        timeout=300)
    stop_server(c)


def _check_token_logprobs(content, k: int, text: str) -> None:
    """One entry per token, k alternatives each, most likely first; greedy: the chosen token is the first."""
    assert content and "".join(t.token for t in content) == text
    for t in content:
        assert t.logprob <= 0 and math.isfinite(t.logprob)
        assert len(t.top_logprobs) == k
        lps = [a.logprob for a in t.top_logprobs]
        assert lps == sorted(lps, reverse=True)
        assert t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == pytest.approx(t.logprob)
        assert bytes(t.bytes).decode("utf-8", "replace") == t.token


def test_chat_logprobs_with_top_alternatives(oa):
    r = oa.chat.completions.create(model="default", messages=ASK, max_tokens=12, temperature=0, logprobs=True,
                                   top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    _check_token_logprobs(content, 3, r.choices[0].message.content)


def test_streamed_logprobs_are_the_unary_ones(oa):
    kw = dict(model="default", messages=ASK, max_tokens=12, temperature=0, logprobs=True, top_logprobs=2)
    unary = oa.chat.completions.create(**kw).choices[0].logprobs.content
    streamed = [t for c in oa.chat.completions.create(stream=True, **kw) if c.choices and c.choices[0].logprobs
                for t in c.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in unary]


def test_completion_logprobs_in_the_legacy_shape(oa):
    r = oa.completions.create(model="default", prompt="The capital of France is", max_tokens=8, temperature=0,
                              logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    assert "".join(lp.tokens) == r.choices[0].text
    assert all(len(top) <= 2 and max(top.values()) == pytest.approx(v) for top, v in zip(lp.top_logprobs,
                                                                                          lp.token_logprobs))
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_response_format_json_schema(oa):
    for temperature in (0, 0.8):
        r = oa.chat.completions.create(
            model="default", messages=ASK, max_tokens=96, temperature=temperature, seed=3,
            response_format={"type": "json_schema", "json_schema": {"name": "cat", "schema": SCHEMA, "strict": True}})
        assert r.choices[0].finish_reason == "stop"
        cat = json.loads(r.choices[0].message.content)
        assert set(cat) == {"color", "indoor", "toys"}
        assert cat["color"] in SCHEMA["properties"]["color"]["enum"] and isinstance(cat["indoor"], bool)
        assert len(cat["toys"]) <= 3 and set(cat["toys"]) <= {"ball", "mouse", "string"}


def test_response_format_json_object(oa):
    r = oa.chat.completions.create(model="default", messages=ASK, max_tokens=96, temperature=0,
                                   response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop" and isinstance(json.loads(r.choices[0].message.content), dict)


def test_an_invalid_schema_is_400(oa):
    with pytest.raises(openai.BadRequestError) as e:
        oa.chat.completions.create(model="default", messages=ASK, max_tokens=8, response_format={
            "type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "no-such-type"}}})
    assert e.value.param == "response_format" or "schema" in e.value.message


def test_n_2_gives_two_indexed_choices(oa):
    kw = dict(model="default", messages=ASK, max_tokens=16, temperature=0.8, seed=11, n=2)
    r = oa.chat.completions.create(**kw)
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.finish_reason in ("stop", "length") and c.message.content for c in r.choices)
    again = oa.chat.completions.create(**kw)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]  # seeded
    chunks = list(oa.chat.completions.create(stream=True, **kw))
    texts = {0: "", 1: ""}
    finished = set()
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finished.add(ch.index)
    assert finished == {0, 1}
    assert [texts[0], texts[1]] == [c.message.content for c in r.choices]
