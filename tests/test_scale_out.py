"""Scale-out: two replicas on loopback behind gRPC's own round_robin load balancing.

In Kubernetes the client names the headless Service (`dns:///specserve-headless.NS.svc...:50051`),
DNS returns one address per pod, and the round_robin policy spreads RPCs over them. Here the
addresses of two real `specserve serve` processes are given to the same policy through gRPC's
static `ipv4:` resolver (this machine's DNS maps localhost to a single address)."""

from __future__ import annotations

import collections
import json

import grpc

from service.edge.headers import REPLICA_HEADER
from service.pb.specserve.v1 import specserve_pb2 as pb
from service.pb.specserve.v1 import specserve_pb2_grpc as pb_grpc
from tests.conftest import TINY
from tests.test_service_cli import Served


def test_round_robin_reaches_both_replicas(tmp_path, tiny_models_dir):
    replicas = []
    try:
        for i in range(2):
            d = tmp_path / f"r{i}"
            d.mkdir()
            replicas.append(Served(d, "-m", str(tiny_models_dir / TINY), "-c", "256", "-np", "2"))
        target = "ipv4:" + ",".join(r.address for r in replicas)
        config = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})
        with grpc.insecure_channel(target, options=[("grpc.service_config", config)]) as ch:
            grpc.channel_ready_future(ch).result(timeout=30)
            gen = pb_grpc.GenerationServiceStub(ch)
            seen = collections.Counter()
            for _ in range(12):
                resp, call = gen.Generate.with_call(
                    pb.GenerateRequest(prompt="the theme", max_tokens=2,
                                       sampling=pb.SamplingParams(temperature=0.0)), timeout=60)
                assert resp.usage.completion_tokens >= 1
                seen[dict(call.trailing_metadata())[REPLICA_HEADER]] += 1
        assert len(seen) == 2, seen  # both replicas answered
        assert min(seen.values()) >= 4, seen  # and round robin spread the calls evenly
    finally:
        for r in replicas:
            r.stop()
