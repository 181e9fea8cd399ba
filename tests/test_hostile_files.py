"""Hostile model files, paths and pair fields over real gRPC: each is refused at once with the status
code of its meaning, messages name files relative to the models directory, and the server goes on
serving. Every crafted file is written by the test (a valid tiny GGUF, then one header field patched
or the file cut short)."""

from __future__ import annotations

import os
import shutil
import struct
import time

import gguf
import grpc
import pytest

from compute.gguf_layout import LayoutError, check_layout
from service.pb.specserve.v1 import specserve_pb2 as pb
from tests.conftest import TINY, start_server, stop_server, tiny_config
from tests.tiny_gguf import kv_value_offset, patch_bytes, write_tiny_llama

FAST_S = 2.0  # a refusal must not parse the file: the tiny model itself loads in well under this


def _patched(dst, key: str, fmt: str, value: int, skip: int = 0) -> str:
    """A copy of the tiny model with `key`'s value (or, with skip, a field after its start) overwritten."""
    patch_bytes(dst, kv_value_offset(dst, key) + skip, struct.pack("<" + fmt, value))
    return dst.name


def _truncated(src, dst, at: int) -> str:
    dst.write_bytes(src.read_bytes()[:at])
    return dst.name


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """A models directory holding the tiny model and crafted copies of it: {case: (file name, needle)}."""
    d = tmp_path_factory.mktemp("hostile-models")
    good = d / TINY
    write_tiny_llama(good, n_ctx_train=2048, seed=1)
    size = good.stat().st_size
    r = gguf.GGUFReader(str(good))
    tokens_at = r.fields["tokenizer.ggml.tokens"].offset
    infos_at = r.tensors[0].field.offset
    data_at = r.tensors[-1].data_offset

    def copy(name):
        shutil.copy(good, d / name)
        return d / name

    # (case, u32 metadata key, value written over it, what the refusal must say)
    u32_cases = [
        ("block_count 2**32-1", "llama.block_count", 2 ** 32 - 1, "llama.block_count is 4294967295"),
        ("block_count 0", "llama.block_count", 0, "llama.block_count is 0"),
        ("block_count 1 of 2", "llama.block_count", 1, "llama.block_count is 1, but the file holds tensors of block 1"),
        ("embedding_length 0", "llama.embedding_length", 0, "llama.embedding_length is 0"),
        ("head_count 0", "llama.attention.head_count", 0, "llama.attention.head_count is 0"),
        ("head_count 6", "llama.attention.head_count", 6,
         "embedding_length 64 is not a multiple of llama.attention.head_count 6"),
        ("head_count_kv 3", "llama.attention.head_count_kv", 3, "llama.attention.head_count_kv is 3: it must divide"),
        ("rope_dim odd", "llama.rope.dimension_count", 7, "llama.rope.dimension_count is 7"),
        ("vocab_size off", "llama.vocab_size", 300, "llama.vocab_size says 300"),
    ]
    cases = {name: (_patched(copy(f"u32-{i}.gguf"), key, "I", value), needle)
             for i, (name, key, value, needle) in enumerate(u32_cases)}
    cases |= {
        "token_type count 2**60": (_patched(copy("token-type.gguf"), "tokenizer.ggml.token_type", "Q", 2 ** 60, 4),
                                   f"tokenizer.ggml.token_type declares {2 ** 60} entries, the file holds"),
        "string past the end": (_patched(copy("long-string.gguf"), "general.architecture", "Q", 2 ** 40),
                                f"general.architecture declares {2 ** 40} bytes, the file holds"),
        "token text past the end": (_patched(copy("long-token.gguf"), "tokenizer.ggml.tokens", "Q", 2 ** 33, 12),
                                    f"tokenizer.ggml.tokens[0] declares {2 ** 33} bytes"),
        "empty": (_truncated(good, d / "cut-0.gguf", 0), "too short for a GGUF file"),
        "cut in the magic": (_truncated(good, d / "cut-2.gguf", 2), "too short for a GGUF file"),
        "cut in the counts": (_truncated(good, d / "cut-12.gguf", 12), "the file ends inside the tensor count"),
        "cut in a key": (_truncated(good, d / "cut-30.gguf", 30), "metadata entries, the file holds 30 bytes"),
        "cut in the tokens": (_truncated(good, d / "cut-tokens.gguf", tokens_at + 100),
                              "tokenizer.ggml.tokens declares"),
        "cut in the tensor infos": (_truncated(good, d / "cut-infos.gguf", infos_at + 10),
                                    f"the header declares {len(r.tensors)} tensors, the file holds"),
        "cut in the tensor data": (_truncated(good, d / "cut-data.gguf", data_at + 10), "end past the end of the file"),
        "cut by one byte": (_truncated(good, d / "cut-last.gguf", size - 1), "end past the end of the file"),
    }
    return d, cases


@pytest.fixture(scope="module")
def hostile_server(hostile):
    c = start_server(tiny_config(hostile[0], n_parallel=2, n_ctx=512))
    yield c
    stop_server(c)


def _refusal(rpc, request) -> tuple[grpc.StatusCode, str, float]:
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        rpc(request, timeout=30)
    return e.value.code(), e.value.details(), time.monotonic() - t0


def _generates(c) -> None:
    r = c.gen.Generate(pb.GenerateRequest(prompt="the cat", max_tokens=4,
                                          sampling=pb.SamplingParams(temperature=0)), timeout=30)
    assert r.usage.completion_tokens == 4


def test_crafted_files_are_refused_fast_with_invalid_argument(hostile, hostile_server):
    d, cases = hostile
    c = hostile_server
    before = c.server.backend.ledger.total_bytes()
    for case, (name, needle) in cases.items():
        for rpc, req in ((c.model.Fit, pb.FitRequest), (c.model.Load, pb.LoadRequest)):
            code, details, seconds = _refusal(rpc, req(pair=pb.PairSpec(name="bad", target_path=name)))
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (case, details)
            assert needle in details, (case, details)
            assert seconds < FAST_S, (case, seconds)
            assert f"target model {name}:" in details, (case, details)  # named as the client named it
            assert str(d) not in details, (case, details)  # no absolute server path
        # a draft is read the same way
        code, details, _ = _refusal(c.model.Load, pb.LoadRequest(pair=pb.PairSpec(name="bad", target_path=TINY,
                                                                                   draft_path=name)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and f"draft model {name}:" in details, (case, details)
    assert [p.name for p in c.model.ListPairs(pb.ListPairsRequest(), timeout=10).pairs] == ["default"]
    assert c.server.backend.ledger.total_bytes() == before
    _generates(c)


def test_the_token_type_message_gives_the_file_size(hostile):
    d, cases = hostile
    name, _ = cases["token_type count 2**60"]
    t0 = time.monotonic()
    with pytest.raises(LayoutError) as e:
        check_layout(d / name)
    assert time.monotonic() - t0 < 0.5
    size_kb = (d / name).stat().st_size / 1000
    assert str(e.value) == f"tokenizer.ggml.token_type declares {2 ** 60} entries, the file holds {size_kb:.1f} KB"


def test_the_layout_check_passes_real_files_quickly(real_model, hostile):
    for path in (real_model, hostile[0] / TINY):
        t0 = time.monotonic()
        check_layout(path)
        assert time.monotonic() - t0 < 1.0


def test_paths_that_are_not_regular_files(hostile, hostile_server):
    d, _ = hostile
    c = hostile_server
    (d / "a-dir.gguf").mkdir(exist_ok=True)
    if not (d / "a-fifo.gguf").exists():
        os.mkfifo(d / "a-fifo.gguf")  # opening it would block for ever: it must never be opened
    cases = {
        "bad\0name.gguf": (grpc.StatusCode.INVALID_ARGUMENT, "NUL byte"),
        "a-dir.gguf": (grpc.StatusCode.INVALID_ARGUMENT, "'a-dir.gguf' is not a regular file"),
        "a-fifo.gguf": (grpc.StatusCode.INVALID_ARGUMENT, "'a-fifo.gguf' is not a regular file"),
        str(d / "a-fifo.gguf"): (grpc.StatusCode.INVALID_ARGUMENT, "'a-fifo.gguf' is not a regular file"),
        str(d / "sub" / ".." / "missing.gguf"): (grpc.StatusCode.NOT_FOUND, "'missing.gguf' does not exist"),
        "x" * 5000 + ".gguf": (grpc.StatusCode.INVALID_ARGUMENT, "cannot be read"),
    }
    for path, (want, needle) in cases.items():
        for rpc, req in ((c.model.Fit, pb.FitRequest), (c.model.Load, pb.LoadRequest)):
            code, details, seconds = _refusal(rpc, req(pair=pb.PairSpec(name="bad", target_path=path)))
            assert (code, needle in details) == (want, True), (path[:40], code, details)
            assert seconds < FAST_S
            assert str(d) not in details
    _generates(c)


def test_a_client_budget_never_raises_the_servers(hostile):
    small = 200_000  # far below what the tiny pair needs
    c = start_server(tiny_config(hostile[0], startup=False, device_memory_bytes=small))
    try:
        for budget in (0, small * 2, 2 ** 63):
            fit = c.model.Fit(pb.FitRequest(pair=pb.PairSpec(target_path=TINY, memory_budget_bytes=budget)),
                              timeout=30)
            assert not fit.fits and fit.available_bytes <= small, budget
            code, details, _ = _refusal(c.model.Load, pb.LoadRequest(
                pair=pb.PairSpec(target_path=TINY, memory_budget_bytes=budget)))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
        lower = c.model.Fit(pb.FitRequest(pair=pb.PairSpec(target_path=TINY, memory_budget_bytes=small // 2)),
                            timeout=30)
        assert lower.available_bytes <= small // 2  # a lower budget is honoured
        assert c.server.backend.ledger.total_bytes() == 0
    finally:
        stop_server(c)


@pytest.mark.parametrize("field, value", [
    ("n_parallel", 2 ** 32 - 1), ("n_ctx", 2 ** 32 - 1), ("n_batch", 2 ** 32 - 1),
    ("n_outputs_max", 2 ** 32 - 1), ("n_ctx_min", 2 ** 32 - 1),
])
def test_absurd_context_params_are_invalid_argument_naming_the_field(hostile_server, field, value):
    c = hostile_server
    for rpc, req in ((c.model.Fit, pb.FitRequest), (c.model.Load, pb.LoadRequest)):
        pair = pb.PairSpec(name="huge", target_path=TINY, params=pb.ContextParams(**{field: value}))
        code, details, seconds = _refusal(rpc, req(pair=pair))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and f"{field} {value} is too large" in details, details
        assert seconds < FAST_S
    _generates(c)


class _Field:
    def __init__(self, value):
        self.value = value

    def contents(self):
        return self.value


def _fields(**overrides) -> dict:
    base = {"general.architecture": "llama", "llama.embedding_length": 64, "llama.attention.head_count": 4,
            "llama.block_count": 2, "llama.feed_forward_length": 128, "llama.context_length": 256,
            "llama.vocab_size": 8}
    base.update(overrides)
    return {k: _Field(v) for k, v in base.items() if v is not None}


def test_hparams_values_of_the_wrong_kind_are_model_file_errors():
    from compute.gguf_model import ModelFileError, hparams_from_fields

    shapes = {"token_embd.weight": (8, 64), "blk.1.attn_q.weight": (64, 64)}
    hp = hparams_from_fields(_fields(**{"llama.rope.scaling.factor": 0.0}), shapes, None)
    assert hp.rope_scale == 1.0  # llama.cpp reads a factor of 0 as unset
    for key, value, needle in [("llama.block_count", "2", "must be an integer"),
                               ("llama.block_count", True, "must be an integer"),
                               ("llama.rope.freq_base", float("nan"), "must be a positive number"),
                               ("llama.attention.layer_norm_rms_epsilon", -1.0, "must be a positive number"),
                               ("llama.context_length", 0, "llama.context_length is 0"),
                               ("llama.vocab_size", 9,
                                r"token_embd.weight has shape \(8, 64\), the metadata says 9 tokens")]:
        with pytest.raises(ModelFileError, match=needle):
            hparams_from_fields(_fields(**{key: value}), shapes, None)
    with pytest.raises(ModelFileError, match="tokenizer.ggml.tokens holds 7 tokens"):
        hparams_from_fields(_fields(), shapes, 7)


def test_a_token_text_that_is_not_utf8_is_invalid_argument_at_load(hostile, hostile_server, tmp_path):
    """Found by tests/test_fuzz.py: the tokenizer read token texts unchecked, and Load answered INTERNAL."""
    d, _ = hostile
    c = hostile_server
    bad = d / "token-not-utf8.gguf"
    shutil.copy(d / TINY, bad)
    first_text = kv_value_offset(bad, "tokenizer.ggml.tokens") + 4 + 8 + 8  # item type, count, first length
    patch_bytes(bad, first_text, b"\xff")
    before = c.server.backend.ledger.total_bytes()
    code, details, _ = _refusal(c.model.Load, pb.LoadRequest(pair=pb.PairSpec(name="bad", target_path=bad.name)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "tokenizer.ggml.tokens cannot be read" in details, details
    assert c.server.backend.ledger.total_bytes() == before
    _generates(c)
