"""`specserve serve` as a process (flags, port file, SIGTERM drain, startup failures) and the client
commands against it; the flag parser (llama-server spellings, the no-flag default)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import pytest

from service import cli
from service.cli import flags, serve
from service.pb.specserve.v1 import specserve_pb2 as pb
from service.pb.specserve.v1 import specserve_pb2_grpc as pb_grpc
from tests.conftest import ROOT, TINY, TINY_DRAFT

ENV = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")


def specserve(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV, cwd=ROOT)


class Served:
    """A `specserve serve` process on a free port."""

    def __init__(self, tmp_path, *flags: str):
        port_file = tmp_path / "port"
        self.log = open(tmp_path / "serve.log", "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", "0",
                                      "--port-file", str(port_file), "--threads", "1", *flags],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=ENV, cwd=ROOT)
        deadline = time.monotonic() + 60
        while not port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"serve did not start:\n{self.output()}")
            time.sleep(0.05)
        self.address = f"127.0.0.1:{port_file.read_text().strip()}"
        while specserve("health", "--address", self.address, timeout=30).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"serve never became SERVING:\n{self.output()}")
            time.sleep(0.1)

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture
def served(tmp_path, tiny_models_dir):
    s = Served(tmp_path, "-m", str(tiny_models_dir / TINY), "-md", str(tiny_models_dir / TINY_DRAFT),
               "-c", "512", "-np", "2", "--spec-draft-n-max", "3")
    yield s
    s.stop()


def test_client_commands(served, outside_model):
    a = ("--address", served.address)
    r = specserve("generate", "the cat", "-n", "8", "--temp", "0", "--stats", *a)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and "completion" in r.stderr and "prompt" in r.stderr
    r = specserve("generate", "the cat", "-n", "8", "--temp", "0", "--no-stream", "--json", *a)
    assert r.returncode == 0 and json.loads(r.stdout)["usage"]["completion_tokens"] > 0
    r = specserve("generate", "hi", "--chat", "--system", "be brief", "-n", "4", *a)
    assert r.returncode == 0, r.stderr
    # generation controls: logprobs with 3 alternatives, 2 samples (-n stays --max-tokens), prompt scoring
    r = specserve("generate", "the cat", "-n", "5", "--logprobs", "3", "--n-samples", "2", "--seed", "3",
                  "--prompt-logprobs", "1", "--no-stream", "--json", *a)
    resp = json.loads(r.stdout)
    assert r.returncode == 0 and [c.get("index", 0) for c in resp["choices"]] == [0, 1], r.stderr
    assert all(len(c["logprobs"]) == len(c["tokens"]) and len(c["logprobs"][0]["top"]) == 3 for c in resp["choices"])
    assert len(resp["prompt_logprobs"]) == resp["usage"]["prompt_tokens"]
    r = specserve("generate", "the cat", "-n", "5", "--logprobs", "2", "--n-samples", "2", *a)
    assert r.returncode == 0 and "[0] " in r.stdout and "[1] " in r.stdout and "logprobs of completion 1" in r.stderr
    r = specserve("generate", "the cat sat", "-n", "0", "--prompt-logprobs", "0", *a)
    assert r.returncode == 0 and "perplexity" in r.stderr, r.stderr

    r = specserve("fit", "-m", TINY, "-c", "256", "-np", "2", *a)
    assert r.returncode == 0 and "fits: yes" in r.stdout and "kv_cache" in r.stdout, r.stdout + r.stderr
    r = specserve("fit", "-m", TINY, "--memory-budget", "10K", *a)
    assert r.returncode == 3 and "deficit" in r.stdout
    r = specserve("fit", "-m", TINY, "--json", *a)
    assert json.loads(r.stdout)["fits"] is True

    r = specserve("load", "--name", "b", "-m", TINY, "-c", "256", "-np", "1", "--draft-max", "2", *a)
    assert r.returncode == 0 and "loaded pair 'b'" in r.stdout, r.stdout + r.stderr
    r = specserve("list", *a)
    assert r.returncode == 0 and "b: ready" in r.stdout and "default: ready" in r.stdout, r.stdout
    r = specserve("spec", "get", "--pair", "b", *a)
    assert json.loads(r.stdout)["config"]["n_max"] == 2
    r = specserve("spec", "set", "--pair", "b", "--draft-max", "1", "--spec-type", "none", *a)
    cfg = json.loads(r.stdout)["config"]
    assert cfg["n_max"] == 1 and cfg["type"] == "DRAFTER_TYPE_NONE"
    r = specserve("generate", "the", "--pair", "b", "-n", "4", *a)
    assert r.returncode == 0
    r = specserve("unload", "b", *a)
    assert r.returncode == 0 and "unloaded pair 'b'" in r.stdout

    r = specserve("tokenize", "the cat", *a)
    ids = json.loads(r.stdout)
    assert ids and specserve("detokenize", *map(str, ids), *a).stdout == "the cat\n"

    r = specserve("generate", "x", "--pair", "nope", *a)
    assert r.returncode == 2 and "NOT_FOUND" in r.stderr and "Traceback" not in r.stderr
    r = specserve("load", "--name", "c", "-m", str(outside_model), *a)
    assert r.returncode == 2 and "PERMISSION_DENIED" in r.stderr
    logs = served.output()
    assert "request_id=" in logs and "method=/specserve.v1.GenerationService/GenerateStream" in logs


def test_sigterm_drains_in_flight_requests_then_exits(tmp_path, tiny_models_dir):
    s = Served(tmp_path, "-m", str(tiny_models_dir / TINY), "-c", "1024", "-np", "1")
    try:
        channel = grpc.insecure_channel(s.address)
        gen = pb_grpc.GenerationServiceStub(channel)
        started = threading.Barrier(2)
        finals: list = []
        errors: list = []

        def client(i: int) -> None:
            try:
                msgs = []
                for m in gen.GenerateStream(pb.GenerateStreamRequest(prompt="a", max_tokens=600), timeout=120):
                    msgs.append(m)
                    if i == 0 and len(msgs) == 1:
                        started.wait(30)
                finals.append(msgs[-1])
            except grpc.RpcError as e:
                errors.append(e)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
        threads[0].start()
        started.wait(30)  # one request is generating, then two more queue behind it
        for t in threads[1:]:
            t.start()
        time.sleep(0.3)
        s.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(120)
        assert not errors, [(e.code(), e.details()) for e in errors]
        assert len(finals) == 3 and all(f.finish_reason != pb.FINISH_REASON_UNSPECIFIED for f in finals)
        assert all(f.finish_reason != pb.FINISH_REASON_CANCELLED for f in finals)
        assert s.proc.wait(60) == 0
        out = s.output()
        assert "msg=draining" in out and "msg=stopped" in out, out
        with pytest.raises(grpc.RpcError) as e:
            gen.Generate(pb.GenerateRequest(prompt="a"), timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        channel.close()
    finally:
        s.stop()


def test_serve_exits_when_the_startup_pair_cannot_load(tmp_path, tiny_models_dir, outside_model):
    r = specserve("serve", "--port", "0", "-m", str(tiny_models_dir / "missing.gguf"), timeout=60)
    assert r.returncode == 1 and "does not exist" in r.stderr
    r = specserve("serve", "--port", "0", "--models-dir", str(tiny_models_dir), "-m", str(outside_model), timeout=60)
    assert r.returncode == 1 and "outside the models directory" in r.stderr


def test_health_of_nothing_listening_is_unhealthy():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    r = specserve("health", "--address", f"127.0.0.1:{port}", "--timeout", "2", timeout=30)
    assert r.returncode == 1


def test_llama_server_flag_spellings():
    new = cli.build_parser().parse_args(["serve", "-m", "t.gguf", "-md", "d.gguf", "-c", "8192", "-np", "3",
                                         "-b", "128", "--spec-draft-n-max", "6", "--spec-draft-n-min", "2",
                                         "--spec-draft-p-min", "0.7", "--device-memory", "2G"])
    old = cli.build_parser().parse_args(["serve", "--model", "t.gguf", "--model-draft", "d.gguf", "--ctx-size", "8192",
                                         "--parallel", "3", "--batch-size", "128", "--draft-max", "6",
                                         "--draft-min", "2", "--draft-p-min", "0.7", "--device-memory", "2048M"])
    assert vars(new) == vars(old)
    cfg = serve.serve_config(new)
    assert cfg.speculative.type == "draft" and (cfg.speculative.n_max, cfg.speculative.n_min) == (6, 2)
    assert cfg.speculative.p_min == 0.7 and cfg.device_memory_bytes == 2 << 30
    assert (cfg.params.n_ctx, cfg.params.n_parallel, cfg.params.n_batch) == (8192, 3, 128)
    assert cfg.startup.draft_path.endswith("d.gguf") and cfg.models_dir == os.path.abspath(".")
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", "--spec-type", "medusa"])


def test_serve_with_no_flags_serves_the_packaged_model_with_the_ngram_drafter(real_model):
    cfg = serve.serve_config(cli.build_parser().parse_args(["serve"]))
    assert cfg.host == "127.0.0.1" and cfg.port == 50051 and cfg.backend == "auto"
    assert cfg.startup.name == "default" and cfg.startup.target_path == os.path.abspath(real_model)
    assert cfg.startup.draft_path == "" and cfg.startup.speculative.type == "ngram"
    assert cfg.models_dir == os.path.dirname(os.path.abspath(real_model))


@pytest.mark.parametrize("text, n", [("1000", 1000), ("4G", 4 << 30), ("512MiB", 512 << 20), ("1.5k", 1536),
                                     ("2GB", 2 << 30)])
def test_parse_bytes(text, n):
    assert flags.parse_bytes(text) == n
