"""The compute runtime: every OpenCL device is probed before use, `--backend auto` takes a working
OpenCL GPU, else ggml's CPU backend, else the best OpenCL CPU runtime, and NumPy (with a warning)
when none works; a pair is SERVING only after its warm-up ran the path requests take, and
`specserve serve` with no flags generates.

A runtime is made to fail the way real ones do on CPUs their compiler does not know, through
settings the runtimes themselves read (the probes run in child processes, which inherit them):
`POCL_EXTRA_BUILD_FLAGS=-mcpu=bogus` (PoCL cannot build) and `CL_CONFIG_CPU_TARGET_ARCH=bogus`
(Intel's CPU runtime offers no device). ggml is made unloadable with a module named `ggml` that
raises on import, first on the path (`no_ggml`), as a missing or broken build would.
"""

from __future__ import annotations

import logging
import platform
import signal
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from compute.numpy_backend import NumpyBackend
from compute.select import BackendUnavailable, device_report, make_backend
from service.common.errors import FailedPrecondition
from service.pb.specserve.v1 import specserve_pb2 as pb
from service.server import SpecServer
from tests.conftest import ROOT, TINY, start_server, stop_server, tiny_config

pyopencl = pytest.importorskip("pyopencl")

from compute.opencl.probe import first_error_line, probe_devices  # noqa: E402

BROKEN = {"POCL_EXTRA_BUILD_FLAGS": "-mcpu=bogus", "CL_CONFIG_CPU_TARGET_ARCH": "bogus"}


@pytest.fixture
def broken_cpu_runtimes(monkeypatch):
    for k, v in BROKEN.items():
        monkeypatch.setenv(k, v)


@pytest.fixture
def no_ggml(tmp_path, monkeypatch):
    """ggml cannot be loaded (in this process and in the servers it starts): PYTHONPATH's first entry."""
    fake = tmp_path / "no-ggml"
    (fake / "ggml").mkdir(parents=True)
    (fake / "ggml" / "__init__.py").write_text('raise ImportError("libggml.so: cannot open shared object file")\n')
    monkeypatch.setattr("compute.select.ggml_backend", _ggml_unavailable)
    return str(fake)


def _ggml_unavailable(threads: int = 0):
    raise BackendUnavailable("ggml cannot be loaded (libggml.so: cannot open shared object file)")


def _gpu_ok() -> bool:
    return any(s.ok and s.runtime == "gpu" for s in probe_devices())


def test_a_cpu_opencl_runtime_works_on_this_machine():
    """The setup installs two CPU runtimes; on an x86-64 CPU at least one must pass its probe
    (each one's result is printed by name: `pytest -s`)."""
    statuses = probe_devices()
    for s in statuses:
        print(s.line())
    assert {s.runtime for s in statuses} >= {"intel-cpu", "pocl"}, "scripts/setup.sh installs both"
    if platform.machine() in ("x86_64", "AMD64"):
        working = [s for s in statuses if s.ok and s.runtime in ("intel-cpu", "pocl")]
        assert working, "no CPU OpenCL runtime works here: " + "; ".join(s.line() for s in statuses)


def test_auto_takes_a_gpu_then_ggml():
    gpu = next((s for s in probe_devices() if s.ok and s.runtime == "gpu"), None)
    be = make_backend("auto")
    if gpu is not None:
        assert be.name == "opencl" and be.device.name.strip() == gpu.device
    else:
        assert be.name == "ggml"


def test_without_ggml_auto_takes_the_first_working_opencl_device_in_preference_order(no_ggml, caplog):
    best = next((s for s in probe_devices() if s.ok), None)
    with caplog.at_level(logging.WARNING, logger="specserve.backend"):
        be = make_backend("auto")
    if best is None:
        assert be.name == "numpy"
    else:
        assert be.name == "opencl" and be.device.name.strip() == best.device
        assert be.platform.name.strip() == best.platform
    if best is None or best.runtime != "gpu":
        assert "ggml backend skipped: ggml cannot be loaded" in caplog.text


def test_a_failing_platform_is_skipped_with_its_first_error(broken_cpu_runtimes):
    by_runtime = {s.runtime: s for s in probe_devices()}
    pocl, intel = by_runtime["pocl"], by_runtime["intel-cpu"]
    assert not pocl.ok and "Invalid build option: -mcpu=bogus" in pocl.reason
    assert not intel.ok and "DEVICE_NOT_AVAILABLE" in intel.reason
    assert all("\n" not in s.reason for s in (pocl, intel))


def test_no_working_device_means_numpy_with_a_warning_that_says_why(broken_cpu_runtimes, no_ggml, caplog):
    if any(s.ok for s in probe_devices()):
        pytest.skip("a GPU runtime still works here")
    with caplog.at_level(logging.WARNING, logger="specserve.backend"):
        be = make_backend("auto", threads=1)
    assert be.name == "numpy"
    text = caplog.text
    assert "no working OpenCL device" in text and "using the NumPy backend" in text
    assert "ggml backend skipped" in text
    assert "Portable Computing Language" in text and "Intel(R) OpenCL" in text
    with pytest.raises(BackendUnavailable, match="no working OpenCL device"):
        make_backend("opencl")
    with pytest.raises(BackendUnavailable, match="needs the OpenCL backend"):
        make_backend("numpy", device="pocl")


def test_device_flag_names_an_unusable_device_then_start_fails_with_the_reason(broken_cpu_runtimes):
    with pytest.raises(BackendUnavailable, match="Invalid build option"):
        make_backend("auto", device="pocl")
    with pytest.raises(BackendUnavailable, match="no OpenCL device matches"):
        make_backend("auto", device="no-such-device")


def test_list_devices_shows_each_device_with_ok_or_the_reason():
    lines = device_report()
    statuses = {s.index: s for s in probe_devices()}
    assert lines[-1].startswith("ggml: ") and lines[-1].endswith(" ok")  # ggml's CPU backend, after its probe
    lines = lines[:-1]
    assert len(lines) == len(statuses)
    for line in lines:
        s = statuses[int(line.split(":")[0])]
        assert s.platform in line and (" ok (" in line if s.ok else f"unusable: {s.reason}" in line)
    out = subprocess.run([sys.executable, "-m", "service.cli", "serve", "--list-devices"], capture_output=True,
                         text=True, timeout=300, cwd=ROOT, env=_env(BROKEN))
    assert out.returncode == 0
    assert "unusable: KernelBuildError" in out.stdout and "Invalid build option: -mcpu=bogus" in out.stdout


def test_first_error_line_picks_the_compiler_error():
    log = ("clBuildProgram failed: BUILD_PROGRAM_FAILURE - clBuildProgram failed\n\nBuild on <dev>:\n\n"
           "warning: unused\n/tmp/x.cl:3:5: error: use of undeclared identifier 'y'\n  y = 1;\n")
    assert first_error_line(log) == "/tmp/x.cl:3:5: error: use of undeclared identifier 'y'"


# ---- readiness: warm-up ----
class FailsOnVerifyBatches(NumpyBackend):
    """A backend whose matrix op fails for batches of more than 4 rows, as a runtime that cannot
    build one tile size of the matrix kernel would: one-token decodes alone would not find it."""

    def matmul(self, x, w, out, bias=None, pad=None):
        if x.shape[0] > 4:
            raise RuntimeError("clBuildProgram failed: mul_mv_q8_0_f32.cl -DNR=8\nsecond line")
        return super().matmul(x, w, out, bias, pad)


def test_a_pair_whose_warm_up_fails_is_not_served(tiny_models_dir):
    cfg = tiny_config(tiny_models_dir, startup=True, spec_type="ngram", n_max=4)
    server = SpecServer(cfg, backend=FailsOnVerifyBatches(n_threads=1, row_tile=8))
    port = server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        with pytest.raises(FailedPrecondition) as e:
            server.wait_ready(120)
        msg = str(e.value)
        assert "warm-up failed" in msg and "mul_mv_q8_0_f32.cl -DNR=8" in msg and "\n" not in msg
        assert not server.registry.any_ready() and server.registry.list() == []
        assert server.backend.ledger.entries() == []  # everything the Load took is back
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        channel.close()
        server.stop()


def test_load_of_a_pair_that_cannot_warm_up_is_failed_precondition(tiny_models_dir):
    c = start_server(tiny_config(tiny_models_dir, startup=False))
    try:
        good = c.model.Load(pb.LoadRequest(pair=pb.PairSpec(name="good", target_path=TINY)), timeout=60)
        assert good.name == "good"
        before = c.server.backend.ledger.snapshot()
        c.server.registry.factory.backend.matmul = FailsOnVerifyBatches.matmul.__get__(c.server.backend)
        with pytest.raises(grpc.RpcError) as e:
            c.model.Load(pb.LoadRequest(pair=pb.PairSpec(name="bad", target_path=TINY)), timeout=60)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "warm-up failed" in e.value.details() and "Traceback" not in e.value.details()
        assert c.server.backend.ledger.snapshot() == before
        assert [p.name for p in c.model.ListPairs(pb.ListPairsRequest(), timeout=10).pairs] == ["good"]
    finally:
        stop_server(c)


def test_warm_up_runs_before_serving_and_leaves_outputs_unchanged(tiny_models_dir):
    """The warm-up request is not counted as traffic, and a request after it generates what a
    pair that never warmed up generates (the warm-up's cells do not leak into a slot)."""
    from service.common.tokenizer import Tokenizer
    from service.engine.engine import Engine
    from service.engine.request import GenRequest, SamplingParams
    from service.fit.factory import PairFactory, PairRequest
    from service.fit.params import ContextParams, SpeculativeConfig

    c = start_server(tiny_config(tiny_models_dir, metrics_port=0))
    try:
        req = pb.GenerateRequest(pair="default", prompt="the theme of", max_tokens=12,
                                 sampling=pb.SamplingParams(temperature=0.0))
        served = c.gen.Generate(req, timeout=60)
        served_text, n_tokens = served.text, len(served.tokens)
        assert n_tokens > 0
        assert c.server.metrics.value("specserve_completion_tokens_total", pair="default") == n_tokens
    finally:
        stop_server(c)
    pair = PairFactory(NumpyBackend(n_threads=1, row_tile=8), device_memory_bytes=1 << 32).load(
        PairRequest(target_path=str(tiny_models_dir / TINY), params=ContextParams(n_ctx=1024, n_parallel=4, n_batch=64),
                    speculative=SpeculativeConfig("ngram", n_max=4)))
    tok = Tokenizer.from_gguf(pair.target.file.reader)
    eng = Engine(pair, tok, SpeculativeConfig("ngram", n_max=4)).start()
    try:
        prompt = tuple(tok.encode("the theme of", add_special=True, parse_special=True))
        cold = eng.submit(GenRequest(prompt, max_tokens=12,
                                     sampling=SamplingParams(temperature=0.0))).result(timeout=60)
    finally:
        eng.stop()
        pair.release()
    assert served_text == cold.text


# ---- the README's main job ----
def _env(extra: dict | None = None) -> dict:
    import os

    return dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", **(extra or {}))


def _serve(tmp_path, env: dict, *flags: str):
    port_file = tmp_path / "port"
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", "0", "--port-file",
                             str(port_file), *flags], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    return proc, port_file, log


def _client(*args: str, env=None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env or _env(), cwd=ROOT)


def _wait_serving_or_exit(proc, port_file, log, timeout: float = 300) -> str:
    """The address once health says SERVING; fails if the process exits first."""
    deadline = time.monotonic() + timeout
    while not port_file.exists():
        assert proc.poll() is None, f"serve exited {proc.returncode}:\n{_read(log)}"
        assert time.monotonic() < deadline, _read(log)
        time.sleep(0.1)
    address = f"127.0.0.1:{port_file.read_text().strip()}"
    while _client("health", "--address", address, timeout=30).returncode != 0:
        assert proc.poll() is None, f"serve exited {proc.returncode}:\n{_read(log)}"
        assert time.monotonic() < deadline, f"never SERVING:\n{_read(log)}"
        time.sleep(0.2)
    return address


def _read(log) -> str:
    log.flush()
    log.seek(0)
    return log.read()


def _stop(proc, log) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()


@pytest.mark.slow
def test_serve_with_no_flags_generates(tmp_path):
    """`make serve` then `specserve generate "Hello" -n 16`: the packaged model on the default backend."""
    proc, port_file, log = _serve(tmp_path, _env())
    try:
        address = _wait_serving_or_exit(proc, port_file, log)
        out = _client("generate", "--address", address, "-n", "16", "Hello")
        assert out.returncode == 0, out.stderr
        assert len(out.stdout.strip()) > 0
        gpu = next((s for s in probe_devices() if s.ok and s.runtime == "gpu"), None)
        text = _read(log)
        assert "pair warmed up" in text
        if gpu is not None:
            assert f"OpenCL device chosen: {gpu.index}: {gpu.platform}" in text
        else:
            assert "ggml backend chosen" in text and "backend=ggml" in text
    finally:
        assert _stop(proc, log) == 0


@pytest.mark.slow
def test_serve_with_every_cpu_runtime_broken_serves_on_numpy_with_the_warning(tmp_path, no_ggml):
    if _gpu_ok():
        pytest.skip("a GPU works here")
    env = dict(_env(BROKEN), PYTHONPATH=f"{no_ggml}:{ROOT}")
    proc, port_file, log = _serve(tmp_path, env, "-c", "512", "-np", "1")
    try:
        address = _wait_serving_or_exit(proc, port_file, log)
        out = _client("generate", "--address", address, "-n", "4", "Hello")
        assert out.returncode == 0 and out.stdout.strip(), out.stderr
        text = _read(log)
        assert "no working OpenCL device" in text and "using the NumPy backend" in text
        assert "ggml backend skipped: ggml cannot be loaded" in text
    finally:
        assert _stop(proc, log) == 0


def test_serve_with_an_unusable_device_exits_non_zero_with_one_line(tmp_path):
    out = _client("serve", "--port", "0", "--device", "pocl", env=_env(BROKEN), timeout=300)
    assert out.returncode == 1
    err = [ln for ln in out.stderr.splitlines() if ln.startswith("specserve:")]
    assert len(err) == 1 and "Invalid build option" in err[0] and "Traceback" not in out.stderr


def test_probe_workload_matches_numpy_on_every_working_device():
    """The probe itself is a real check: run it here (in-process) on each working device."""
    from compute.opencl.probe import run_probe

    for s in probe_devices():
        if s.ok and s.runtime != "pocl":  # PoCL's teardown of a program may abort a process
            run_probe(s.index)  # raises on a build failure or a result that differs from NumPy


def test_warm_up_measures_the_row_cost_the_draft_policy_uses(tiny_models_dir, caplog):
    """The cost model is measured on the device at warm-up, not a constant."""
    from service.engine.spec.policy import MeasuredRowCost

    with caplog.at_level(logging.INFO, logger="specserve.registry"):
        c = start_server(tiny_config(tiny_models_dir, spec_type="ngram", n_max=4))
    try:
        engine = c.server.registry.get("default").engine
        assert isinstance(engine.row_cost, MeasuredRowCost)
        table = engine.row_cost.table()
        assert len(table) == 1 + engine.max_n_max and table[0] == 1.0
        assert all(b >= a for a, b in zip(table, table[1:]))
        logged = [r.kv for r in caplog.records if r.getMessage() == "pair warmed up"]
        assert logged and logged[-1]["row_cost"] == engine.row_cost.describe()
    finally:
        stop_server(c)
