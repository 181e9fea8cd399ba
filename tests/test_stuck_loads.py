"""A stuck or slow Fit/Load costs its own client a deadline and nobody else anything (--load-timeout), and
SIGTERM ends `specserve serve` within the drain timeout + 5 s whatever a loader thread is doing."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace

import grpc
import pytest
from grpc_health.v1 import health_pb2

from service.pb.specserve.v1 import specserve_pb2 as pb
from service.pb.specserve.v1 import specserve_pb2_grpc as pb_grpc
from tests.conftest import ROOT, TINY, start_server, stop_server, tiny_config
from tests.test_service_cli import ENV

SERVING = health_pb2.HealthCheckResponse.SERVING
LOAD_TIMEOUT = 3.0


def spec(name: str) -> pb.PairSpec:
    return pb.PairSpec(name=name, target_path=TINY, params=pb.ContextParams(n_ctx=256, n_parallel=1, n_batch=32))


def code_of(fn, *args, **kw) -> grpc.StatusCode:
    try:
        fn(*args, **kw)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


@pytest.fixture
def server(tiny_models_dir):
    c = start_server(replace(tiny_config(tiny_models_dir, startup=False), load_timeout=LOAD_TIMEOUT))
    yield c
    stop_server(c)


def test_a_stuck_load_blocks_no_other_pair_and_answers_deadline_exceeded(server):
    c, reg = server, server.server.registry
    release = threading.Event()
    real = reg._tokenizer_factory
    reg._tokenizer_factory = lambda pair: (release.wait() if pair.request.name == "stuck" else True) and real(pair)
    stuck: dict = {}

    def load_stuck():
        t0 = time.monotonic()
        stuck["code"] = code_of(c.model.Load, pb.LoadRequest(pair=spec("stuck")), timeout=60)
        stuck["seconds"] = time.monotonic() - t0

    t = threading.Thread(target=load_stuck)
    t.start()
    try:
        deadline = time.monotonic() + 10
        while [p.name for p in c.model.ListPairs(pb.ListPairsRequest(), timeout=5).pairs] != ["stuck"]:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        # while "stuck" hangs after allocating: another pair loads, serves, unloads; health and ListPairs answer
        t0 = time.monotonic()
        c.model.Load(pb.LoadRequest(pair=spec("other")), timeout=30)
        assert c.health_status() == SERVING
        greedy = dict(max_tokens=2, sampling=pb.SamplingParams(temperature=0))
        assert c.gen.Generate(pb.GenerateRequest(pair="other", prompt="the", **greedy), timeout=30).tokens
        assert {p.name: p.state for p in c.model.ListPairs(pb.ListPairsRequest(), timeout=5).pairs} == {
            "stuck": pb.PAIR_STATE_LOADING, "other": pb.PAIR_STATE_READY}
        assert c.model.Unload(pb.UnloadRequest(name="other"), timeout=30).released_bytes > 0
        assert time.monotonic() - t0 < LOAD_TIMEOUT  # none of it waited for the stuck Load
        t.join(LOAD_TIMEOUT + 10)
        assert stuck["code"] == grpc.StatusCode.DEADLINE_EXCEEDED
        assert LOAD_TIMEOUT - 0.5 < stuck["seconds"] < LOAD_TIMEOUT + 5
        assert c.model.ListPairs(pb.ListPairsRequest(), timeout=5).pairs == []  # the name is free again
        assert c.server.backend.ledger.total_bytes() > 0  # the abandoned Load still holds its buffers
    finally:
        release.set()
        t.join(30)
    deadline = time.monotonic() + 20  # once it finishes, the abandoned pair is released
    while c.server.backend.ledger.total_bytes():
        assert time.monotonic() < deadline, c.server.backend.ledger.entries()
        time.sleep(0.05)
    assert c.model.ListPairs(pb.ListPairsRequest(), timeout=5).pairs == []
    c.model.Load(pb.LoadRequest(pair=spec("stuck")), timeout=30)  # the name loads normally now
    assert c.pair_info("stuck").state == pb.PAIR_STATE_READY


def test_a_stuck_fit_answers_deadline_exceeded_and_blocks_nothing(server):
    c, factory = server, server.server.factory
    release = threading.Event()
    real_fit = factory.fit
    factory.fit = lambda req: (release.wait() if req.name == "stuck" else True) and real_fit(req)
    try:
        t0 = time.monotonic()
        with ThreadResult(lambda: c.model.Fit(pb.FitRequest(pair=spec("stuck")), timeout=60)) as hung:
            assert c.model.Fit(pb.FitRequest(pair=spec("free")), timeout=10).fits
            c.model.Load(pb.LoadRequest(pair=spec("free")), timeout=30)
            assert time.monotonic() - t0 < LOAD_TIMEOUT
        assert hung.code == grpc.StatusCode.DEADLINE_EXCEEDED and "load timeout" in hung.details
    finally:
        release.set()


class ThreadResult:
    """Runs a call in a thread for the `with` block; its status code and details once the block ends."""

    def __init__(self, call):
        self.code, self.details = None, ""
        self._t = threading.Thread(target=self._run, args=(call,))

    def _run(self, call):
        try:
            call()
            self.code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            self.code, self.details = e.code(), e.details()

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._t.join(60)


HANGING_SERVE = """
import sys, threading
sys.path.insert(0, {root!r})
from service import cli
from service.fit import factory
factory.PairFactory.load = lambda self, req: threading.Event().wait()  # every Load hangs, as on a dead disk
sys.exit(cli.main(sys.argv[1:]))
"""


def test_sigterm_ends_serve_within_the_drain_timeout_while_loads_hang(tmp_path, tiny_models_dir):
    """Exit status 0: the operator asked for the stop and the drain ran; the hung loads are abandoned
    (their clients get UNAVAILABLE), which is not a failure of the server."""
    drain = 2.0
    script = tmp_path / "hanging_serve.py"
    script.write_text(HANGING_SERVE.format(root=str(ROOT)))
    port_file = tmp_path / "port"
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, str(script), "serve", "--port", "0", "--port-file", str(port_file),
                             "--threads", "1", "-m", str(tiny_models_dir / TINY), "-c", "256", "-np", "1",
                             "--drain-timeout", str(drain), "--load-timeout", "600"],
                            stdout=log, stderr=subprocess.STDOUT, env=ENV, cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists():
            assert proc.poll() is None and time.monotonic() < deadline, log.read()
            time.sleep(0.05)
        with grpc.insecure_channel(f"127.0.0.1:{port_file.read_text().strip()}") as ch:
            model = pb_grpc.ModelServiceStub(ch)
            with ThreadResult(lambda: model.Load(pb.LoadRequest(pair=spec("second")), timeout=60)) as hung:
                while len(model.ListPairs(pb.ListPairsRequest(), timeout=5).pairs) < 2:  # startup + "second"
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
                t0 = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                rc = proc.wait(drain + 5 + 5)  # generous wait; the bound is asserted below
                elapsed = time.monotonic() - t0
        print(f"exited {elapsed:.2f} s after SIGTERM (drain timeout {drain} s), status {rc}")
        assert elapsed < drain + 5, elapsed
        assert rc == 0
        assert hung.code == grpc.StatusCode.UNAVAILABLE and "shutting down" in hung.details
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.seek(0)
        print(log.read())
        log.close()


def test_loads_at_the_same_time_never_spend_the_same_memory(tiny_models_dir):
    """Load "a" stalls before its first allocation (its plan reserved, the ledger still empty): Load "b",
    which would fit in the budget alone, is RESOURCE_EXHAUSTED; once "a" holds its memory, the same."""
    probe = start_server(tiny_config(tiny_models_dir, startup=False))
    try:
        one = probe.model.Fit(pb.FitRequest(pair=spec("a")), timeout=30).plan.total_bytes
    finally:
        stop_server(probe)
    c = start_server(replace(tiny_config(tiny_models_dir, startup=False), device_memory_bytes=int(one * 1.5)))
    backend, release, stalled = c.server.backend, threading.Event(), threading.Event()

    def stall_once(spec_):
        if not stalled.is_set():
            stalled.set()
            release.wait(30)

    backend.fault_hook = stall_once
    try:
        with ThreadResult(lambda: c.model.Load(pb.LoadRequest(pair=spec("a")), timeout=60)) as first:
            assert stalled.wait(10) and backend.ledger.total_bytes() == 0
            assert code_of(c.model.Load, pb.LoadRequest(pair=spec("b")), timeout=30) == \
                grpc.StatusCode.RESOURCE_EXHAUSTED
            release.set()
        assert first.code == grpc.StatusCode.OK
        assert code_of(c.model.Load, pb.LoadRequest(pair=spec("b")), timeout=30) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert backend.ledger.total_bytes() == one
    finally:
        release.set()
        stop_server(c)
