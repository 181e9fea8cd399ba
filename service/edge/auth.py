"""Bearer-token authentication with two roles, as a gRPC server interceptor (`--auth-token-file`).

The token file holds one `role:token` a line (blank lines and `#` comments are skipped):

    generate:3f9c...     may call Generate, GenerateStream, Tokenize, Detokenize, ListPairs,
                         GetSpeculativeConfig
    admin:77ab...        may call everything (Fit, Load, Unload, UpdateSpeculativeConfig too)

A client sends `authorization: Bearer <token>` metadata. No token or an unknown one is
UNAUTHENTICATED; a known token whose role does not cover the method is PERMISSION_DENIED.
Health checking and reflection stay open (load balancers and grpcurl need no token).

The interceptor sits inside the server's ErrorInterceptor: a refusal is an ordinary
service.errors exception there, so it gets a request id, a status code and a metrics entry
like any other failed RPC, and the handler never runs.
"""

from __future__ import annotations

import hmac

import grpc

from service.common.errors import PermissionDenied, Unauthenticated
from service.pb.specserve.v1 import specserve_pb2 as pb

AUTH_HEADER = "authorization"
ROLES = ("generate", "admin")
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")  # no token needed


def _methods(service: str, *names: str) -> frozenset[str]:
    full = pb.DESCRIPTOR.services_by_name[service].full_name
    return frozenset(f"/{full}/{n}" for n in names)


GENERATE_METHODS = (_methods("GenerationService", "Generate", "GenerateStream", "Tokenize", "Detokenize")
                    | _methods("ModelService", "ListPairs", "GetSpeculativeConfig"))


def allowed(role: str, method: str) -> bool:
    """Whether `role` may call the full method name `method`."""
    return role == "admin" or (role == "generate" and method in GENERATE_METHODS)


def parse_token_file(text: str, name: str = "the token file") -> dict[str, str]:
    """{token: role} from `role:token` lines; ValueError naming the line for anything else."""
    tokens: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        role, sep, token = line.partition(":")
        role, token = role.strip(), token.strip()
        if not sep or role not in ROLES or not token:
            raise ValueError(f"{name} line {n}: write role:token with a role of {' or '.join(ROLES)}")
        if token in tokens:
            raise ValueError(f"{name} line {n}: the token is listed twice")
        tokens[token] = role
    if not tokens:
        raise ValueError(f"{name} holds no tokens: every RPC but health and reflection would be refused")
    return tokens


def load_token_file(path: str) -> dict[str, str]:
    """The `--auth-token-file`; SystemExit with the reason when it cannot be used."""
    try:
        with open(path, encoding="utf-8") as f:
            return parse_token_file(f.read(), f"--auth-token-file {path}")
    except OSError as e:
        raise SystemExit(f"--auth-token-file {path}: {e.strerror}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise SystemExit(str(e)) from None


class AuthInterceptor(grpc.ServerInterceptor):
    """Checks the bearer token and its role before a handler runs; see the module docstring."""

    def __init__(self, tokens: dict[str, str]):
        self._tokens = dict(tokens)  # token -> role

    def role_of(self, metadata) -> str:
        """The caller's role; Unauthenticated when it sent no known bearer token."""
        values = [v for k, v in (metadata or ()) if k == AUTH_HEADER]
        if not values:
            raise Unauthenticated(f"no {AUTH_HEADER} metadata: send '{AUTH_HEADER}: Bearer <token>'")
        scheme, _, token = values[0].partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated(f"the {AUTH_HEADER} metadata must be 'Bearer <token>'")
        token = token.strip().encode()
        # compare with every token, in constant time, so timing tells nothing about which was close
        matches = [role for known, role in self._tokens.items() if hmac.compare_digest(known.encode(), token)]
        if not matches:
            raise Unauthenticated("the bearer token is not valid")
        return matches[0]

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        method = details.method
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        try:
            role = self.role_of(details.invocation_metadata)
            if not allowed(role, method):
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
