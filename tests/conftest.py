"""Shared fixtures: the packaged SmolLM2 model, tiny GGUF models, and real specserve servers on
port 0 talking real gRPC.

Servers are expensive to start with the packaged model (~15 s to read and load it), so the
real-model server is session-scoped; tiny-model servers start in well under a second.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from service.fit.factory import PairRequest  # noqa: E402
from service.fit.params import ContextParams, SpeculativeConfig  # noqa: E402
from service.pb.specserve.v1 import specserve_pb2 as pb  # noqa: E402
from service.pb.specserve.v1 import specserve_pb2_grpc as pb_grpc  # noqa: E402
from service.server import ServerConfig, SpecServer  # noqa: E402
from tests.models import packaged_model_path  # noqa: E402

TINY = "tiny.gguf"
TINY_DRAFT = "tiny-draft.gguf"


@pytest.fixture(scope="session")
def real_model() -> str:
    return packaged_model_path()


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory) -> Path:
    """A models directory with a tiny target and a tiny draft sharing its vocabulary (different weights)."""
    from tests.tiny_gguf import write_tiny_llama

    d = tmp_path_factory.mktemp("models")
    write_tiny_llama(d / TINY, n_ctx_train=2048, seed=1)
    write_tiny_llama(d / TINY_DRAFT, n_ctx_train=2048, seed=2, n_layer=1)
    return d


@pytest.fixture(scope="session")
def outside_model(tmp_path_factory) -> Path:
    """A valid GGUF outside every models directory the tests use."""
    from tests.tiny_gguf import write_tiny_llama

    return Path(write_tiny_llama(tmp_path_factory.mktemp("outside") / "outside.gguf", seed=3))


@dataclass
class Client:
    """A running server and real gRPC stubs to it."""

    server: SpecServer
    address: str
    channel: grpc.Channel
    model: pb_grpc.ModelServiceStub
    gen: pb_grpc.GenerationServiceStub
    health: health_pb2_grpc.HealthStub

    def health_status(self, service: str = "") -> int:
        return self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

    def pair_info(self, name: str = "default") -> pb.PairInfo:
        for p in self.model.ListPairs(pb.ListPairsRequest(), timeout=10).pairs:
            if p.name == name:
                return p
        raise AssertionError(f"pair {name} not listed")

    def wait_idle(self, name: str = "default", timeout: float = 20.0) -> pb.PairInfo:
        """Poll ListPairs until the pair has no active slot and nothing queued (the slot was freed)."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.pair_info(name)
            if info.active_slots == 0 and info.queued == 0:
                return info
            if time.monotonic() > deadline:
                raise AssertionError(f"pair {name} still busy: {info.active_slots} active, {info.queued} queued")
            time.sleep(0.05)

    def wait_busy(self, name: str = "default", timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while self.pair_info(name).active_slots == 0:
            if time.monotonic() > deadline:
                raise AssertionError(f"pair {name} never became busy")
            time.sleep(0.02)


def start_server(config: ServerConfig, ready_timeout: float = 120.0) -> Client:
    """Start a server on port 0 and wait until its startup pair (if any) is ready."""
    server = SpecServer(replace(config, host="127.0.0.1", port=0))
    port = server.start()
    address = f"127.0.0.1:{port}"
    channel = grpc.insecure_channel(address)
    client = Client(server, address, channel, pb_grpc.ModelServiceStub(channel),
                    pb_grpc.GenerationServiceStub(channel), health_pb2_grpc.HealthStub(channel))
    try:
        server.wait_ready(ready_timeout)
    except BaseException:
        stop_server(client)
        raise
    return client


def stop_server(client: Client) -> None:
    client.channel.close()
    client.server.stop()


def tiny_config(models_dir: Path, startup: bool = True, **pair) -> ServerConfig:
    """A server over the tiny models: pair "default" = tiny target (+ draft with spec_type draft)."""
    params = ContextParams(n_ctx=pair.pop("n_ctx", 1024), n_parallel=pair.pop("n_parallel", 4),
                           n_batch=pair.pop("n_batch", 64))
    spec = SpeculativeConfig(type=pair.pop("spec_type", "ngram"), n_max=pair.pop("n_max", 4))
    draft = str(models_dir / TINY_DRAFT) if spec.type == "draft" else ""
    req = PairRequest(name="default", target_path=str(models_dir / TINY), draft_path=draft, params=params,
                      speculative=spec)
    return ServerConfig(models_dir=str(models_dir), startup=req if startup else None, params=params,
                        speculative=spec, default_target=str(models_dir / TINY), backend=pair.pop("backend", "numpy"),
                        threads=1,
                        row_tile=pair.pop("row_tile", 8),  # drafts cost nothing up to 8 rows: the engine drafts
                        **pair)


@pytest.fixture(scope="session")
def tiny_server(tiny_models_dir):
    """Session server: tiny target + tiny draft model, 4 slots of 256 cells, draft-model speculation,
    Prometheus metrics on a free port."""
    c = start_server(tiny_config(tiny_models_dir, spec_type="draft", metrics_port=0))
    yield c
    stop_server(c)


@pytest.fixture
def empty_server(tiny_models_dir):
    """A fresh server over the tiny models with nothing loaded."""
    c = start_server(tiny_config(tiny_models_dir, startup=False))
    yield c
    stop_server(c)


@pytest.fixture(scope="session")
def real_server(real_model):
    """Session server with the packaged SmolLM2-135M: 2 slots of 256 cells, n-gram drafter."""
    model = real_model
    params = ContextParams(n_ctx=512, n_parallel=2, n_batch=64)
    spec = SpeculativeConfig(type="ngram", n_max=4)
    req = PairRequest(name="default", target_path=model, params=params, speculative=spec)
    c = start_server(ServerConfig(models_dir=os.path.dirname(model), startup=req, params=params, speculative=spec,
                                  default_target=model, backend="numpy", threads=1, max_tokens=16), ready_timeout=300)
    yield c
    stop_server(c)
