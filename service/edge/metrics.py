"""Prometheus metrics: one `Metrics` per server, each with its own CollectorRegistry.

The engine reports speculative decoding and generated tokens through a pair-bound view
(`metrics.for_pair(name)` -> `PairMetrics`), so the engine never sees labels:

    pair_metrics.on_step(drafts, draft_tokens, accepted)   after each speculative step
    pair_metrics.on_tokens(n)                              when n completion tokens are produced
    pair_metrics.on_prompt_cache(cached, evicted)          when a request starts: prompt tokens reused
                                                           (0: a miss; None: opted out), store entries
                                                           evicted for it

The servicers count requests, prompt tokens, latency and time to first token. Metric
names follow vLLM's spec-decode counters (`*_spec_decode_num_drafts_total`, ...).
"""

from __future__ import annotations

import threading
from typing import Callable, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class StepObserver(Protocol):
    """What the engine calls (the exact interface it depends on)."""

    def on_step(self, drafts: int, draft_tokens: int, accepted: int) -> None:
        """After a speculative step: `drafts` slots that drafted, `draft_tokens` proposed, `accepted` of them kept."""

    def on_tokens(self, n: int) -> None:
        """`n` completion tokens were produced (accepted drafts and bonus tokens included)."""

    def on_prompt_cache(self, cached: int | None, evicted: int) -> None:
        """A request started with `cached` prompt tokens' KV reused (0: a miss; None: it opted out, no
        lookup); `evicted` store entries were dropped to keep its slot's previous state."""


class PairMetrics:
    """The counters of one pair, labelled once; implements StepObserver."""

    def __init__(self, metrics: "Metrics", pair: str):
        self._drafts = metrics.spec_drafts.labels(pair=pair)
        self._draft_tokens = metrics.spec_draft_tokens.labels(pair=pair)
        self._accepted = metrics.spec_accepted_tokens.labels(pair=pair)
        self._completion = metrics.completion_tokens.labels(pair=pair)
        self._prompt = metrics.prompt_tokens.labels(pair=pair)
        self._cache_hits = metrics.prompt_cache_hits.labels(pair=pair)
        self._cache_misses = metrics.prompt_cache_misses.labels(pair=pair)
        self._cache_evictions = metrics.prompt_cache_evictions.labels(pair=pair)
        self._cached_tokens = metrics.prompt_cache_tokens.labels(pair=pair)

    def on_step(self, drafts: int, draft_tokens: int, accepted: int) -> None:
        self._drafts.inc(drafts)
        self._draft_tokens.inc(draft_tokens)
        self._accepted.inc(accepted)

    def on_tokens(self, n: int) -> None:
        self._completion.inc(n)

    def on_prompt_cache(self, cached: int | None, evicted: int) -> None:
        if cached is not None:
            (self._cache_hits if cached else self._cache_misses).inc()
            self._cached_tokens.inc(cached)
        self._cache_evictions.inc(evicted)

    def on_prompt(self, n: int) -> None:
        """A request with `n` prompt tokens was admitted (called by the servicer)."""
        self._prompt.inc(n)


class Metrics:
    """Every metric of one server, registered in its own registry (several servers can share a process)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.spec_drafts = Counter("specserve_spec_decode_num_drafts", "Speculative steps in which a slot drafted",
                                   ["pair"], registry=r)
        self.spec_draft_tokens = Counter("specserve_spec_decode_num_draft_tokens", "Draft tokens proposed",
                                         ["pair"], registry=r)
        self.spec_accepted_tokens = Counter("specserve_spec_decode_num_accepted_tokens",
                                            "Draft tokens accepted by verification", ["pair"], registry=r)
        self.prompt_tokens = Counter("specserve_prompt_tokens", "Prompt tokens of admitted requests", ["pair"],
                                     registry=r)
        self.completion_tokens = Counter("specserve_completion_tokens", "Completion tokens generated", ["pair"],
                                         registry=r)
        self.requests = Counter("specserve_requests", "Finished RPCs by method and status code",
                                ["method", "code"], registry=r)
        self.request_latency = Histogram("specserve_request_duration_seconds", "RPC latency by method",
                                         ["method"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("specserve_time_to_first_token_seconds",
                              "From a generation request's arrival to its first token", ["pair"],
                              buckets=TTFT_BUCKETS, registry=r)
        self.active_slots = Gauge("specserve_active_slots", "Slots generating now", ["pair"], registry=r)
        self.queued = Gauge("specserve_queued_requests", "Requests waiting for a slot", ["pair"], registry=r)
        self.prompt_cache_hits = Counter("specserve_prompt_cache_hits", "Requests that reused a cached prompt prefix",
                                         ["pair"], registry=r)
        self.prompt_cache_misses = Counter("specserve_prompt_cache_misses", "Requests that found no cached prefix",
                                           ["pair"], registry=r)
        self.prompt_cache_evictions = Counter("specserve_prompt_cache_evictions",
                                              "Prompt states dropped from the store to make room", ["pair"], registry=r)
        self.prompt_cache_tokens = Counter("specserve_prompt_cache_tokens",
                                           "Prompt tokens whose KV was reused instead of prefilled", ["pair"],
                                           registry=r)
        self.prompt_cache_used = Gauge("specserve_prompt_cache_used_bytes", "Bytes of the prompt store holding states",
                                       ["pair"], registry=r)
        self.prompt_cache_capacity = Gauge("specserve_prompt_cache_capacity_bytes",
                                           "Bytes planned for the prompt store", ["pair"], registry=r)
        self.prompt_cache_entries = Gauge("specserve_prompt_cache_entries", "Prompt states in the store", ["pair"],
                                          registry=r)
        self._pairs: dict[str, PairMetrics] = {}
        self._lock = threading.Lock()

    def for_pair(self, pair: str) -> PairMetrics:
        """The view the engine of `pair` reports to."""
        with self._lock:
            if pair not in self._pairs:
                self._pairs[pair] = PairMetrics(self, pair)
            return self._pairs[pair]

    def track_engine(self, pair: str, stats: Callable[[], dict], cache_stats: Callable[[], dict] | None = None) -> None:
        """Export an engine's `stats()` (active_slots, queued) and its prompt cache's (used and capacity
        bytes, entries) as gauges, read at scrape time."""
        self.active_slots.labels(pair=pair).set_function(lambda: stats().get("active_slots", 0))
        self.queued.labels(pair=pair).set_function(lambda: stats().get("queued", 0))
        if cache_stats is not None:
            for gauge, key in ((self.prompt_cache_used, "used_bytes"), (self.prompt_cache_capacity, "capacity_bytes"),
                               (self.prompt_cache_entries, "entries")):
                gauge.labels(pair=pair).set_function(lambda key=key: cache_stats().get(key, 0))

    def forget_pair(self, pair: str) -> None:
        """Remove every series of an unloaded pair (a name reloaded later starts from zero, which
        Prometheus reads as a counter reset): pairs come and go, their series must not pile up."""
        with self._lock:
            self._pairs.pop(pair, None)
        for metric in self.pair_metrics():
            try:
                metric.remove(pair)
            except KeyError:
                pass

    def pair_metrics(self) -> tuple:
        """Every metric labelled by pair."""
        return (self.spec_drafts, self.spec_draft_tokens, self.spec_accepted_tokens, self.prompt_tokens,
                self.completion_tokens, self.ttft, self.active_slots, self.queued, self.prompt_cache_hits,
                self.prompt_cache_misses, self.prompt_cache_evictions, self.prompt_cache_tokens,
                self.prompt_cache_used, self.prompt_cache_capacity, self.prompt_cache_entries)

    def on_request(self, method: str, code: str, seconds: float) -> None:
        """One finished RPC (called by the server interceptor)."""
        self.requests.labels(method=method, code=code).inc()
        self.request_latency.labels(method=method).observe(seconds)

    def on_first_token(self, pair: str, seconds: float) -> None:
        self.ttft.labels(pair=pair).observe(seconds)

    def value(self, name: str, **labels) -> float:
        """A sample's current value (0 when absent); for tests and the CLI."""
        v = self.registry.get_sample_value(name, labels)
        return 0.0 if v is None else v


def start_metrics_server(port: int, metrics: Metrics, addr: str = "0.0.0.0"):
    """Serve /metrics of `metrics.registry` over HTTP on `port` (0: any free port); returns (server, port)."""
    server, _thread = start_http_server(port, addr=addr, registry=metrics.registry)
    return server, server.server_port
