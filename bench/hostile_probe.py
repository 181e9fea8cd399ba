"""A hostile client's probe of a `specserve serve` this script starts (--max-workers 8, tokens, both doors):

    .venv/bin/python bench/hostile_probe.py MODEL.gguf      (a tiny model is enough: tests/tiny_gguf.py)

Groups: slow HTTP bodies as many as --max-workers while normal requests go on over both doors;
disconnect storms (mid-body, mid-generation, cancelled streams); hostile fields over both doors;
auth and roles; concurrent Load/Unload; grammars that fail mid-generation beside a victim stream.
Prints each group's answers, the INTERNAL lines of specserve_requests_total, the server's RSS
growth and the tracebacks and error lines of its log. Exit status 1 on any INTERNAL or traceback.
"""

# ruff: noqa: E402
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import grpc
import httpx

from service.pb.specserve.v1 import specserve_pb2 as pb
from service.pb.specserve.v1 import specserve_pb2_grpc as pb_grpc

MODEL = os.path.abspath(sys.argv[1])
W = tempfile.mkdtemp(prefix="hostile_probe_")
open(f"{W}/tokens", "w").write("generate:gen-token\nadmin:admin-token\n")


def free():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


hp, mp = free(), free()
log = open(f"{W}/serve.log", "w")
proc = subprocess.Popen(
    [
        sys.executable,
        "-m",
        "service.cli",
        "serve",
        "-m",
        MODEL,
        "--models-dir",
        os.path.dirname(MODEL),
        "--backend",
        "numpy",
        "--threads",
        "1",
        "-np",
        "4",
        "-c",
        "1024",
        "-cram",
        "16",
        "--port",
        "0",
        "--port-file",
        f"{W}/port",
        "--http-port",
        str(hp),
        "--metrics-port",
        str(mp),
        "--max-workers",
        "8",
        "--auth-token-file",
        f"{W}/tokens",
    ],
    stdout=log,
    stderr=subprocess.STDOUT,
    cwd=REPO,
)
while not os.path.exists(f"{W}/port") or not open(f"{W}/port").read().strip():
    time.sleep(0.1)
addr = f"127.0.0.1:{open(f'{W}/port').read().strip()}"


def rss():
    return int(open(f"/proc/{proc.pid}/statm").read().split()[1]) * 4096 >> 20


ch = grpc.insecure_channel(addr)
gen = pb_grpc.GenerationServiceStub(ch)
model = pb_grpc.ModelServiceStub(ch)
G, A = [("authorization", "Bearer gen-token")], [("authorization", "Bearer admin-token")]
for _ in range(300):
    try:
        gen.Generate(pb.GenerateRequest(prompt="hi", max_tokens=2), metadata=G, timeout=5)
        break
    except grpc.RpcError:
        time.sleep(0.2)
rss0 = rss()
print("RSS start", rss0)
H = {"Authorization": "Bearer gen-token", "Content-Type": "application/json"}
chat = {"model": "default", "messages": [{"role": "user", "content": "the cat"}], "max_tokens": 8}
url = f"http://127.0.0.1:{hp}/v1/chat/completions"
HEAD = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer gen-token\r\n"
    b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
)
res = {}


def note(k, v):
    res.setdefault(k, {})
    res[k][v] = res[k].get(v, 0) + 1


# 1. slow bodies at --max-workers 8
slow = []
for _ in range(8):
    s = socket.create_connection(("127.0.0.1", hp))
    body = json.dumps(chat).encode()
    s.sendall(HEAD % len(body) + body[:10])
    slow.append(s)
time.sleep(0.5)
for _ in range(5):
    note("normal_while_8_slow_http", httpx.post(url, json=chat, headers=H, timeout=30).status_code)
for _ in range(3):
    try:
        gen.Generate(pb.GenerateRequest(prompt="hi", max_tokens=4), metadata=G, timeout=30)
        note("normal_while_8_slow_grpc", "OK")
    except grpc.RpcError as e:
        note("normal_while_8_slow_grpc", e.code().name)
for s in slow:
    s.close()


# 2. disconnect storms: mid-body, mid-generation (unary and stream)
def mid_body():
    s = socket.create_connection(("127.0.0.1", hp))
    s.sendall(HEAD % 500 + b'{"mod')
    s.close()


def mid_gen(stream):
    s = socket.create_connection(("127.0.0.1", hp))
    body = json.dumps(dict(chat, max_tokens=200, stream=stream)).encode()
    s.sendall(HEAD % len(body) + body)
    time.sleep(0.05)
    s.close()


ts = [threading.Thread(target=f, args=a) for i in range(40) for f, a in ((mid_body, ()), (mid_gen, (i % 2 == 0,)))]
[t.start() for t in ts]
[t.join() for t in ts]
for i in range(20):
    st = gen.GenerateStream(pb.GenerateStreamRequest(prompt="count", max_tokens=100), metadata=G, timeout=30)
    next(st, None)
    st.cancel()
# 3. hostile fields over both doors
for k, v in [
    ("top_k", -1),
    ("repeat_last_n", -2),
    ("max_tokens", 10**30),
    ("n", 0),
    ("n", 10**9),
    ("temperature", -1),
    ("top_p", 0),
    ("seed", -1),
    ("logprobs", 99),
    ("stop", [""]),
    ("messages", []),
    ("model", "../x"),
    ("speculative", {"n_max": 10**9}),
]:
    note(f"http_{k}", httpx.post(url, json=dict(chat, **{k: v}), headers=H, timeout=30).status_code)
for fields in [
    dict(max_tokens=0),
    dict(n=99),
    dict(top_logprobs=99, logprobs=True),
    dict(tokens=pb.TokenIds(ids=[10**9])),
    dict(),
]:
    try:
        gen.Generate(
            pb.GenerateRequest(prompt="hi" if "tokens" not in fields else None, **fields), metadata=G, timeout=30
        )
        note("grpc_fields", "OK")
    except grpc.RpcError as e:
        note("grpc_fields", e.code().name)
# 4. auth and roles
for md in ([], [("authorization", "Bearer nope")], G):
    try:
        model.Unload(pb.UnloadRequest(name="zzz"), metadata=md, timeout=10)
        note("grpc_unload_auth", "OK")
    except grpc.RpcError as e:
        note("grpc_unload_auth", e.code().name)
note("http_noauth", httpx.post(url, json=chat, timeout=30).status_code)


# 5. concurrent Load/Unload
def lu(i):
    try:
        model.Load(
            pb.LoadRequest(
                pair=pb.PairSpec(name=f"p{i % 3}", target_path=MODEL, params=pb.ContextParams(n_ctx=256, n_parallel=1))
            ),
            metadata=A,
            timeout=60,
        )
        note("load", "OK")
    except grpc.RpcError as e:
        note("load", e.code().name)
    try:
        model.Unload(pb.UnloadRequest(name=f"p{i % 3}"), metadata=A, timeout=60)
        note("unload", "OK")
    except grpc.RpcError as e:
        note("unload", e.code().name)


ts = [threading.Thread(target=lu, args=(i,)) for i in range(12)]
[t.start() for t in ts]
[t.join() for t in ts]
# 6. grammars beside a victim stream
for fmt in [
    dict(regex="^(z{1000}){1000}$"),
    dict(lark='start: a\na: "x" a | a "y" | a a'),
    dict(json_schema=json.dumps({"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]})),
    dict(gbnf="root ::= " + " | ".join(f'"w{i}"' for i in range(100000))),
    dict(json_schema=json.dumps({"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(40000)}})),
]:
    victim = gen.GenerateStream(
        pb.GenerateStreamRequest(prompt="the theme", max_tokens=100, sampling=pb.SamplingParams(temperature=0)),
        metadata=G,
        timeout=60,
    )
    t0 = time.time()
    try:
        gen.Generate(
            pb.GenerateRequest(prompt="the", max_tokens=16, response_format=pb.ResponseFormat(**fmt)),
            metadata=G,
            timeout=60,
        )
        note("grammar", "OK")
    except grpc.RpcError as e:
        note(
            "grammar",
            e.code().name + (" backtrace!" if "backtrace" in e.details() else "") + f" {time.time() - t0:.2f}s",
        )
    note("victim", "ok" if list(victim)[-1].finish_reason else "bad")
time.sleep(6)
print(json.dumps(res, indent=0))
m = urllib.request.urlopen(f"http://127.0.0.1:{mp}/metrics").read().decode()
print("INTERNAL in metrics:", [ln for ln in m.splitlines() if 'code="INTERNAL"' in ln and not ln.startswith("#")])
print("RSS end", rss(), "growth", rss() - rss0)
proc.terminate()
proc.wait(30)
log.close()
t = open(f"{W}/serve.log").read()
print(
    "tracebacks:",
    t.count("Traceback"),
    "ERROR lines:",
    sum(1 for ln in t.splitlines() if "level=error" in ln or '"ERROR"' in ln),
)
internal = [ln for ln in m.splitlines() if 'code="INTERNAL"' in ln and not ln.startswith("#")]
sys.exit(1 if internal or "Traceback" in t else 0)
