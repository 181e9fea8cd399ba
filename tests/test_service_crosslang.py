"""Cross-language clients against a real server: Node.js (@grpc/grpc-js + @grpc/proto-loader) calls Fit and
Generate; ghz load-tests Generate and GenerateStream through reflection with zero errors (bench/ghz.sh).

`make setup` installs both (npm deps into tests/node/node_modules, ghz into .tools/)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT, start_server, stop_server, tiny_config

NODE_DIR = ROOT / "tests" / "node"


def _require(ok: bool, what: str) -> None:
    if not ok:
        pytest.fail(f"{what} is missing: run `make setup`")


@pytest.fixture(scope="module")
def server(tiny_models_dir):
    c = start_server(tiny_config(tiny_models_dir, n_parallel=4))
    yield c
    stop_server(c)


def test_node_client_calls_fit_and_generate(server):
    node = shutil.which("node")
    _require(node is not None, "node")
    _require((NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir(), "tests/node/node_modules")
    proc = subprocess.run([node, str(NODE_DIR / "client.js"), server.address], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["ok"] and seen["fit_buffers"] > 0 and seen["completion_tokens"] > 0
    server.wait_idle()


def test_ghz_through_reflection_has_zero_errors(server, tmp_path):
    ghz = ROOT / ".tools" / "ghz"
    _require(ghz.exists() or shutil.which("ghz") is not None, "ghz (.tools/ghz)")
    env = dict(os.environ, GHZ_N="40", GHZ_C="8", GHZ_MAX_TOKENS="8", GHZ_OUT_DIR=str(tmp_path))
    proc = subprocess.run(["bash", str(ROOT / "bench" / "ghz.sh"), server.address], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for rpc in ("Generate", "GenerateStream"):
        report = json.loads(Path(tmp_path, f"ghz-{rpc}.json").read_text())
        assert report["count"] == 40
        assert report.get("statusCodeDistribution") == {"OK": 40}, report.get("errorDistribution")
    server.wait_idle()
