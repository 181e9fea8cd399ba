"""Giving freed memory back to the system, so that RSS follows what the server holds.

glibc's malloc keeps the pages of freed blocks in its arenas: after a request that built a large
transient (a huge prompt rendered and tokenized, a grammar that exploded and was dropped) the
process stays as large as its peak, and a stream of such requests from many threads ratchets RSS
up. `release()` asks glibc to return free pages now (malloc_trim); `Trimmer` does it every few
seconds on a daemon thread. Where the C library has no malloc_trim (musl, macOS) both do nothing.

`cap_arenas()` (serve calls it first) lets all threads share ARENAS arenas instead of glibc's 8 per
core: each arena keeps its own free chunks around the pages malloc_trim can give back, and with the
grammar compiler, gRPC's and the HTTP door's threads each in an arena of their own, a hostile soak
held 100-136 MB of free chunks in 9 arenas and RSS crept +50 MB over 10 minutes after the first
minute; with 2 arenas it held ~60 MB and RSS stayed flat (1,061-1,080 MiB from 30 s to 600 s).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading

TRIM_INTERVAL_S = 5.0  # malloc_trim walks the free lists: ~1 ms per 100 MB held
ARENAS = 2  # glibc malloc arenas the server's threads share (MALLOC_ARENA_MAX, when set, wins)
M_ARENA_MAX = -8  # mallopt's parameter number (malloc.h)


def _libc():
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return lib if hasattr(lib, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _libc()


def release() -> None:
    """Return the C heap's free pages to the system now (glibc)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def cap_arenas(n: int = ARENAS) -> None:
    """Let this process's threads share at most `n` malloc arenas (glibc; before the threads start),
    unless the operator set MALLOC_ARENA_MAX."""
    if _LIBC is not None and "MALLOC_ARENA_MAX" not in os.environ:
        _LIBC.mallopt(M_ARENA_MAX, n)


class Trimmer:
    """release() every `interval` seconds until stop()."""

    def __init__(self, interval: float = TRIM_INTERVAL_S):
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-trim", daemon=True)

    def start(self) -> "Trimmer":
        if _LIBC is not None:
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            release()

    def stop(self) -> None:
        self._stop.set()
