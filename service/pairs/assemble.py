"""The one path that turns a PairRequest into a pair able to serve, for a server's Load and for `specserve run`.

    assemble(factory, request) -> Assembled(pair, tokenizer, engine)

Load (fit, then allocate exactly the plan) -> the tokenizer from the target's GGUF -> the engine,
started -> warm-up (every batch tile, then one request through the engine: service/pairs/warmup.py).
Only a pair that came through all four is returned, so "ready" means "able to serve" wherever a pair
is made. Any failure releases everything the steps before it took, and a warm-up failure is
FAILED_PRECONDITION naming the device.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from service.common.errors import FailedPrecondition
from service.common.tokenizer import Tokenizer
from service.config.settings import DEFAULT_QUEUE_MAX, PairRequest, SpeculativeConfig
from service.engine.engine import Engine
from service.fit.factory import LoadedPair, PairFactory
from service.pairs.warmup import WarmupError, warm_up

log = logging.getLogger("specserve.registry")


def default_engine(pair: LoadedPair, tokenizer: Tokenizer, speculative: SpeculativeConfig, queue_max: int) -> Engine:
    return Engine(pair, tokenizer, speculative, queue_max=queue_max)


def default_tokenizer(pair: LoadedPair) -> Tokenizer:
    return Tokenizer.from_gguf(pair.target.file.reader)


@dataclass
class Assembled:
    """A pair able to serve: its buffers, its tokenizer and its started, warmed-up engine."""

    pair: LoadedPair
    tokenizer: Tokenizer
    engine: Engine
    warm_seconds: float

    def release(self, drain_timeout: float | None = None) -> None:
        """Stop the engine (its requests get up to `drain_timeout` s), then free every buffer."""
        try:
            self.engine.stop(drain_timeout) if drain_timeout is not None else self.engine.stop()
        finally:
            self.pair.release()


def assemble(factory: PairFactory, request: PairRequest, queue_max: int = DEFAULT_QUEUE_MAX,
             engine_factory: Callable = default_engine, tokenizer_factory: Callable = default_tokenizer) -> Assembled:
    """Load -> tokenizer -> engine -> warm-up; all or nothing (see the module docstring)."""
    pair = factory.load(request)
    engine = None
    try:
        tokenizer = tokenizer_factory(pair)
        engine = engine_factory(pair, tokenizer, pair.plan.params.speculative, queue_max)
        engine.start()
        warm_s = warm_up(pair, engine, tokenizer)
    except BaseException as e:
        log.warning("load of pair %s failed after allocation: releasing it", request.name)
        if engine is not None:
            engine.stop()
        pair.release()
        if isinstance(e, WarmupError):
            device = factory.backend.device_memory().name
            raise FailedPrecondition(f"pair {request.name!r} cannot serve on {device}: "
                                     f"its warm-up failed: {e}") from e
        raise
    measured = getattr(engine, "row_cost", None)
    cost = measured.describe() if measured is not None else "the backend's model"
    log.info("pair warmed up", extra={"kv": {"pair": request.name, "warmup_s": round(warm_s, 3), "row_cost": cost}})
    prefix = getattr(engine, "prefix", None)
    if prefix is not None:
        prefix.clear_counters()  # the warm-up request's miss is not a served one
    return Assembled(pair, tokenizer, engine, warm_s)
