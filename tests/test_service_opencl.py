"""`--backend opencl` behind real gRPC (PoCL on the CPU in CI): the same plan/allocation contract and the
same greedy tokens as the NumPy backend."""

from __future__ import annotations

from dataclasses import replace

import pytest

from service.pb.specserve.v1 import specserve_pb2 as pb
from tests.conftest import start_server, stop_server, tiny_config

pytestmark = pytest.mark.opencl


def test_opencl_server_matches_numpy(tiny_models_dir, tiny_server):
    pytest.importorskip("pyopencl")
    c = start_server(replace(tiny_config(tiny_models_dir, spec_type="draft"), backend="opencl"))
    try:
        assert c.server.backend.name == "opencl"
        info = c.pair_info()
        assert [(b.owner, b.kind, b.tag, b.bytes) for b in info.allocated] == \
            [(b.owner, b.kind, b.tag, b.bytes) for b in info.plan.buffers]
        req = pb.GenerateRequest(prompt="the cat", max_tokens=24, sampling=pb.SamplingParams(temperature=0))
        got = c.gen.Generate(req, timeout=300)
        want = tiny_server.gen.Generate(req, timeout=60)
        assert list(got.tokens) == list(want.tokens)
        c.wait_idle()
    finally:
        stop_server(c)
