"""The gRPC side of bearer-token authentication: the server interceptor and the client's token.

Roles, the token file and the bearer check are service/edge/auth.py's, shared with the HTTP door.
"""

from __future__ import annotations

import grpc

from service.common.errors import PermissionDenied, Unauthenticated
from service.edge.auth import AUTH_HEADER, Tokens, allowed
from service.pb.specserve.v1 import specserve_pb2 as pb

OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")  # no token needed
_OURS = f"/{pb.DESCRIPTOR.package}."


def operation_of(method: str) -> str:
    """ "Service/Method" of a full gRPC method name of package specserve.v1 (any other stays as it is)."""
    return method[len(_OURS):] if method.startswith(_OURS) else method


class AuthInterceptor(grpc.ServerInterceptor):
    """Checks the bearer token and its role before a handler runs (service/edge/auth.py)."""

    def __init__(self, tokens: dict[str, str]):
        self.tokens = Tokens(tokens)

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        method = details.method
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        try:
            role = self.tokens.role_of(details.invocation_metadata)
            if not allowed(role, operation_of(method)):
                raise PermissionDenied(f"the {role} role may not call {method.rsplit('/', 1)[-1]}")
        except (Unauthenticated, PermissionDenied) as refusal:
            return _refusing(handler, refusal)
        return handler


def _refusing(handler, refusal: Exception):
    """A handler of the same shape as `handler` that raises `refusal` (the outer interceptor maps it)."""

    def unary(request, context):
        raise refusal

    def stream(request, context):
        raise refusal
        yield  # never reached: it makes this a generator, as a streaming handler is

    kw = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream, **kw)
    return grpc.unary_unary_rpc_method_handler(unary, **kw)


class BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Client side: adds `authorization: Bearer <token>` to every call of a channel."""

    def __init__(self, token: str):
        self._header = (AUTH_HEADER, f"Bearer {token}")

    def _with_token(self, details):
        metadata = [*(details.metadata or ()), self._header]
        return details._replace(metadata=metadata) if hasattr(details, "_replace") else _Details(details, metadata)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_token(details), request)


class _Details(grpc.ClientCallDetails):
    """ClientCallDetails with other metadata (grpc's own object is not a namedtuple)."""

    def __init__(self, details, metadata):
        self.method, self.timeout, self.metadata = details.method, details.timeout, metadata
        self.credentials = details.credentials
        self.wait_for_ready = getattr(details, "wait_for_ready", None)
        self.compression = getattr(details, "compression", None)
