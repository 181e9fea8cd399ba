"""What every call through either door goes through: its request id, its place among the calls in flight,
and, when it ends, its metric and its log line. The gRPC interceptor (service/rpc/interceptor.py) and
the HTTP door's routes (service/http/app.py) both call these, so a call is counted the same way
whichever door it came by.
"""

from __future__ import annotations

import logging
import threading

from service.common.logging_setup import new_request_id
from service.edge.headers import REQUEST_ID_HEADER, check_request_id, valid_request_id


def request_id_for(header_id: str) -> str:
    """The id a call runs under: the client's header when it is a valid id, else a new one (an invalid
    header is refused by check_header_id next, under the new id, so the refusal can be found)."""
    return header_id if valid_request_id(header_id) else new_request_id()


def check_header_id(header_id: str) -> None:
    """InvalidArgument when the client sent a request id header that breaks the rule."""
    if header_id:
        check_request_id(header_id, f"the {REQUEST_ID_HEADER} header")


def record_call(metrics, door: str, method: str, code: str, seconds: float, quiet: bool = False) -> None:
    """A finished call: its metric (unless `quiet`: health checks, reflection) and one log line, at INFO
    when it succeeded or was cancelled, WARNING otherwise (DEBUG when quiet). `door`: "rpc" or "http"."""
    if metrics is not None and not quiet:
        metrics.on_request(method, code, seconds)
    level = logging.DEBUG if quiet else logging.INFO if code in ("OK", "CANCELLED") else logging.WARNING
    logging.getLogger(f"specserve.{'server' if door == 'rpc' else door}").log(
        level, door, extra={"kv": {"method": method, "code": code, "ms": round(seconds * 1000, 1)}})


class InFlight:
    """How many calls are running, through both doors; the drain waits for these, not for health Watch streams."""

    def __init__(self):
        self._n = 0
        self._idle = threading.Condition()

    def __enter__(self):
        with self._idle:
            self._n += 1

    def __exit__(self, *exc):
        with self._idle:
            self._n -= 1
            if self._n == 0:
                self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Block until none runs (True) or `timeout` seconds passed (False)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._n == 0, timeout)
