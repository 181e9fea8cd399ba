"""The model-server protocol on the OpenAI port (GET /metrics): the vllm:* gauges an inference gateway's
endpoint picker scores replicas by are true while real requests arrive, run and finish, and have the
names, types and labels of the reference server, llm-d-inference-sim (built by scripts/setup.sh).

The engine's steps are gated (a fixture wraps `Engine.step`), so the test reads the gauges between two
steps, where every number is exact: running and waiting equal ListPairs' active_slots and queued, and
KV use is the cells the running requests hold (prompt, plus one per token generated but the last,
which is not fed yet) over the cells the plan gives the slots (ListPairs' plan.target.n_ctx)."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.pb.specserve.v1 import specserve_pb2 as pb
from tests.conftest import TINY, start_server, stop_server, tiny_config

ROOT = Path(__file__).resolve().parent.parent
SIM = ROOT / ".tools" / "llm-d-inference-sim"
GREEDY = pb.SamplingParams(temperature=0.0)
# what the endpoint picker reads (llm-d router / gateway-api-inference-extension defaults); no LoRA series
PICKER_READS = ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
                "vllm:cache_config_info")


def scrape(port: int) -> dict:
    """{family name: (type, [(labels, value), ...])} of http://127.0.0.1:port/metrics."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {f.name: (f.type, [(s.labels, s.value) for s in f.samples]) for f in text_string_to_metric_families(body)}


def one(families: dict, name: str) -> tuple[dict, float]:
    """The single sample of a family the picker reads (it keeps one value per replica)."""
    kind, samples = families[name]
    assert kind == "gauge" and len(samples) == 1, (name, families[name])
    return samples[0]


class Gate:
    """Lets the engine's worker run one step at a time; `parked` says it waits before a step."""

    def __init__(self, engine):
        self.real = engine.step
        self.go, self.done, self.parked = threading.Semaphore(0), threading.Semaphore(0), threading.Semaphore(0)

    def step(self) -> None:
        self.parked.release()
        self.go.acquire()
        try:
            self.real()
        finally:
            self.done.release()

    def wait_parked(self) -> None:
        assert self.parked.acquire(timeout=30), "the engine never came to a step"

    def one_step(self, more: bool) -> None:
        """Run one step; with `more` (requests still running or queued), wait until it parks again."""
        self.go.release()
        assert self.done.acquire(timeout=30), "the step did not finish"
        if more:
            self.wait_parked()


@pytest.fixture
def gated(tiny_models_dir, monkeypatch):
    """A tiny server without a drafter (one token per step), 2 slots of 256 cells, the HTTP door, its steps gated."""
    c = start_server(replace(tiny_config(tiny_models_dir, spec_type="none", n_parallel=2, n_ctx=512), http_port=0))
    gate = Gate(c.server.registry.get("default").engine)
    monkeypatch.setattr(c.server.registry.get("default").engine, "step", gate.step)
    yield c, gate
    for _ in range(64):  # whatever is still running finishes
        gate.go.release()
    stop_server(c)


def _tokens(c, text: str) -> int:
    return len(c.gen.Tokenize(pb.TokenizeRequest(text=text, add_special=True), timeout=30).tokens)


def test_waiting_running_and_kv_use_follow_requests_as_they_arrive_and_finish(gated):
    c, gate = gated
    port = c.server.http_port
    n_ctx = c.pair_info().plan.target.n_ctx

    def check(held_cells: int) -> None:
        """Every gauge against ListPairs (and the cells the running requests hold)."""
        info, m = c.pair_info(), scrape(port)
        assert one(m, "vllm:num_requests_running") == ({"model_name": "default"}, info.active_slots)
        assert one(m, "vllm:num_requests_waiting") == ({"model_name": "default"}, info.queued)
        assert one(m, "vllm:kv_cache_usage_perc") == ({"model_name": "default"}, held_cells / n_ctx)
        assert m["specserve_kv_cache_usage_ratio"][1] == [({"pair": "default"}, held_cells / n_ctx)]

    check(0)
    prompts = {"a": "the cat sat on the mat", "b": "a dog ran", "c": "the sun is hot and the sky is blue today"}
    budget = {"a": 3, "b": 5, "c": 2}  # max_tokens
    calls = {}

    def send(k: str):
        calls[k] = c.gen.Generate.future(pb.GenerateRequest(prompt=prompts[k], max_tokens=budget[k], sampling=GREEDY,
                                                            cache_prompt=False), timeout=120)

    def queued(n: int) -> None:
        deadline = time.monotonic() + 10
        while c.pair_info().queued < n:
            assert time.monotonic() < deadline, f"{n} requests were not queued"
            time.sleep(0.01)

    send("a")
    gate.wait_parked()  # a is in a slot, nothing computed yet
    send("b")
    queued(1)  # b before c: the queue's order is the order calls reach the engine
    send("c")
    queued(2)
    check(0)
    assert c.pair_info().active_slots == 1

    # The engine as the test expects it: admission before each step fills free slots in arrival order;
    # a step prefills a new request's prompt and samples its first token, or decodes one more.
    n_prompt = {k: _tokens(c, p) for k, p in prompts.items()}
    running, queue, made, seen = {"a": 0}, ["b", "c"], {}, []
    while running:
        for k in running:
            made[k] = made.get(k, 0) + 1
            running[k] = n_prompt[k] + made[k] - 1  # the last sampled token is not in the KV cache yet
        for k in [k for k in running if made[k] == budget[k]]:
            del running[k]
        while queue and len(running) < 2:
            running[queue.pop(0)] = 0
        gate.one_step(more=bool(running))
        check(sum(running.values()))
        seen.append((len(running), len(queue), sum(running.values())))
    for k, f in calls.items():
        r = f.result(timeout=30)
        assert r.finish_reason == pb.FINISH_REASON_LENGTH and r.usage.completion_tokens == budget[k], (k, r)
    assert len({s[0] for s in seen}) > 1 and len({s[2] for s in seen}) > 2  # the gauges moved
    check(0)


def test_several_pairs_are_one_series_each_summed_and_specserve_keeps_them_apart(tiny_models_dir):
    c = start_server(replace(tiny_config(tiny_models_dir, spec_type="none", n_parallel=2, n_ctx=512), http_port=0))
    try:
        c.model.Load(pb.LoadRequest(pair=pb.PairSpec(
            name="other", target_path=str(tiny_models_dir / TINY),
            params=pb.ContextParams(n_ctx=1024, n_parallel=1, prompt_cache_bytes=64 << 20),
            speculative=pb.SpeculativeConfig(type=pb.DRAFTER_TYPE_NONE))), timeout=120)
        m = scrape(c.server.http_port)
        for name in PICKER_READS[:3]:
            assert one(m, name)[0] == {"model_name": "default,other"}
        labels, value = one(m, "vllm:cache_config_info")
        blocks = 0
        for info in (c.pair_info("default"), c.pair_info("other")):
            kv = sum(b.bytes for b in info.plan.buffers if b.owner == "target" and b.kind == "kv_cache")
            (store,) = [b.bytes for b in info.plan.buffers if b.kind == "prompt_cache"]
            blocks += store // (128 * kv // info.plan.target.n_ctx)
        assert labels == {"block_size": "128", "num_gpu_blocks": str(blocks)} and value == 1
        assert sorted(s[0]["pair"] for s in m["specserve_kv_cache_usage_ratio"][1]) == ["default", "other"]
        c.model.Unload(pb.UnloadRequest(name="other"), timeout=60)
        assert one(scrape(c.server.http_port), "vllm:num_requests_running")[0] == {"model_name": "default"}
    finally:
        stop_server(c)


# ---- the reference: llm-d-inference-sim ----

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def simulator():
    """llm-d-inference-sim serving a made-up model on a free port (.tools/, from scripts/setup.sh)."""
    assert SIM.exists(), f"{SIM} is missing: run scripts/setup.sh (its step 5 builds it from tests/sim/go.mod)"
    port = _free_port()
    proc = subprocess.Popen([str(SIM), "--model", "sim-model", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                scrape(port)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "llm-d-inference-sim did not start"
                time.sleep(0.1)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_every_series_the_picker_reads_has_the_simulators_name_type_and_labels(simulator, tiny_models_dir):
    c = start_server(replace(tiny_config(tiny_models_dir, spec_type="none", n_parallel=2, n_ctx=512), http_port=0))
    try:
        ours, ref = scrape(c.server.http_port), scrape(simulator)
    finally:
        stop_server(c)
    for name in PICKER_READS:
        kind, samples = ref[name]
        assert name in ours, name
        assert ours[name][0] == kind, (name, ours[name][0], kind)
        assert {tuple(sorted(s[0])) for s in ours[name][1]} == {tuple(sorted(s[0])) for s in samples}, name
    assert not [n for n in ours if "lora" in n]  # no adapters, no LoRA series
