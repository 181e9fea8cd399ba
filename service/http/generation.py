"""One generation seen from asyncio: the shared bridge (service/edge/generation.py) fed to an event loop.

The request is built and submitted on a worker thread (tokenizing a long prompt never blocks
the loop); a pump thread moves the engine's deltas into an asyncio queue; `cancel()` frees the
slot at the engine's next step, as a gRPC cancellation does.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from service.edge import generation
from service.engine.request import GenRequest, GenResult
from service.pairs.registry import ServedPair

_END = object()


class Generation(generation.Generation):
    """The engine stream of an HTTP request: deltas arrive through an asyncio queue that a pump thread
    fills; `cancel()` frees the slot at the engine's next step (a client gone, an error)."""

    def __init__(self, sp: ServedPair, req: GenRequest, metrics, t0: float, loop: asyncio.AbstractEventLoop):
        super().__init__(sp, req, metrics, t0, "http")
        self.client_gone = False
        self.error_code = ""  # set when a stream ended with an error event
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()

    def pump(self) -> None:
        """(A worker thread) move the engine's deltas into the event loop's queue, then the end mark."""
        put = self._loop.call_soon_threadsafe
        try:
            for delta in self.stream:
                put(self._queue.put_nowait, delta)
            put(self._queue.put_nowait, _END)
        except RuntimeError:  # the event loop is closed: the server stopped under us
            self.stream.cancel()

    async def deltas(self) -> AsyncIterator:
        """The engine's TokenDeltas; records time to first token."""
        while (delta := await self._queue.get()) is not _END:
            yield self.seen(delta)

    def result(self) -> GenResult:
        """The GenResult once deltas() ended; UNAVAILABLE when the server cancelled it under a waiting client."""
        return self.finish(lambda: not self.client_gone, timeout=0)

    def cancel(self, client_gone: bool = False) -> None:
        self.client_gone = self.client_gone or client_gone
        super().cancel()

    async def collect(self) -> GenResult:
        """Run to the end (unary); the result holds every completion (and its logprobs)."""
        async for _ in self.deltas():
            pass
        return self.result()
