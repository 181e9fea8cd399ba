"""The gRPC services of a server: specserve's two servicers, standard health, and reflection.

Reflection lets grpcurl and ghz call the server with no .proto file; health is grpc.health.v1,
whose status the server sets (service/server.py) for "" and each name in SERVICE_NAMES.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service.pb.specserve.v1 import specserve_pb2 as pb
from service.pb.specserve.v1 import specserve_pb2_grpc as pb_grpc
from service.rpc.servicers import GenerationServicer, ModelServicer

SERVICE_NAMES = tuple(pb.DESCRIPTOR.services_by_name[s].full_name for s in ("ModelService", "GenerationService"))


def add_services(server: grpc.Server, registry, config, metrics, health_servicer: health.HealthServicer) -> None:
    """Add the servicers over `registry`, the health servicer and reflection to `server`."""
    pb_grpc.add_ModelServiceServicer_to_server(ModelServicer(registry, config), server)
    pb_grpc.add_GenerationServiceServicer_to_server(GenerationServicer(registry, config, metrics), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server, pool=_MethodAwarePool())


class _MethodAwarePool:
    """The default descriptor pool, but `FindFileContainingSymbol` also resolves method names.

    grpc-python's reflection asks the pool for "pkg.Service.Method" (ghz and `grpcurl describe`
    do), which upb's pool does not resolve (grpc/grpc#34743); look the service up instead.
    """

    def __init__(self, pool=None):
        from google.protobuf import descriptor_pool

        self._pool = pool or descriptor_pool.Default()

    def __getattr__(self, name):
        return getattr(self._pool, name)

    def FindFileContainingSymbol(self, symbol: str):  # noqa: N802 - the pool's API
        try:
            return self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            service, _, method = symbol.rpartition(".")
            try:
                desc = self._pool.FindServiceByName(service)
            except KeyError:
                raise KeyError(symbol) from None
            if method not in desc.methods_by_name:
                raise
            return desc.file
