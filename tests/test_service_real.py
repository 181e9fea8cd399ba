"""The packaged SmolLM2-135M behind real gRPC: generation, deadlines and cancellation free the slot,
and a prompt longer than the context. One session server (loading the model takes ~15 s)."""

from __future__ import annotations

import time

import grpc
import pytest

from service.pb.specserve.v1 import specserve_pb2 as pb

GREEDY = pb.SamplingParams(temperature=0)


def test_generate_with_the_packaged_model(real_server):
    c = real_server
    r = c.gen.Generate(pb.GenerateRequest(prompt="The capital of France is", max_tokens=8, sampling=GREEDY),
                       timeout=120)
    assert r.usage.completion_tokens == len(r.tokens) > 0
    assert r.text.strip()
    assert "Paris" in r.text
    info = c.pair_info()
    assert info.speculative.type == pb.DRAFTER_TYPE_NGRAM and info.plan.target.n_parallel == 2


def test_chat_with_the_models_template(real_server):
    c = real_server
    msgs = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="Say hello.")])
    msgs_stream = list(c.gen.GenerateStream(pb.GenerateStreamRequest(messages=msgs, max_tokens=6, sampling=GREEDY),
                                            timeout=120))
    final = msgs_stream[-1]
    assert final.finish_reason != pb.FINISH_REASON_UNSPECIFIED
    assert final.usage.prompt_tokens > 20  # the template's default system prompt
    assert "".join(m.text for m in msgs_stream).strip()


def test_a_deadline_mid_generation_frees_the_slot(real_server):
    """Greedy, so the generation is the same long count every run (a sampled one may end at an
    end-of-generation token before the deadline)."""
    c = real_server
    greedy = pb.SamplingParams(temperature=0)
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        c.gen.Generate(pb.GenerateRequest(prompt="Count from one to one hundred:", max_tokens=200, sampling=greedy),
                       timeout=2.0)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - t0 < 10
    c.wait_idle(timeout=10)
    stream = c.gen.GenerateStream(pb.GenerateStreamRequest(prompt="Count from one to one hundred:", max_tokens=200,
                                                           sampling=greedy), timeout=3.0)
    with pytest.raises(grpc.RpcError) as e:
        for _ in stream:
            pass
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    c.wait_idle(timeout=10)


def test_a_client_that_cancels_a_stream_frees_the_slot(real_server):
    c = real_server
    stream = c.gen.GenerateStream(pb.GenerateStreamRequest(prompt="Count from one to one hundred:", max_tokens=200),
                                  timeout=120)
    first = next(stream)
    assert first.tokens
    assert c.pair_info().active_slots == 1
    stream.cancel()
    with pytest.raises(grpc.RpcError) as e:
        next(stream)
    assert e.value.code() == grpc.StatusCode.CANCELLED
    c.wait_idle(timeout=10)
    # the slot serves the next request
    r = c.gen.Generate(pb.GenerateRequest(prompt="Hi", max_tokens=2), timeout=120)
    assert r.usage.completion_tokens > 0


def test_a_unary_client_that_cancels_frees_the_slot(real_server):
    c = real_server
    fut = c.gen.Generate.future(pb.GenerateRequest(prompt="Count from one to one hundred:", max_tokens=200),
                                timeout=120)
    c.wait_busy()
    fut.cancel()
    c.wait_idle(timeout=10)


def test_a_prompt_longer_than_the_context_names_the_limit(real_server):
    c = real_server
    plan = c.pair_info().plan.target
    n_ctx_slot = plan.n_ctx // plan.n_parallel
    with pytest.raises(grpc.RpcError) as e:
        c.gen.Generate(pb.GenerateRequest(prompt="word " * (n_ctx_slot + 50), max_tokens=4), timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert str(n_ctx_slot) in e.value.details()
