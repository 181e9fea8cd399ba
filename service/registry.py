"""The pairs a server holds, by name: load (factory + tokenizer + engine), unload, look up. Thread-safe.

Lifecycle of a name:  loading -> ready -> draining -> (gone)
A pair becomes ready only after its warm-up (service/warmup.py) ran the path requests take.
A request to a loading or draining pair gets UNAVAILABLE; to an unknown name NOT_FOUND; to any
name while nothing at all is loaded FAILED_PRECONDITION. Loads run one at a time (each Fit
sees the memory the previous Load took); a Load that fails after the factory allocated
releases the pair before the error leaves, so the ledger is as it was.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from service.errors import AlreadyExists, FailedPrecondition, NotFound, Unavailable
from service.factory import FitResult, LoadedPair, PairFactory, PairRequest
from service.params import SpeculativeConfig
from service.warmup import WarmupError, warm_up

log = logging.getLogger("specserve.registry")

DEFAULT_DRAIN_TIMEOUT = 30.0
DEFAULT_LOAD_TIMEOUT = 300.0  # seconds a Fit or Load may take before its client gets DEADLINE_EXCEEDED


@dataclass
class ServedPair:
    """A pair under a name: its buffers, tokenizer and engine (None while loading)."""

    name: str
    request: PairRequest
    state: str = "loading"  # "loading" | "ready" | "draining"
    pair: LoadedPair | None = None
    tokenizer: object | None = None  # service.tokenizer.Tokenizer
    engine: object | None = None  # service.engine.Engine
    loaded_at: float = 0.0
    load_seconds: float = 0.0

    @property
    def ready(self) -> bool:
        return self.state == "ready"


def _default_engine(pair: LoadedPair, tokenizer, speculative: SpeculativeConfig, queue_max: int, metrics):
    from service.engine import Engine

    return Engine(pair, tokenizer, speculative, queue_max=queue_max, metrics=metrics)


def _default_tokenizer(pair: LoadedPair):
    from service.tokenizer import Tokenizer

    return Tokenizer.from_gguf(pair.target.file.reader)


class PairRegistry:
    """Named pairs of one server. `on_change()` is called after every state change (health status)."""

    def __init__(self, factory: PairFactory, metrics=None, queue_max: int = 64,
                 engine_factory: Callable = _default_engine, tokenizer_factory: Callable = _default_tokenizer,
                 on_change: Callable[[], None] | None = None):
        self.factory = factory
        self.metrics = metrics
        self.queue_max = queue_max
        self._engine_factory = engine_factory
        self._tokenizer_factory = tokenizer_factory
        self._on_change = on_change or (lambda: None)
        self._pairs: dict[str, ServedPair] = {}
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()  # one Load at a time
        self._draining = False

    # ---- queries ----
    def fit(self, req: PairRequest) -> FitResult:
        """The factory's plan for `req`, given what loaded pairs hold now. Allocates nothing."""
        return self.factory.fit(req)

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
            with self._load_lock:
                self._materialise(sp)
        except BaseException:
            with self._lock:
                del self._pairs[req.name]
            self._on_change()
            raise
        self._on_change()
        return sp

    def _materialise(self, sp: ServedPair) -> None:
        t0 = time.monotonic()
        pair = self.factory.load(sp.request)
        engine = None
        try:
            tokenizer = self._tokenizer_factory(pair)
            engine = self._engine_factory(pair, tokenizer, pair.plan.params.speculative, self.queue_max, None)
            engine.start()
            warm_s = warm_up(pair, engine, tokenizer)
            engine.metrics = self.metrics.for_pair(sp.name) if self.metrics is not None else None  # after warm-up
        except BaseException as e:
            log.warning("load of pair %s failed after allocation: releasing it", sp.name)
            if engine is not None:
                engine.stop()
            pair.release()
            if isinstance(e, WarmupError):
                raise FailedPrecondition(f"pair {sp.name!r} cannot serve on {self.factory.backend.device_memory().name}: "
                                         f"its warm-up failed: {e}") from e
            raise
        log.info("pair warmed up", extra={"kv": {"pair": sp.name, "warmup_s": round(warm_s, 3)}})
        if self.metrics is not None:
            self.metrics.track_engine(sp.name, engine.stats)
        with self._lock:
            sp.pair, sp.tokenizer, sp.engine = pair, tokenizer, engine
            sp.loaded_at, sp.load_seconds = time.time(), time.monotonic() - t0
            sp.state = "draining" if self._draining else "ready"
        log.info("pair ready", extra={"kv": {"pair": sp.name, "bytes": pair.plan.total_bytes,
                                              "load_s": round(sp.load_seconds, 3)}})

    def unload(self, name: str, drain_timeout: float = DEFAULT_DRAIN_TIMEOUT) -> int:
        """Drain the pair's requests (up to drain_timeout, then cancel them), release it; returns bytes released."""
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
