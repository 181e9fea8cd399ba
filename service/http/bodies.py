"""Reading a request body so that slow clients cannot hold the HTTP door.

    reader = BodyReader(limit_bytes, timeout_s, max_reading)
    raw = await reader.read(request)      # bytes; PayloadTooLarge, BodyTimeout, ClientGone, ResourceExhausted

A request takes a --max-workers place only once its body is in (app.py): a client that sends its
headers and then part of a body holds one of `max_reading` reading places, for at most `timeout_s`
seconds in all, and none of the workers. More bodies in flight than `max_reading` are refused at
once (429), so even a crowd of slow clients cannot keep the requests that send whole bodies from
the workers. A client that leaves mid-body is ClientGone (CANCELLED, 499), not an error of ours.

`check_objects(raw)` refuses a body of more JSON objects than any request needs before pydantic builds
them: a 3 MB chat of 100k messages would otherwise become ~80 MB of parsed values and models, only to be
refused at 4096 messages, and a stream of such bodies left RSS higher after each burst.
"""

from __future__ import annotations

import asyncio
import json
import threading

from starlette.requests import ClientDisconnect, Request

from service.common.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted
from service.config.settings import MAX_MESSAGES
from service.http.errors import ClientGone, PayloadTooLarge

READING_PER_WORKER = 2  # bodies being read at once, per --max-workers place
MAX_JSON_OBJECTS = 8 * MAX_MESSAGES  # a chat's messages, their content parts and tool calls, a schema: room to spare


class BodyTimeout(DeadlineExceeded):
    """The body did not arrive in time (HTTP 408: the client was too slow, not the server)."""

    status = 408


class BodyReader:
    """Reads request bodies under a size limit, a time limit and a cap on bodies in flight."""

    def __init__(self, limit_bytes: int, timeout_s: float, max_reading: int):
        """limit_bytes: --max-message-size; timeout_s: ServerConfig.http_body_timeout_s (a whole body: at the
        default 10 s a 16 MiB body needs ~13 Mbit/s); max_reading: READING_PER_WORKER * --max-workers."""
        self.limit, self.timeout_s, self.max_reading = limit_bytes, timeout_s, max_reading
        self.reading = 0  # requests reading their body now
        self._lock = threading.Lock()

    async def read(self, request: Request) -> bytes:
        """The whole body; PayloadTooLarge over the limit, BodyTimeout past the time limit, ClientGone when the
        client leaves, ResourceExhausted when max_reading bodies are being read already."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit:
            raise PayloadTooLarge(f"the request body is {declared} bytes, this server takes at most {self.limit} "
                                  "(--max-message-size)")
        with self._lock:
            if self.reading >= self.max_reading:
                raise ResourceExhausted(f"{self.max_reading} request bodies are being read already: retry shortly")
            self.reading += 1
        try:
            return await asyncio.wait_for(self._chunks(request), self.timeout_s)
        except asyncio.TimeoutError:
            raise BodyTimeout(f"the request body did not arrive within {self.timeout_s:g} s") from None
        except ClientDisconnect:
            raise ClientGone("the client closed the connection while sending its body") from None
        finally:
            with self._lock:
                self.reading -= 1

    async def _chunks(self, request: Request) -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.limit:
                raise PayloadTooLarge(f"the request body is over {self.limit} bytes (--max-message-size)")
            chunks.append(chunk)
        return b"".join(chunks)


class _TooManyObjects(Exception):
    pass


def check_objects(raw: bytes, limit: int = MAX_JSON_OBJECTS) -> None:
    """InvalidArgument when the JSON body holds more than `limit` objects; nothing is built to find out
    (each object is counted and dropped). Bodies with no more braces than `limit` are not parsed at all."""
    if raw.count(b"{") <= limit:  # an upper bound of the objects (braces inside strings count too)
        return
    seen = 0

    def count(_pairs) -> None:
        nonlocal seen
        seen += 1
        if seen > limit:
            raise _TooManyObjects

    try:
        json.loads(raw, object_pairs_hook=count)
    except _TooManyObjects:
        raise InvalidArgument(f"the request body holds more than {limit} JSON objects; a chat takes at most "
                              f"{MAX_MESSAGES} messages") from None
    except (ValueError, RecursionError):
        return  # not JSON, or nested too deep: the model's validation says what is wrong with it


def client_gone_or(exc: BaseException) -> BaseException:
    """`exc`, or ClientGone when it is Starlette's ClientDisconnect (the client left while the body was read
    elsewhere): a departure is CANCELLED, never INTERNAL."""
    if isinstance(exc, ClientDisconnect):
        return ClientGone("the client closed the connection")
    return exc
