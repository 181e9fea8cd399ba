"""A request's output: the client's `Stream` and the `TextOutput` that turns tokens into its text.

One `Stream` per request, whatever its n: iterating it gives the TokenDeltas of every completion
interleaved, each carrying its completion's `index`; the last delta of a completion carries that
completion's summary in `end`; `result()` gives the whole request (`GenResult.choices`: every
completion by index; its own fields are completion 0's, with completion_tokens summed). A gRPC or
HTTP door consumes the same object.

`TextOutput` owns detokenising and stop strings: tokens are pushed one by one, the text is cut
at the first stop string, and `take` hands out the new text while holding back a tail that may
be the start of a stop string (it is released when the next tokens show it is not).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import replace
from typing import Iterator

from service.engine.request import GenRequest, GenResult, TokenDelta

_END = object()


class Stream:
    """A request's output: iterate for TokenDelta items, then `result()`; `cancel()` frees its slot."""

    def __init__(self, req: GenRequest):
        self.request = req
        self._q: queue.Queue = queue.Queue()
        self._done = threading.Event()
        self._result: GenResult | None = None
        self._error: BaseException | None = None
        self.cancelled = threading.Event()
        self.submitted_at = time.perf_counter()
        self._choices: dict[int, GenResult] = {}  # completions ended so far, by index

    def __iter__(self) -> Iterator[TokenDelta]:
        while True:
            item = self._q.get()
            if item is _END:
                return
            yield item

    def result(self, timeout: float | None = None) -> GenResult:
        """Block until the generation ends; raises what ended it abnormally."""
        if not self._done.wait(timeout):
            raise TimeoutError("generation still running")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def cancel(self) -> None:
        """Ask the engine to stop this generation; its slot is freed at the next step."""
        self.cancelled.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    # engine side
    def _emit(self, delta: TokenDelta) -> None:
        self._q.put(delta)

    def _finish_choice(self, result: GenResult) -> None:
        """Completion `result.index` ended; the request ends with the last of its n completions."""
        self._choices[result.index] = result
        if len(self._choices) == self.request.n:
            self._finish(combine([self._choices[i] for i in range(self.request.n)]))

    def _finish(self, result: GenResult | None, error: BaseException | None = None) -> None:
        """End the request (the first call wins: a failed step ends every slot of it)."""
        if self._done.is_set():
            return
        self._result, self._error = result, error
        self._done.set()
        self._q.put(_END)


def combine(choices: list[GenResult]) -> GenResult:
    """A request's result from its completions in index order: completion 0's fields, completion
    tokens summed, the longest decode time, and every completion in `choices`."""
    first = choices[0]
    return replace(first, completion_tokens=sum(c.completion_tokens for c in choices),
                   decode_seconds=max(c.decode_seconds for c in choices), choices=tuple(choices))


class TextOutput:
    """The text of one generation: an incremental decoder, stop strings, and what was already sent."""

    def __init__(self, decoder, stops: tuple[str, ...]):
        """decoder: the tokenizer's incremental decoder (push(id) -> str, flush() -> str)."""
        self.decoder = decoder
        self.stops = tuple(x for x in stops if x)
        self.text = ""  # text of the generated tokens so far (cut at a stop string)
        self.sent = 0  # characters of `text` already handed out
        self.stopped = False  # a stop string ended the text

    def push(self, token: int) -> bool:
        """Decode one more token; True when a stop string now occurs (the text is cut before it)."""
        self.text += self.decoder.push(token)
        self.stopped = self._cut()
        return self.stopped

    def close(self) -> None:
        """The generation ended: decode what the decoder held back (unless a stop string ended it)."""
        if not self.stopped:
            self.text += self.decoder.flush()
            self.stopped = self._cut()

    def take(self, final: bool) -> str:
        """The text not handed out yet; unless final, less a tail that may begin a stop string."""
        upto = len(self.text) if final else len(self.text) - self._held()
        new = self.text[self.sent:upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return new

    def _cut(self) -> bool:
        """Truncate the text at the first stop string, if one occurs."""
        hits = [i for i in (self.text.find(x) for x in self.stops) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
        return bool(hits)

    def _held(self) -> int:
        """Characters at the end of the text that are a proper prefix of some stop string."""
        hold = 0
        for x in self.stops:
            for n in range(min(len(x) - 1, len(self.text)), 0, -1):
                if self.text.endswith(x[:n]):
                    hold = max(hold, n)
                    break
        return hold
