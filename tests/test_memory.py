"""Memory that comes back and shutdown that does not wait: the parsed-model cache is bounded, an
unloaded pair leaves no metric series behind, Unload gives the NumPy backend's memory back to the
OS at once, and an open health Watch stream does not hold the drain."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from compute import gguf_model
from service.pb.specserve.v1 import specserve_pb2 as pb
from tests.conftest import ROOT, TINY, start_server, stop_server, tiny_config
from tests.tiny_gguf import write_tiny_llama

GREEDY = dict(max_tokens=6, sampling=pb.SamplingParams(temperature=0))


def spec(name: str, target: str = TINY) -> pb.PairSpec:
    return pb.PairSpec(name=name, target_path=target, params=pb.ContextParams(n_ctx=256, n_parallel=1, n_batch=32))


def test_fitting_many_files_keeps_only_loaded_ones_and_a_few_recent(tmp_path):
    n = gguf_model.MODEL_CACHE_ENTRIES + 5
    names = [f"m{i}.gguf" for i in range(n)]
    for i, name in enumerate(names):
        write_tiny_llama(tmp_path / name, seed=10 + i)
    write_tiny_llama(tmp_path / TINY, seed=1)
    c = start_server(tiny_config(tmp_path, startup=False))
    try:
        c.model.Load(pb.LoadRequest(pair=spec("kept", names[0])), timeout=30)
        for name in names[1:]:
            assert c.model.Fit(pb.FitRequest(pair=spec("f", name)), timeout=30).fits
        gc.collect()
        held = sorted(os.path.basename(p) for p in gguf_model.cached_model_paths()
                      if os.path.dirname(p) == os.path.realpath(tmp_path))
        recent = names[-gguf_model.MODEL_CACHE_ENTRIES:]
        assert held == sorted({names[0], *recent}), held  # the loaded pair's file + the most recent ones
        loaded = c.server.registry.get("kept").pair.target.file
        assert gguf_model.open_model(str(tmp_path / names[0])) is loaded  # shared, not parsed again
        c.model.Unload(pb.UnloadRequest(name="kept"), timeout=30)
        del loaded
        for name in names[1:1 + gguf_model.MODEL_CACHE_ENTRIES]:  # newer than m0, which the line above opened
            c.model.Fit(pb.FitRequest(pair=spec("f", name)), timeout=30)
        gc.collect()
        assert names[0] not in [os.path.basename(p) for p in gguf_model.cached_model_paths()]
    finally:
        stop_server(c)


def _series(metrics, pair: str) -> list[tuple[str, dict]]:
    return [(s.name, s.labels) for m in metrics.registry.collect() for s in m.samples if s.labels.get("pair") == pair]


def test_an_unloaded_pair_leaves_no_metric_series(tiny_models_dir):
    c = start_server(tiny_config(tiny_models_dir, startup=False, spec_type="draft"))
    try:
        draft = pb.PairSpec(name="gone", target_path=TINY, draft_path="tiny-draft.gguf",
                            params=pb.ContextParams(n_ctx=256, n_parallel=1, n_batch=32),
                            speculative=pb.SpeculativeConfig(type=pb.DRAFTER_TYPE_DRAFT_MODEL, n_max=3))
        c.model.Load(pb.LoadRequest(pair=draft), timeout=30)
        c.model.Load(pb.LoadRequest(pair=spec("stays")), timeout=30)
        for pair in ("gone", "stays"):
            list(c.gen.GenerateStream(pb.GenerateStreamRequest(pair=pair, prompt="the cat sat", **GREEDY), timeout=30))
        metrics = c.server.metrics
        before = _series(metrics, "gone")
        names = {name for name, _ in before}
        assert len(before) > 20 and {"specserve_time_to_first_token_seconds_bucket", "specserve_active_slots",
                                     "specserve_completion_tokens_total",
                                     "specserve_spec_decode_num_drafts_total"} <= names, names
        stays = _series(metrics, "stays")
        c.model.Unload(pb.UnloadRequest(name="gone"), timeout=30)
        assert _series(metrics, "gone") == []
        assert _series(metrics, "stays") == stays  # the other pair keeps all of its series
        c.model.Load(pb.LoadRequest(pair=draft), timeout=30)  # the name again: counted from zero
        assert metrics.value("specserve_completion_tokens_total", pair="gone") == 0
    finally:
        stop_server(c)


def test_an_open_health_watch_does_not_hold_the_drain(tiny_models_dir):
    c = start_server(tiny_config(tiny_models_dir, drain_timeout=30.0))
    seen, ended = [], threading.Event()

    def watch():
        try:
            for resp in health_pb2_grpc.HealthStub(c.channel).Watch(health_pb2.HealthCheckRequest(), timeout=120):
                seen.append(resp.status)
        except grpc.RpcError:
            pass
        ended.set()

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 10
        while not seen:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert seen[0] == health_pb2.HealthCheckResponse.SERVING
        assert c.gen.Generate(pb.GenerateRequest(prompt="the", **GREEDY), timeout=30).tokens
        t0 = time.monotonic()
        c.server.drain_and_stop()  # the 30 s drain timeout: nothing in flight but the Watch
        elapsed = time.monotonic() - t0
        print(f"drain_and_stop with a Watch open took {elapsed:.2f} s")
        assert elapsed < 3.0, elapsed
        assert ended.wait(5)  # the Watch stream was ended, after it saw NOT_SERVING
        assert health_pb2.HealthCheckResponse.NOT_SERVING in seen
    finally:
        stop_server(c)


RSS_PROBE = """
import json, os, sys, time
sys.path.insert(0, {root!r})
from compute import gguf_model
from service.fit.factory import PairRequest
from service.fit.params import ContextParams
from service.engine.request import GenRequest
from service.server import ServerConfig, SpecServer
from tests.models import packaged_model_path

gguf_model.MODEL_CACHE_ENTRIES = int(sys.argv[1])

def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

m = packaged_model_path()
srv = SpecServer(ServerConfig(port=0, backend="numpy", threads=1, models_dir=os.path.dirname(m), default_target=m))
srv.start()
before = rss_mib()
srv.registry.load(PairRequest(name="p", target_path=m, params=ContextParams(n_ctx=512, n_parallel=2, n_batch=64)))
eng = srv.registry.get("p").engine
for first in (10, 1000, 2000):  # three prompts on two slots: one state goes to the prompt store (its pages in use)
    eng.submit(GenRequest(tuple(range(first, first + 150)), max_tokens=2)).result(timeout=120)
assert eng.prefix.stats()["used_bytes"] > 0
del eng  # no reference to the pair may outlive the Unload
loaded = rss_mib()
t0 = time.monotonic()
srv.registry.unload("p", 0)
seconds = time.monotonic() - t0
print(json.dumps(dict(before=before, loaded=loaded, unloaded=rss_mib(), unload_seconds=seconds)))
srv.stop()
"""


def test_unload_gives_the_numpy_backends_memory_back_at_once(tmp_path, real_model):
    """The packaged model on the NumPy backend, in a process of its own (RSS is per process), its prompt
    store in use. With the parsed-file cache off, RSS is back near where it was before the Load when
    Unload returns; with the default cache it keeps that one parsed file (bounded by MODEL_CACHE_ENTRIES)."""
    script = tmp_path / "rss_probe.py"
    script.write_text(RSS_PROBE.format(root=str(ROOT)))
    for entries, kept in ((0, 0.15), (gguf_model.MODEL_CACHE_ENTRIES, 0.5)):
        proc = subprocess.run([sys.executable, str(script), str(entries)], capture_output=True, text=True,
                              timeout=300, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"cache entries {entries}: RSS MiB before load {r['before']:.0f}, loaded {r['loaded']:.0f}, "
              f"after unload {r['unloaded']:.0f} (unload took {r['unload_seconds']:.2f} s)")
        grown = r["loaded"] - r["before"]
        assert grown > 300  # the pair's buffers: the f32 weights of 135M parameters and more
        assert r["unload_seconds"] < 1.0
        assert r["unloaded"] - r["before"] < kept * grown, r
