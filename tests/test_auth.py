"""Token authentication over real gRPC (--auth-token-file): no or a wrong token is UNAUTHENTICATED, a
role that does not cover the method is PERMISSION_DENIED, the right role is served, and health and
reflection stay open."""

from __future__ import annotations

from dataclasses import replace

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from service.edge.auth import parse_token_file
from service.pb.specserve.v1 import specserve_pb2 as pb
from service.pb.specserve.v1 import specserve_pb2_grpc as pb_grpc
from service.rpc.auth import BearerToken
from tests.conftest import TINY, start_server, stop_server, tiny_config

GEN_TOKEN, ADMIN_TOKEN = "gen-5b1f0c", "adm-93e7aa"
UNAUTH, DENIED = grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED


@pytest.fixture(scope="module")
def server(tiny_models_dir, tmp_path_factory):
    tokens = tmp_path_factory.mktemp("auth") / "tokens"
    tokens.write_text(f"# role:token\ngenerate:{GEN_TOKEN}\n\nadmin:{ADMIN_TOKEN}\n")
    c = start_server(replace(tiny_config(tiny_models_dir, n_parallel=2, n_ctx=512, metrics_port=0),
                             auth_token_file=str(tokens)))
    yield c
    stop_server(c)


def _bearer(token: str):
    return (("authorization", f"Bearer {token}"),)


def _calls(c):
    """(method, call(metadata)) for one RPC of each kind; the generate role covers the first five."""
    g, m = c.gen, c.model
    greedy = dict(max_tokens=2, sampling=pb.SamplingParams(temperature=0))
    return {
        "Generate": lambda md: g.Generate(pb.GenerateRequest(prompt="the cat", **greedy), metadata=md, timeout=30),
        "GenerateStream": lambda md: list(g.GenerateStream(pb.GenerateStreamRequest(prompt="the", **greedy),
                                                           metadata=md, timeout=30)),
        "Tokenize": lambda md: g.Tokenize(pb.TokenizeRequest(text="the cat"), metadata=md, timeout=30),
        "ListPairs": lambda md: m.ListPairs(pb.ListPairsRequest(), metadata=md, timeout=30),
        "GetSpeculativeConfig": lambda md: m.GetSpeculativeConfig(pb.GetSpeculativeConfigRequest(), metadata=md,
                                                                  timeout=30),
        "Fit": lambda md: m.Fit(pb.FitRequest(pair=pb.PairSpec(target_path=TINY)), metadata=md, timeout=30),
        "UpdateSpeculativeConfig": lambda md: m.UpdateSpeculativeConfig(
            pb.UpdateSpeculativeConfigRequest(config=pb.SpeculativeConfig(n_max=4)), metadata=md, timeout=30),
        "Unload": lambda md: m.Unload(pb.UnloadRequest(name="no-such-pair"), metadata=md, timeout=30),
    }


GENERATE_ROLE = {"Generate", "GenerateStream", "Tokenize", "ListPairs", "GetSpeculativeConfig"}


def _code(call, md) -> grpc.StatusCode:
    try:
        call(md)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def test_no_token_or_a_wrong_one_is_unauthenticated(server):
    c = server
    before = c.server.metrics.value("specserve_requests_total", method="/specserve.v1.GenerationService/Generate",
                                    code="UNAUTHENTICATED")
    for name, call in _calls(c).items():
        for md in ((), _bearer("not-a-token"), (("authorization", GEN_TOKEN),), _bearer(GEN_TOKEN + "x")):
            assert _code(call, md) == UNAUTH, (name, md)
    with pytest.raises(grpc.RpcError) as e:
        c.gen.Generate(pb.GenerateRequest(prompt="x"), timeout=30)
    assert "Bearer" in e.value.details() and "x-request-id" in dict(e.value.trailing_metadata())
    after = c.server.metrics.value("specserve_requests_total", method="/specserve.v1.GenerationService/Generate",
                                   code="UNAUTHENTICATED")
    assert after == before + 5  # refusals are counted like any other status


def test_the_generate_role_may_generate_and_read_but_not_administer(server):
    for name, call in _calls(server).items():
        want = grpc.StatusCode.OK if name in GENERATE_ROLE else DENIED
        assert _code(call, _bearer(GEN_TOKEN)) == want, name


def test_the_admin_role_may_call_everything(server):
    for name, call in _calls(server).items():
        want = grpc.StatusCode.NOT_FOUND if name == "Unload" else grpc.StatusCode.OK  # no such pair: past auth
        assert _code(call, _bearer(ADMIN_TOKEN)) == want, name


def test_health_and_reflection_stay_open(server):
    c = server
    assert c.health_status() == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(c.channel)
    replies = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                             timeout=10))
    names = {s.name for s in replies[0].list_services_response.service}
    assert "specserve.v1.GenerationService" in names


def test_the_client_interceptor_sends_the_token(server):
    channel = grpc.intercept_channel(grpc.insecure_channel(server.address), BearerToken(GEN_TOKEN))
    try:
        gen = pb_grpc.GenerationServiceStub(channel)
        assert gen.Tokenize(pb.TokenizeRequest(text="the cat"), timeout=30).tokens
        assert list(gen.GenerateStream(pb.GenerateStreamRequest(prompt="the", max_tokens=2), timeout=30))
    finally:
        channel.close()


@pytest.mark.parametrize("text, needle", [
    ("", "holds no tokens"), ("# only a comment\n", "holds no tokens"), ("generate\n", "line 1"),
    ("reader:abc\n", "line 1"), ("admin:\n", "line 1"), ("admin:a\ngenerate:a\n", "line 2: the token is listed twice"),
])
def test_a_bad_token_file_is_refused_naming_the_line(text, needle):
    with pytest.raises(ValueError, match=needle):
        parse_token_file(text)
