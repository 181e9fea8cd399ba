"""The contract in proto/: stubs are fresh, buf STANDARD-style naming holds, every element has a comment,
and the names clients rely on are there."""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
PB_DIR = ROOT / "service" / "pb"


def _gen_proto_module():
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in d.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}


def _generated_with(text: str) -> str:
    m = re.search(r"^GRPC_GENERATED_VERSION = '([^']+)'", text, re.M)
    return m.group(1) if m else ""


def _embedded_descriptor(pb2_source: str) -> descriptor_pb2.FileDescriptorProto:
    """The FileDescriptorProto a generated _pb2.py registers (its AddSerializedFile literal)."""
    tree = ast.parse(pb2_source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "AddSerializedFile":
            fd = descriptor_pb2.FileDescriptorProto()
            fd.ParseFromString(ast.literal_eval(node.args[0]))
            return fd
    raise AssertionError("no AddSerializedFile call in the generated module")


def test_generated_stubs_are_fresh(tmp_path):
    """service/pb equals a fresh `python scripts/gen_proto.py` (run `make proto` if not).

    The descriptors are compared whatever the grpcio-tools version; the files byte for byte when
    the installed grpcio-tools is the one that generated service/pb (its version is in the stubs).
    """
    _gen_proto_module().generate(tmp_path / "pb")
    fresh, committed = _files(tmp_path / "pb"), _files(PB_DIR)
    assert sorted(fresh) == sorted(committed), "service/pb is stale: run `make proto`"
    for name in (n for n in fresh if n.endswith("_pb2.py")):
        assert _embedded_descriptor(fresh[name].decode()) == _embedded_descriptor(committed[name].decode()), \
            f"service/pb/{name} is stale (the .proto changed): run `make proto`"
    grpc_files = [n for n in fresh if n.endswith("_pb2_grpc.py")]
    same_tools = all(_generated_with(fresh[n].decode()) == _generated_with(committed[n].decode()) for n in grpc_files)
    if same_tools:
        stale = [name for name in fresh if fresh[name] != committed[name]]
        assert not stale, f"service/pb is stale ({', '.join(stale)}): run `make proto`"


def test_stubs_import_under_service_pb():
    from service.pb.specserve.v1 import specserve_pb2, specserve_pb2_grpc

    assert specserve_pb2.DESCRIPTOR.package == "specserve.v1"
    assert hasattr(specserve_pb2_grpc, "GenerationServiceStub")
    assert hasattr(specserve_pb2_grpc, "add_ModelServiceServicer_to_server")


@pytest.fixture(scope="module")
def fds(tmp_path_factory) -> descriptor_pb2.FileDescriptorSet:
    """The proto files compiled with source info (comments)."""
    import grpc_tools
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("fds") / "set.pb"
    files = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    include = Path(grpc_tools.__file__).parent / "_proto"
    rc = protoc.main(["protoc", f"-I{PROTO_DIR}", f"-I{include}", "--include_source_info",
                      f"--descriptor_set_out={out}", *[str(PROTO_DIR / f) for f in files]])
    assert rc == 0
    s = descriptor_pb2.FileDescriptorSet()
    s.ParseFromString(out.read_bytes())
    return s


def _comments(fd: descriptor_pb2.FileDescriptorProto) -> dict[tuple, str]:
    return {tuple(loc.path): loc.leading_comments + loc.trailing_comments for loc in fd.source_code_info.location}


def _elements(fd):
    """(path, what) of every message, field, oneof, enum, enum value, service and rpc in a file."""

    def message(path, m, prefix):
        yield path, f"message {prefix}{m.name}"
        for i, f in enumerate(m.field):
            yield path + (2, i), f"field {prefix}{m.name}.{f.name}"
        for i, o in enumerate(m.oneof_decl):
            if not o.name.startswith("_"):  # proto3 `optional` makes synthetic oneofs
                yield path + (8, i), f"oneof {prefix}{m.name}.{o.name}"
        for i, n in enumerate(m.nested_type):
            yield from message(path + (3, i), n, f"{prefix}{m.name}.")
        for i, e in enumerate(m.enum_type):
            yield from enum(path + (4, i), e)

    def enum(path, e):
        yield path, f"enum {e.name}"
        for i, v in enumerate(e.value):
            yield path + (2, i), f"enum value {v.name}"

    for i, m in enumerate(fd.message_type):
        yield from message((4, i), m, "")
    for i, e in enumerate(fd.enum_type):
        yield from enum((5, i), e)
    for i, s in enumerate(fd.service):
        yield (6, i), f"service {s.name}"
        for j, r in enumerate(s.method):
            yield (6, i, 2, j), f"rpc {s.name}.{r.name}"


def test_every_element_has_a_comment(fds):
    missing = []
    for fd in fds.file:
        comments = _comments(fd)
        missing += [f"{fd.name}: {what}" for path, what in _elements(fd) if not comments.get(path, "").strip()]
    assert not missing, "elements without a comment:\n" + "\n".join(missing)


def _upper_snake(name: str) -> str:
    out = ""
    for i, c in enumerate(name):
        if c.isupper() and i and not name[i - 1].isupper():
            out += "_"
        out += c.upper()
    return out


def test_buf_standard_naming(fds):
    """PACKAGE_VERSION_SUFFIX, PACKAGE_DIRECTORY_MATCH, ENUM_ZERO_VALUE_SUFFIX, ENUM_VALUE_PREFIX,
    RPC_REQUEST_STANDARD_NAME, RPC_RESPONSE_STANDARD_NAME, RPC_REQUEST_RESPONSE_UNIQUE, SERVICE_SUFFIX."""
    used: dict[str, str] = {}
    for fd in fds.file:
        assert fd.package == "specserve.v1"
        assert Path(fd.name).parent.as_posix() == fd.package.replace(".", "/")
        for e in fd.enum_type:
            prefix = _upper_snake(e.name) + "_"
            assert e.value[0].number == 0 and e.value[0].name == prefix + "UNSPECIFIED", e.name
            assert all(v.name.startswith(prefix) for v in e.value), e.name
        for m in fd.message_type:
            assert m.name[0].isupper() and "_" not in m.name
            assert all(f.name == f.name.lower() for f in m.field), m.name
        for s in fd.service:
            assert s.name.endswith("Service")
            for r in s.method:
                assert r.input_type == f".specserve.v1.{r.name}Request", r.name
                assert r.output_type == f".specserve.v1.{r.name}Response", r.name
                for t in (r.input_type, r.output_type):
                    assert t not in used, f"{t} used by {used.get(t)} and {r.name}"
                    used[t] = r.name


def test_contract_names():
    """The names and meanings that clients rely on: services, RPCs, enum values, fields."""
    from service.pb.specserve.v1 import specserve_pb2 as pb

    def fields(msg) -> set[str]:
        return set(msg.DESCRIPTOR.fields_by_name)

    services = pb.DESCRIPTOR.services_by_name
    assert {"Fit", "Load", "Unload", "ListPairs", "GetSpeculativeConfig", "UpdateSpeculativeConfig"} <= \
        set(services["ModelService"].methods_by_name)
    gen = services["GenerationService"].methods_by_name
    assert {"Generate", "GenerateStream", "Tokenize", "Detokenize"} <= set(gen)
    assert gen["GenerateStream"].server_streaming and not gen["Generate"].server_streaming
    assert {"name", "target_path", "draft_path", "params", "speculative", "memory_budget_bytes"} <= fields(pb.PairSpec)
    assert {"n_ctx", "n_parallel", "n_batch", "n_outputs_max"} <= fields(pb.ContextParams)
    assert {"owner", "kind", "device", "bytes"} <= fields(pb.Buffer)
    assert {"buffers", "total_bytes", "budget_bytes", "target", "draft"} <= fields(pb.Plan)
    assert fields(pb.FitRequest) == {"pair"} and fields(pb.LoadRequest) == {"pair"}
    assert {"fits", "plan", "adjustments"} <= fields(pb.FitResponse)
    assert {"plan", "allocated"} <= fields(pb.LoadResponse)
    assert {"name", "plan", "allocated", "speculative"} <= fields(pb.PairInfo)
    assert {"type", "n_max", "n_min", "p_min", "ngram_min", "ngram_max"} <= fields(pb.SpeculativeConfig)
    assert {"DRAFTER_TYPE_NONE", "DRAFTER_TYPE_DRAFT_MODEL", "DRAFTER_TYPE_NGRAM"} <= set(pb.DrafterType.keys())
    req = pb.GenerateRequest.DESCRIPTOR
    assert {f.name for f in req.oneofs_by_name["input"].fields} == {"prompt", "messages", "tokens"}
    assert {"pair", "max_tokens", "stop", "sampling", "speculative"} <= fields(pb.GenerateRequest)
    assert {"temperature", "top_k", "top_p", "min_p", "repeat_penalty", "seed"} <= fields(pb.SamplingParams)
    assert pb.SamplingParams.DESCRIPTOR.fields_by_name["temperature"].has_presence  # unset != 0 (greedy)
    assert fields(pb.ChatMessage) == {"role", "content"} and fields(pb.TokenIds) == {"ids"}
    summary = {"text", "tokens", "finish_reason", "usage", "speculative_stats", "timings"}
    assert summary <= fields(pb.GenerateResponse) and summary <= fields(pb.GenerateStreamResponse)
    assert fields(pb.Usage) == {"prompt_tokens", "completion_tokens", "cached_prompt_tokens"}
    assert {"drafted", "accepted"} <= fields(pb.SpeculativeStats)
    assert {"pair", "text", "add_special"} <= fields(pb.TokenizeRequest) and fields(pb.TokenizeResponse) == {"tokens"}


def _shape(desc) -> list[tuple]:
    return [(f.name, f.number, f.type, f.is_repeated, f.message_type and f.message_type.full_name,
             f.containing_oneof and f.containing_oneof.name, f.has_presence) for f in desc.fields]


def test_stream_request_mirrors_generate_request():
    """One JSON body serves Generate and GenerateStream; one converter reads both."""
    from service.pb.specserve.v1 import specserve_pb2 as pb

    assert _shape(pb.GenerateStreamRequest.DESCRIPTOR) == _shape(pb.GenerateRequest.DESCRIPTOR)
    resp = {s[0]: s[1:] for s in _shape(pb.GenerateResponse.DESCRIPTOR)}
    stream = {s[0]: s[1:] for s in _shape(pb.GenerateStreamResponse.DESCRIPTOR)}
    # the same fields under the same numbers, except that a unary response carries all n completions
    # (choices) and a stream message names the one it belongs to (index), both as field 10
    assert resp.pop("choices")[0] == stream.pop("index")[0] == 10
    assert resp == stream


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
