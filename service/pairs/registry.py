"""The pairs a server holds, by name: load, unload, look up. Thread-safe.

Lifecycle of a name:  loading -> ready -> draining -> (gone)
A Load goes through service/pairs/assemble.py (load, tokenizer, engine, warm-up), the path `specserve
run` takes too, so a pair becomes ready only after its warm-up ran the path requests take.
A request to a loading or draining pair gets UNAVAILABLE; to an unknown name NOT_FOUND; to any
name while nothing at all is loaded FAILED_PRECONDITION. Loads of different pairs run side by
side (the factory reserves each plan's memory, so no two spend the same bytes); a Load that
fails after the factory allocated releases the pair before the error leaves, so the ledger is
as it was.

Fit and Load run in a daemon thread each and are waited for at most `load_timeout` seconds
(DEADLINE_EXCEEDED), or until the server drains (UNAVAILABLE): a stuck file or tokenizer costs
its own client a deadline and nobody else anything. A Load abandoned that way leaves its name
free at once; should it ever finish, its pair is released.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from service.common.choices import PairState
from service.common.errors import AlreadyExists, DeadlineExceeded, FailedPrecondition, NotFound, Unavailable
from service.common.tokenizer import Tokenizer
from service.config.settings import DEFAULT_DRAIN_TIMEOUT, DEFAULT_LOAD_TIMEOUT, DEFAULT_QUEUE_MAX
from service.engine.engine import Engine
from service.fit.factory import FitResult, LoadedPair, PairFactory, PairRequest
from service.fit.params import SpeculativeConfig
from service.pairs.assemble import assemble, default_engine, default_tokenizer

log = logging.getLogger("specserve.registry")



def return_memory() -> None:
    """Free what an unloaded pair held now rather than at some later collection: its engine and
    contexts reference each other (a cycle only the collector frees), and glibc keeps freed heap
    pages unless asked to trim them."""
    gc.collect()
    if _libc is not None:
        _libc.malloc_trim(0)


def _glibc():
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "malloc_trim") else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): the collector alone
        return None


_libc = _glibc()


@dataclass
class ServedPair:
    """A pair under a name: its buffers, tokenizer and engine (None while loading)."""

    name: str
    request: PairRequest
    state: PairState = "loading"
    pair: LoadedPair | None = None
    tokenizer: Tokenizer | None = None
    engine: Engine | None = None
    loaded_at: float = 0.0
    load_seconds: float = 0.0
    abandoned: bool = False  # its Load ran past the time limit: released when (if) it finishes

    @property
    def ready(self) -> bool:
        return self.state == "ready"


class PairRegistry:
    """Named pairs of one server. `on_change()` is called after every state change (health status)."""

    def __init__(self, factory: PairFactory, metrics=None, queue_max: int = DEFAULT_QUEUE_MAX,
                 engine_factory: Callable = default_engine, tokenizer_factory: Callable = default_tokenizer,
                 on_change: Callable[[], None] | None = None, load_timeout: float = DEFAULT_LOAD_TIMEOUT):
        self.factory = factory
        self.metrics = metrics
        self.queue_max = queue_max
        self._engine_factory = engine_factory
        self._tokenizer_factory = tokenizer_factory
        self._on_change = on_change or (lambda: None)
        self._pairs: dict[str, ServedPair] = {}
        self._lock = threading.Lock()
        self.load_timeout = load_timeout
        self._draining = False

    # ---- queries ----
    def fit(self, req: PairRequest) -> FitResult:
        """The factory's plan for `req`, given what loaded pairs hold now. Allocates nothing."""
        return self._bounded(lambda: self.factory.fit(req), f"fit-{req.name}",
                             f"planning pair {req.name!r}")

    def _bounded(self, fn: Callable, thread_name: str, what: str, on_give_up: Callable[[], bool] = lambda: True):
        """fn() in a daemon thread, waited for up to load_timeout s and only while the server is not draining.

        Giving up calls `on_give_up()`; when it returns False (fn finished meanwhile) the wait goes on."""
        box: dict = {}
        done = threading.Event()

        def run():
            try:
                box["value"] = fn()
            except BaseException as e:  # noqa: BLE001 - re-raised in the waiting thread
                box["error"] = e
            finally:
                done.set()

        threading.Thread(target=run, name=thread_name, daemon=True).start()
        deadline = time.monotonic() + self.load_timeout
        while not done.wait(max(0.0, min(0.1, deadline - time.monotonic()))):
            overdue = time.monotonic() >= deadline
            if (overdue or self._draining) and on_give_up():
                log.warning("gave up waiting: %s", what, extra={"kv": {"overdue": overdue}})
                if overdue:
                    raise DeadlineExceeded(f"{what} took longer than the server's load timeout "
                                           f"({self.load_timeout:g} s): abandoned")
                raise Unavailable(f"the server is shutting down: {what} abandoned")
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def get(self, name: str) -> ServedPair:
        """The ready pair `name`; UNAVAILABLE while it loads or drains, NOT_FOUND / FAILED_PRECONDITION otherwise."""
        with self._lock:
            sp = self._pairs.get(name)
            if sp is None:
                if self._draining:
                    raise Unavailable("the server is shutting down")
                if not any(p.ready for p in self._pairs.values()):
                    loading = [p.name for p in self._pairs.values() if p.state == "loading"]
                    if loading:
                        raise Unavailable(f"no pair is ready yet ({', '.join(loading)} loading): retry shortly")
                    raise FailedPrecondition("no pair is loaded: call ModelService.Load first")
                raise NotFound(f"pair {name!r} is not loaded (loaded: {', '.join(sorted(self._pairs))})")
            if sp.state == "loading":
                raise Unavailable(f"pair {name!r} is loading: retry shortly")
            if sp.state == "draining" or self._draining:
                raise Unavailable(f"pair {name!r} is draining (unloading or shutting down)")
            return sp

    def list(self) -> list[ServedPair]:
        """Every pair, sorted by name."""
        with self._lock:
            return [self._pairs[n] for n in sorted(self._pairs)]

    def any_ready(self) -> bool:
        with self._lock:
            return not self._draining and any(p.ready for p in self._pairs.values())

    # ---- load / unload ----
    def load(self, req: PairRequest) -> ServedPair:
        """Fit, allocate, build the tokenizer and start the engine; all or nothing."""
        with self._lock:
            if self._draining:
                raise Unavailable("the server is shutting down")
            if req.name in self._pairs:
                state = self._pairs[req.name].state
                raise AlreadyExists(f"pair {req.name!r} is already {'loaded' if state == 'ready' else state}: "
                                    "unload it first or choose another name")
            sp = self._pairs[req.name] = ServedPair(req.name, req)
        self._on_change()
        try:
            self._bounded(lambda: self._materialise(sp), f"load-{req.name}", f"loading pair {req.name!r}",
                          on_give_up=lambda: self._abandon(sp))
        except BaseException:
            with self._lock:
                if self._pairs.get(req.name) is sp:
                    del self._pairs[req.name]
            self._on_change()
            raise
        self._on_change()
        return sp

    def _abandon(self, sp: ServedPair) -> bool:
        """Give up a Load still running: free its name now, release its pair when it finishes.
        False when it finished meanwhile (the pair serves)."""
        with self._lock:
            if sp.pair is not None:
                return False
            sp.abandoned = True
            return True

    def _materialise(self, sp: ServedPair) -> None:
        t0 = time.monotonic()
        made = assemble(self.factory, sp.request, self.queue_max, self._engine_factory, self._tokenizer_factory)
        pair, tokenizer, engine = made.pair, made.tokenizer, made.engine
        with self._lock:
            abandoned = sp.abandoned
            if not abandoned:
                prefix = getattr(engine, "prefix", None)
                if self.metrics is not None:  # after warm-up: its tokens are not served ones
                    engine.metrics = self.metrics.for_pair(sp.name)
                    self.metrics.track_engine(sp.name, engine.stats, prefix.stats if prefix is not None else None)
                sp.pair, sp.tokenizer, sp.engine = pair, tokenizer, engine
                sp.loaded_at, sp.load_seconds = time.time(), time.monotonic() - t0
                sp.state = "draining" if self._draining else "ready"
        if abandoned:
            log.warning("pair %s finished loading after its client was given up on: releasing it", sp.name)
            made.release(0)
            return
        log.info("pair ready", extra={"kv": {"pair": sp.name, "bytes": pair.plan.total_bytes,
                                              "load_s": round(sp.load_seconds, 3)}})

    def unload(self, name: str, drain_timeout: float = DEFAULT_DRAIN_TIMEOUT) -> int:
        """Drain the pair's requests (up to drain_timeout, then cancel them), release it and give its
        memory back to the operating system; returns bytes released."""
        released = self._unload(name, drain_timeout)
        return_memory()  # here, where no frame holds the pair any more
        return released

    def _unload(self, name: str, drain_timeout: float) -> int:
        with self._lock:
            sp = self._pairs.get(name)
            if sp is None:
                raise NotFound(f"pair {name!r} is not loaded")
            if sp.state != "ready":
                raise Unavailable(f"pair {name!r} is {sp.state}")
            sp.state = "draining"
        self._on_change()
        try:
            return self._release(sp, drain_timeout)
        finally:
            with self._lock:
                self._pairs.pop(name, None)
            self._on_change()

    def _release(self, sp: ServedPair, drain_timeout: float) -> int:
        released = sum(s.nbytes for s in sp.pair.allocated())
        try:
            sp.engine.stop(drain_timeout)
        finally:
            sp.pair.release()
            if self.metrics is not None:
                self.metrics.forget_pair(sp.name)
        log.info("pair unloaded", extra={"kv": {"pair": sp.name, "released_bytes": released}})
        return released

    def begin_drain(self) -> None:
        """From now on every pair refuses new requests with UNAVAILABLE (in-flight ones continue)."""
        with self._lock:
            self._draining = True
            for sp in self._pairs.values():
                if sp.state == "ready":
                    sp.state = "draining"
        self._on_change()

    def shutdown(self, drain_timeout: float = DEFAULT_DRAIN_TIMEOUT) -> None:
        """Drain and release every pair (engines stop in parallel)."""
        self.begin_drain()
        with self._lock:
            pairs = [p for p in self._pairs.values() if p.engine is not None]
        threads = [threading.Thread(target=self._release_quietly, args=(sp, drain_timeout)) for sp in pairs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with self._lock:
            for sp in pairs:
                self._pairs.pop(sp.name, None)
        self._on_change()

    def _release_quietly(self, sp: ServedPair, drain_timeout: float) -> None:
        try:
            self._release(sp, drain_timeout)
        except Exception:
            log.exception("releasing pair %s failed", sp.name)

    # ---- live speculative config ----
    def update_speculative(self, name: str, cfg: SpeculativeConfig) -> SpeculativeConfig:
        """Validate against the pair's plan (in the engine) and make `cfg` the live config."""
        sp = self.get(name)
        sp.engine.set_speculative(cfg)
        return sp.engine.speculative
