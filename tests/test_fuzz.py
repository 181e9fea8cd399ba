"""Fuzzing over real gRPC (hypothesis): mutated GGUF headers through Fit (and Load when they still fit),
and request messages with random field values for Generate, GenerateStream, Fit, Load and Tokenize.
Every answer is a status of its meaning (never INTERNAL or UNKNOWN) within a time bound, and the
server still generates afterwards. About a minute in all on two cores.

GGUF mutations start from a valid tiny model (tests/tiny_gguf.py) and hit its structure: every
integer of the header (tensor and key counts, key and string lengths, value types, array counts,
tensor dims, types and offsets) set to an edge or random value, bytes overwritten, the file cut.
"""

from __future__ import annotations

import itertools
import math
import time

import gguf
import grpc
import numpy as np
import pytest
from google.protobuf.descriptor import FieldDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.pb.specserve.v1 import specserve_pb2 as pb
from tests.conftest import TINY, start_server, stop_server, tiny_config
from tests.tiny_gguf import write_tiny_llama

FIT_SECONDS = 5.0  # a refusal or plan of the tiny model takes milliseconds; this leaves room for a busy machine
GGUF_EXAMPLES = 1500
REQUEST_EXAMPLES = 500  # per RPC
NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
FUZZ = settings(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz-models")
    write_tiny_llama(d / TINY, n_ctx_train=512, seed=1)
    return d


@pytest.fixture(scope="module")
def server(fuzz_dir):
    c = start_server(tiny_config(fuzz_dir, n_parallel=2, n_ctx=512, max_tokens=16))
    yield c
    stop_server(c)


def _code(call) -> tuple[grpc.StatusCode, str, object]:
    try:
        return grpc.StatusCode.OK, "", call()
    except grpc.RpcError as e:
        return e.code(), e.details(), None


def _still_serves(c) -> None:
    r = c.gen.Generate(pb.GenerateRequest(prompt="the cat", max_tokens=3, sampling=pb.SamplingParams(temperature=0)),
                       timeout=30)
    assert r.usage.completion_tokens > 0


# ---- GGUF headers ----

def _int_slots(path) -> list[tuple[int, int]]:
    """(offset, size) of every integer of the header the reader parsed (counts, lengths, types, dims, offsets)."""
    r = gguf.GGUFReader(str(path))
    base = r.data.__array_interface__["data"][0]
    slots = {(8, 4), (8 + 4, 8), (8 + 4 + 8, 8)}  # version, tensor count, key count (after the magic)
    fields = list(r.fields.values()) + [t.field for t in r.tensors]
    for f in fields:
        for part in f.parts[:16]:  # a long array's first entries stand for the rest
            if isinstance(part, np.ndarray) and part.dtype.kind in "ui" and part.nbytes in (4, 8) and part.size == 1:
                slots.add((part.__array_interface__["data"][0] - base, part.nbytes))
    return sorted(slots)


EDGES = (0, 1, 2, 3, 7, 8, 255, 2 ** 15, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1, 2 ** 32, 2 ** 40, 2 ** 63 - 1, 2 ** 64 - 1)


@st.composite
def mutations(draw, slots, size: int, header_end: int):
    """A list of edits: ("int", offset, size, value) | ("bytes", offset, data) | ("cut", length)."""
    edit = st.one_of(
        st.tuples(st.just("int"), st.sampled_from(slots),
                  st.one_of(st.sampled_from(EDGES), st.integers(0, 2 ** 64 - 1))),
        st.tuples(st.just("bytes"), st.integers(0, header_end - 1), st.binary(min_size=1, max_size=8)),
        st.tuples(st.just("cut"), st.integers(0, size - 1)),
    )
    return draw(st.lists(edit, min_size=1, max_size=3))


def _apply(data: bytearray, edits) -> bytes:
    for e in edits:
        if e[0] == "int":
            (offset, n), value = e[1], e[2]
            data[offset:offset + n] = (value % (1 << (8 * n))).to_bytes(n, "little")
        elif e[0] == "bytes":
            data[e[1]:e[1] + len(e[2])] = e[2]
        else:
            del data[e[1]:]
    return bytes(data)


def test_mutated_gguf_headers_through_fit_and_load(server, fuzz_dir):
    good = (fuzz_dir / TINY).read_bytes()
    r = gguf.GGUFReader(str(fuzz_dir / TINY))
    header_end = int(r.tensors[0].data_offset)
    slots = _int_slots(fuzz_dir / TINY)
    names = (f"fuzz-{i}.gguf" for i in itertools.count())
    seen: dict[str, int] = {}
    c = server

    @settings(FUZZ, max_examples=GGUF_EXAMPLES)
    @given(mutations(slots, len(good), header_end))
    def check(edits):
        path = fuzz_dir / next(names)  # a new name each time: the parsed-file cache cannot answer
        path.write_bytes(_apply(bytearray(good), edits))
        try:
            t0 = time.monotonic()
            code, details, resp = _code(lambda: c.model.Fit(
                pb.FitRequest(pair=pb.PairSpec(name="fz", target_path=path.name)), timeout=30))
            elapsed = time.monotonic() - t0
            assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), \
                (code, details, edits)
            assert elapsed < FIT_SECONDS, (elapsed, edits)
            seen[code.name] = seen.get(code.name, 0) + 1
            if resp is not None and resp.fits:  # a file that still plans: Load it too (tokenizer, warm-up)
                pair = pb.PairSpec(name="fz", target_path=path.name, params=pb.ContextParams(n_ctx=128, n_parallel=1))
                code, details, _ = _code(lambda: c.model.Load(pb.LoadRequest(pair=pair), timeout=60))
                assert code not in NEVER, (code, details, edits)
                seen["load " + code.name] = seen.get("load " + code.name, 0) + 1
                if code == grpc.StatusCode.OK:
                    c.model.Unload(pb.UnloadRequest(name="fz"), timeout=30)
        finally:
            path.unlink()

    check()
    print("GGUF fuzz outcomes:", seen)
    assert seen.get("INVALID_ARGUMENT", 0) > GGUF_EXAMPLES // 4  # the mutations do reach the checks
    assert c.server.backend.ledger.total_bytes() == sum(
        s.nbytes for s in c.server.backend.ledger.entries("default"))  # every fuzzed Load was released
    _still_serves(c)


# ---- request messages ----

_INT_EDGES = {"int32": (0, 1, -1, 2 ** 31 - 1, -2 ** 31), "uint32": (0, 1, 2 ** 32 - 1, 2 ** 31),
              "int64": (0, 1, -1, 2 ** 63 - 1, -2 ** 63), "uint64": (0, 1, 2 ** 64 - 1, 2 ** 63)}
_INT_RANGE = {"int32": (-2 ** 31, 2 ** 31 - 1), "uint32": (0, 2 ** 32 - 1),
              "int64": (-2 ** 63, 2 ** 63 - 1), "uint64": (0, 2 ** 64 - 1)}
_TYPE_NAMES = {v: k.removeprefix("TYPE_").lower() for k, v in vars(FieldDescriptor).items() if k.startswith("TYPE_")}
_TEXT = st.one_of(st.sampled_from(["", "default", TINY, "../" * 8 + "etc/passwd", "/dev/zero", "a" * 300,
                                   "<|im_start|>", "\x00", "tiny.gguf\x00x", "ö" * 5000]),
                  st.text(max_size=40))


def _scalar(kind: str, field):
    if kind in _INT_RANGE:
        lo, hi = _INT_RANGE[kind]
        return st.one_of(st.sampled_from(_INT_EDGES[kind]), st.integers(lo, hi), st.integers(-3, 300).filter(
            lambda v: lo <= v <= hi))
    if kind in ("float", "double"):
        return st.one_of(st.sampled_from([0.0, -0.0, 1.0, -1.0, math.nan, math.inf, -math.inf, 1e-45, 3.4e38]),
                         st.floats(width=32 if kind == "float" else 64))
    if kind == "bool":
        return st.booleans()
    if kind == "string":
        return _TEXT
    if kind == "bytes":
        return st.binary(max_size=32)
    if kind == "enum":
        return st.one_of(st.sampled_from([v.number for v in field.enum_type.values]), st.integers(-5, 100))
    raise AssertionError(kind)


def message_of(descriptor, depth: int = 0):
    """Messages of `descriptor` with every field either unset or a random, often extreme, value."""
    cls = getattr(pb, descriptor.name)
    parts = {}
    for f in descriptor.fields:
        kind = _TYPE_NAMES[f.type]
        if kind == "message":
            if depth >= 3:
                continue
            value = message_of(f.message_type, depth + 1)
        else:
            value = _scalar(kind, f)
        if f.is_repeated:
            value = st.lists(value, max_size=6 if kind == "message" else 40)
        parts[f.name] = st.one_of(st.none(), st.none(), value)  # mostly unset: the rest reaches deeper checks

    @st.composite
    def build(draw):
        msg = cls()
        for name, strategy in parts.items():
            v = draw(strategy)
            if v is None:
                continue
            f = descriptor.fields_by_name[name]
            if f.is_repeated:
                getattr(msg, name).extend(v)
            elif f.message_type is not None:
                getattr(msg, name).CopyFrom(v)
            else:
                setattr(msg, name, v)
        return msg
    return build()


def _rpc(c, name: str):
    return {"Generate": c.gen.Generate, "GenerateStream": lambda r, **kw: list(c.gen.GenerateStream(r, **kw)),
            "Tokenize": c.gen.Tokenize, "Fit": c.model.Fit, "Load": c.model.Load}[name]


@pytest.mark.parametrize("rpc, request_type", [
    ("Generate", "GenerateRequest"), ("GenerateStream", "GenerateStreamRequest"), ("Tokenize", "TokenizeRequest"),
    ("Fit", "FitRequest"), ("Load", "LoadRequest")])
def test_request_messages_with_random_fields(server, rpc, request_type):
    c, call = server, _rpc(server, rpc)
    seen: dict[str, int] = {}

    @settings(FUZZ, max_examples=REQUEST_EXAMPLES)
    @given(message_of(pb.DESCRIPTOR.message_types_by_name[request_type]))
    def check(request):
        code, details, _ = _code(lambda: call(request, timeout=20))
        assert code not in NEVER, (code, details, request)
        assert "Stream removed" not in details, (code, details)  # the server's answer reached the client whole
        seen[code.name] = seen.get(code.name, 0) + 1
        if rpc == "Load" and code == grpc.StatusCode.OK:  # it did load: make room for the next
            name = request.pair.name or "default"
            c.model.Unload(pb.UnloadRequest(name=name), timeout=30)

    check()
    print(f"{rpc} fuzz outcomes:", seen)
    assert len(c.model.ListPairs(pb.ListPairsRequest(), timeout=10).pairs) == 1  # only the server's own pair
    _still_serves(c)
