"""gRPC metadata keys specserve sets on every response (as trailers)."""

from __future__ import annotations

import os
import socket

REQUEST_ID_HEADER = "x-request-id"  # the request id (the client's, or one generated), also in every log line
REPLICA_HEADER = "specserve-replica"  # the replica that answered (host:pid): shows where a load balancer sent it
DEFICIT_HEADER = "specserve-deficit-bytes"  # a Load that does not fit: the missing device bytes
REPLICA_ID = f"{socket.gethostname()}:{os.getpid()}"


def trailers(request_id: str, *extra: tuple[str, str]) -> tuple[tuple[str, str], ...]:
    """The trailing metadata of a response."""
    return ((REQUEST_ID_HEADER, request_id), (REPLICA_HEADER, REPLICA_ID), *extra)
