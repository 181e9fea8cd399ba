"""Cross-language clients against a real server: Node.js (@grpc/grpc-js + @grpc/proto-loader) calls Fit and
Generate; ghz load-tests Generate and GenerateStream through reflection with zero errors (bench/ghz.sh).

The server requires a bearer token (--auth-token-file); both clients send it from $SPECSERVE_TOKEN.
`make setup` installs both (npm deps into tests/node/node_modules, ghz into .tools/)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from service.pb.specserve.v1 import specserve_pb2_grpc as pb_grpc
from service.rpc.auth import BearerToken
from tests.conftest import ROOT, start_server, stop_server, tiny_config

NODE_DIR = ROOT / "tests" / "node"
TOKEN = "xlang-admin-7d1e4b"  # admin: the Node client calls Fit


def _require(ok: bool, what: str) -> None:
    if not ok:
        pytest.fail(f"{what} is missing: run `make setup`")


@pytest.fixture(scope="module")
def server(tiny_models_dir, tmp_path_factory):
    tokens = tmp_path_factory.mktemp("xlang") / "tokens"
    tokens.write_text(f"admin:{TOKEN}\n")
    c = start_server(replace(tiny_config(tiny_models_dir, n_parallel=4), auth_token_file=str(tokens)))
    c.model = pb_grpc.ModelServiceStub(grpc.intercept_channel(c.channel, BearerToken(TOKEN)))  # for wait_idle
    yield c
    stop_server(c)


def test_node_client_calls_fit_and_generate(server):
    node = shutil.which("node")
    _require(node is not None, "node")
    _require((NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir(), "tests/node/node_modules")
    proc = subprocess.run([node, str(NODE_DIR / "client.js"), server.address], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, SPECSERVE_TOKEN=TOKEN))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["ok"] and seen["authenticated"] and seen["fit_buffers"] > 0 and seen["completion_tokens"] > 0
    assert seen["choices"] == 2
    assert re.fullmatch(r"(yes|no)![0-9]{2}", seen["regex_text"])  # response_format from Node.js
    assert set(json.loads(seen["json_schema_text"])) == {"ok", "kind"}
    server.wait_idle()


def test_ghz_through_reflection_has_zero_errors(server, tmp_path):
    ghz = ROOT / ".tools" / "ghz"
    _require(ghz.exists() or shutil.which("ghz") is not None, "ghz (.tools/ghz)")
    env = dict(os.environ, SPECSERVE_TOKEN=TOKEN, GHZ_N="40", GHZ_C="8", GHZ_MAX_TOKENS="8",
               GHZ_OUT_DIR=str(tmp_path))
    proc = subprocess.run(["bash", str(ROOT / "bench" / "ghz.sh"), server.address], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for rpc in ("Generate", "GenerateStream"):
        report = json.loads(Path(tmp_path, f"ghz-{rpc}.json").read_text())
        assert report["count"] == 40
        assert report.get("statusCodeDistribution") == {"OK": 40}, report.get("errorDistribution")
    server.wait_idle()
