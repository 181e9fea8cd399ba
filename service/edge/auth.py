"""Bearer-token authentication with two roles (`--auth-token-file`), for both doors.

The token file holds one `role:token` a line (blank lines and `#` comments are skipped):

    generate:3f9c...     may call Generate, GenerateStream, Tokenize, Detokenize, ListPairs,
                         GetSpeculativeConfig
    admin:77ab...        may call everything (Fit, Load, Unload, UpdateSpeculativeConfig too)

A client sends `authorization: Bearer <token>` metadata. No token or an unknown one is
UNAUTHENTICATED; a known token whose role does not cover the method is PERMISSION_DENIED.
Health checking and reflection stay open (load balancers and grpcurl need no token).

The HTTP door sends the same header and is held to the same rules: its chat and completion
endpoints count as Generate, its model listing as ListPairs. The gRPC interceptor is in
service/rpc/auth.py; a refusal is an ordinary service.common.errors exception, so it gets a request
id, a status code and a metrics entry like any other failed call, and the handler never runs.
"""

from __future__ import annotations

import hmac

from service.common.errors import Unauthenticated

AUTH_HEADER = "authorization"
ROLES = ("generate", "admin")
# what the generate role may call, as "Service/Method" of package specserve.v1 (admin: everything)
GENERATE_OPERATIONS = frozenset({
    "GenerationService/Generate", "GenerationService/GenerateStream", "GenerationService/Tokenize",
    "GenerationService/Detokenize", "ModelService/ListPairs", "ModelService/GetSpeculativeConfig"})


def allowed(role: str, operation: str) -> bool:
    """Whether `role` may call `operation` ("Service/Method", e.g. "GenerationService/Generate")."""
    return role == "admin" or (role == "generate" and operation in GENERATE_OPERATIONS)


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


class Tokens:
    """The token table of --auth-token-file: who a caller is, from its `authorization` header."""

    def __init__(self, tokens: dict[str, str]):
        self._tokens = dict(tokens)  # token -> role

    def role_of(self, metadata) -> str:
        """The caller's role; Unauthenticated when it sent no known bearer token. `metadata`: (key, value)
        pairs (a gRPC call's metadata; the HTTP door passes its one header as a pair)."""
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
