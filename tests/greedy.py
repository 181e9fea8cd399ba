"""Greedy generation through a fresh engine on a loaded pair, for the tests that compare whole outputs."""

from __future__ import annotations

from service.engine.engine import Engine
from service.engine.request import GenRequest, GenResult, SamplingParams
from service.fit.params import SpeculativeConfig

GREEDY = SamplingParams(temperature=0.0)


def greedy_results(pair, tok, prompts: list[list[int]], spec: SpeculativeConfig, max_tokens: int) -> list[GenResult]:
    """Each prompt's greedy result (all submitted at once, so they share the pair's slots), drafting as
    `spec` says; the engine is stopped after."""
    engine = Engine(pair, tok, SpeculativeConfig("none")).start()
    try:
        streams = [engine.submit(GenRequest(tuple(p), max_tokens=max_tokens, sampling=GREEDY, speculative=spec))
                   for p in prompts]
        return [s.result(timeout=600) for s in streams]
    finally:
        engine.stop()
