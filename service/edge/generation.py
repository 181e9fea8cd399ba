"""One admitted generation, whichever door it came by: the one bridge from a door to the engine.

Both doors build a GenRequest their own way, then hand it here: `Generation` submits it to the pair's
engine, counts the prompt and the time to first token in the metrics, logs the admission and the end,
turns a generation the server cancelled under a waiting client into UNAVAILABLE, and frees the slot on
`cancel()` (a client gone, a deadline, an error). The gRPC servicer reads `stream` on its handler
thread; the HTTP door pumps it into its event loop (service/http/generation.py).
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from service.common.errors import Unavailable
from service.engine.request import GenRequest, GenResult, TokenDelta
from service.pairs.registry import ServedPair

log = logging.getLogger("specserve.generation")


class Generation:
    """An engine stream tied to one call: `seen` each delta, `finish` with the result, `cancel` whatever happened."""

    def __init__(self, sp: ServedPair, req: GenRequest, metrics, t0: float, door: str):
        """t0: when the call began (time to first token counts from it); door: "rpc" or "http" (log lines)."""
        self.sp, self.req, self.metrics, self.t0, self.door = sp, req, metrics, t0, door
        self.ttft = 0.0
        self.finished = False
        self.stream = sp.engine.submit(req)
        if metrics is not None:
            metrics.for_pair(sp.name).on_prompt(len(req.prompt))
        log.info("generation admitted", extra={"kv": {"pair": sp.name, "prompt_tokens": len(req.prompt),
                                                      "max_tokens": req.max_tokens, "door": door}})

    def seen(self, delta: TokenDelta) -> TokenDelta:
        """A delta on its way to the client: the first with tokens sets the time to first token."""
        if not self.ttft and delta.tokens:
            self.ttft = time.monotonic() - self.t0
            if self.metrics is not None:
                self.metrics.on_first_token(self.sp.name, self.ttft)
        return delta

    def finish(self, client_waiting: Callable[[], bool], timeout: float | None = None) -> GenResult:
        """The engine's GenResult; UNAVAILABLE when the server cancelled it while its client still waits
        (`client_waiting()`, asked once the result is in)."""
        result = self.stream.result(timeout=timeout)
        self.finished = True
        if result.finish_reason == "cancelled" and client_waiting():
            raise Unavailable("the generation was cancelled by the server (shutting down or unloading)")
        log.info("generation done", extra={"kv": {
            "pair": self.sp.name, "finish": result.finish_reason, "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens, "drafted": result.drafted, "accepted": result.accepted,
            "ms": round((time.monotonic() - self.t0) * 1000, 1), "door": self.door}})
        return result

    def cancel(self) -> None:
        """Free the slot at the engine's next step (a no-op once finished)."""
        if not self.finished:
            self.finished = True
            self.stream.cancel()
