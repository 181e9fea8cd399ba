"""The model-server protocol an inference gateway's endpoint picker reads, served at GET /metrics.

The Gateway API Inference Extension's endpoint picker (and llm-d's router, built on it) scrapes
`http://<pod>:<targetPort>/metrics` on the OpenAI port and scores replicas by these gauges, with
the names and label shapes vLLM uses (docs/proposals/003-model-server-protocol in
sigs.k8s.io/gateway-api-inference-extension):

    vllm:num_requests_waiting{model_name}       requests queued for a slot
    vllm:num_requests_running{model_name}       slots generating (a request of n completions holds n)
    vllm:kv_cache_usage_perc{model_name}        target KV cells the busy slots hold / cells planned, 0-1
    vllm:cache_config_info{block_size, num_gpu_blocks} = 1
                                                the prompt store's blocks: BLOCK_TOKENS cells each, how many

The picker keeps ONE sample per family (without a label filter, the first or the last it parses,
depending on its version: none carries a timestamp), so each is one series for the whole server:
summed over the serving pairs (KV use is the sum of cells in use over the sum of cells planned),
`model_name` the pairs' names joined by "," ("default" in the usual one-pair server). specserve's
own series stay per pair; `specserve_kv_cache_usage_ratio{pair}` is the KV use of each. No LoRA
series: specserve serves no adapters. Everything is read from the engines' and prompt stores'
stats at scrape time, the same numbers ListPairs reports.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response

from service.fit.cache_layout import BLOCK_TOKENS


@dataclass(frozen=True)
class PairLoad:
    """What one serving pair holds now."""

    name: str
    waiting: int  # requests queued for a slot
    running: int  # busy slots
    kv_cells_used: int  # target KV cells of the busy slots
    kv_cells: int  # target KV cells planned for the slots
    store_blocks: int  # prompt store blocks of BLOCK_TOKENS cells


def pair_load(name: str, engine) -> PairLoad:
    """A pair's load from its engine's stats and its prompt store's."""
    st = engine.stats()
    prefix = getattr(engine, "prefix", None)
    blocks = prefix.stats().get("blocks", 0) if prefix is not None else 0
    return PairLoad(name, st.get("queued", 0), st.get("active_slots", 0), st.get("kv_cells_used", 0),
                    st.get("kv_cells", 0), blocks)


def usage(used: int, cells: int) -> float:
    """Cells in use over cells planned (0 with none planned)."""
    return used / cells if cells else 0.0


class ModelServerCollector(Collector):
    """The vLLM-named gauges over a PairRegistry's serving pairs, computed at each scrape."""

    def __init__(self, registry):
        self.registry = registry

    def loads(self) -> list[PairLoad]:
        """Every pair with an engine (loading and unloaded pairs hold nothing), sorted by name."""
        return [pair_load(sp.name, sp.engine) for sp in self.registry.list() if sp.engine is not None]

    def collect(self):
        loads = self.loads()
        model = ",".join(p.name for p in loads)

        def one(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric([model], value)
            return g

        yield one("vllm:num_requests_waiting", "Requests waiting for a slot, all pairs",
                  sum(p.waiting for p in loads))
        yield one("vllm:num_requests_running", "Slots generating now, all pairs", sum(p.running for p in loads))
        yield one("vllm:kv_cache_usage_perc", "Target KV cells in use over cells planned, all pairs (0-1)",
                  usage(sum(p.kv_cells_used for p in loads), sum(p.kv_cells for p in loads)))
        info = GaugeMetricFamily("vllm:cache_config_info", "The prompt store's block size (tokens) and blocks",
                                 labels=["block_size", "num_gpu_blocks"])
        info.add_metric([str(BLOCK_TOKENS), str(sum(p.store_blocks for p in loads))], 1)
        yield info
        per_pair = GaugeMetricFamily("specserve_kv_cache_usage_ratio",
                                     "Target KV cells the busy slots hold over the cells planned (0-1)",
                                     labels=["pair"])
        for p in loads:
            per_pair.add_metric([p.name], usage(p.kv_cells_used, p.kv_cells))
        yield per_pair


def metrics_endpoint(registry):
    """GET /metrics: every series of the server's Prometheus registry (specserve's and the vllm: ones), as
    the --metrics-port serves them; no token needed (as /health and the metrics port)."""

    async def endpoint(request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
    return endpoint
