"""One generation seen from asyncio: the engine's Stream (a blocking queue) bridged to an event loop.

The request is built and submitted on a worker thread (tokenizing a long prompt never blocks
the loop); a pump thread moves the engine's deltas into an asyncio queue; `cancel()` frees the
slot at the engine's next step, as a gRPC cancellation does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator

from service.common.errors import Unavailable
from service.engine.request import GenRequest, GenResult
from service.pairs.registry import ServedPair

log = logging.getLogger("specserve.http")

_END = object()


class Generation:
    """An engine stream tied to an HTTP request: deltas arrive through an asyncio queue that a pump thread
    fills; `cancel()` frees the slot at the engine's next step (a client gone, an error)."""

    def __init__(self, sp: ServedPair, req: GenRequest, metrics, t0: float, loop: asyncio.AbstractEventLoop):
        self.sp, self.req, self.metrics, self.t0 = sp, req, metrics, t0
        self.stream = sp.engine.submit(req)
        self.ttft = 0.0
        self.finished = False
        self.client_gone = False
        self.error_code = ""  # set when a stream ended with an error event
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()
        if metrics is not None:
            metrics.for_pair(sp.name).on_prompt(len(req.prompt))
        log.info("generation admitted", extra={"kv": {"pair": sp.name, "prompt_tokens": len(req.prompt),
                                                      "max_tokens": req.max_tokens, "door": "http"}})

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
            if not self.ttft and delta.tokens:
                self.ttft = time.monotonic() - self.t0
                if self.metrics is not None:
                    self.metrics.on_first_token(self.sp.name, self.ttft)
            yield delta

    def result(self) -> GenResult:
        """The GenResult once deltas() ended; UNAVAILABLE when the server cancelled it under a waiting client."""
        result = self.stream.result(timeout=0)
        self.finished = True
        if result.finish_reason == "cancelled" and not self.client_gone:
            raise Unavailable("the generation was cancelled by the server (shutting down or unloading)")
        log.info("generation done", extra={"kv": {
            "pair": self.sp.name, "finish": result.finish_reason, "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens, "drafted": result.drafted, "accepted": result.accepted,
            "ms": round((time.monotonic() - self.t0) * 1000, 1), "door": "http"}})
        return result

    def cancel(self, client_gone: bool = False) -> None:
        self.client_gone = self.client_gone or client_gone
        if not self.finished:
            self.finished = True
            self.stream.cancel()

    async def collect(self) -> GenResult:
        """Run to the end (unary); the result holds every completion (and its logprobs)."""
        async for _ in self.deltas():
            pass
        return self.result()
