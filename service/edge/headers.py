"""gRPC metadata keys specserve sets on every response (as trailers)."""

from __future__ import annotations

import os
import re
import socket

from service.common.errors import InvalidArgument

REQUEST_ID_HEADER = "x-request-id"  # the request id (the client's, or one generated), also in every log line
REPLICA_HEADER = "specserve-replica"  # the replica that answered (host:pid): shows where a load balancer sent it
DEFICIT_HEADER = "specserve-deficit-bytes"  # a Load that does not fit: the missing device bytes
REPLICA_ID = f"{socket.gethostname()}:{os.getpid()}"


def trailers(request_id: str, *extra: tuple[str, str]) -> tuple[tuple[str, str], ...]:
    """The trailing metadata of a response."""
    return ((REQUEST_ID_HEADER, request_id), (REPLICA_HEADER, REPLICA_ID), *extra)


REQUEST_ID_RULE = "1 to 128 visible ASCII characters (no spaces or control characters)"
_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")


def valid_request_id(value: str) -> bool:
    """Whether a client's request id may be used as it is (echoed in trailers and log lines)."""
    return bool(_REQUEST_ID.fullmatch(value))


def check_request_id(value: str, where: str) -> str:
    """A client's request id, or InvalidArgument naming `where` (the header or the body field).

    Refused, not replaced: the id is the client's handle on its request in our logs and in the
    trailers, so a silently replaced id would leave it searching for one that never appears; a
    refusal before anything runs costs nothing and says what is allowed. And a value with a
    newline or non-ASCII cannot go back as a header: grpc would fail the finished call with
    INTERNAL "Invalid metadata" while our log and metrics said OK.
    """
    if not valid_request_id(value):
        raise InvalidArgument(f"{where} {value[:40]!r}{'...' if len(value) > 40 else ''}: a request id is "
                              f"{REQUEST_ID_RULE}")
    return value
