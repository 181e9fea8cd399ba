"""Server-sent events as a plain ASGI response, with the client's disconnect seen at once."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Callable


class EventStream:
    """A `text/event-stream` response: `data: <payload>` per item of `events`. When the client goes away,
    `on_disconnect()` runs at once (it cancels the generation) and the stream ends; `on_close(code)` runs
    last, with the gRPC code name of how it ended."""

    def __init__(self, events: AsyncIterator[str], on_disconnect: Callable[[], None],
                 on_close: Callable[[str], None], headers: dict[str, str]):
        self.events, self.on_disconnect, self.on_close, self.headers = events, on_disconnect, on_close, headers
        self.gone = False

    async def __call__(self, scope, receive, send) -> None:
        headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                   (b"x-accel-buffering", b"no")]  # proxies (nginx) must not buffer the stream
        headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()]
        watcher = asyncio.ensure_future(self._watch(receive))
        code = "OK"
        try:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            async for data in self.events:
                if self.gone:
                    break
                await send({"type": "http.response.body", "body": f"data: {data}\n\n".encode(), "more_body": True})
            if not self.gone:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # servers of ASGI spec 2.4 tell of a client gone by failing send
            self._disconnected()
        except BaseException:
            code = "INTERNAL"
            raise
        finally:
            watcher.cancel()
            await self.events.aclose()
            self.on_close("CANCELLED" if self.gone else code)

    async def _watch(self, receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self._disconnected()

    def _disconnected(self) -> None:
        if not self.gone:
            self.gone = True
            self.on_disconnect()
