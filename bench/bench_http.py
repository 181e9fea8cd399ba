"""Load test of the OpenAI HTTP door beside the same load over gRPC with ghz, on one `specserve serve`.

    .venv/bin/python bench/bench_http.py                            200 requests per door at concurrency 8
    .venv/bin/python bench/bench_http.py --n 100 --max-tokens 8 -- --backend numpy -np 4

Starts `specserve serve --http-port` on free ports of 127.0.0.1 (extra serve flags after `--`;
default: the packaged model, 8 slots), waits until /health answers 200, warms every door up,
then runs `--rounds` rounds, each running every door once (interleaved, so a machine shared
with other jobs slows all alike): POST /v1/chat/completions from `--concurrency` httpx clients
(one keep-alive connection each), then GenerationService/Generate with the same messages,
max_tokens and temperature 0 from as many Python grpc.aio clients (the client language of the
HTTP load: the difference from ghz is what the load generator costs) and from ghz (`-c`
workers). Prints, per door: requests, errors, p50/p99 latency, requests/s, completion tokens/s
and the server's CPU time per request over all rounds; then the HTTP/gRPC ratios and the CPU.
Exit status 1 when any request failed (or ghz is missing: `make setup` builds .tools/ghz).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from a clone: the repository root

import httpx  # noqa: E402

from bench.common import machine_line  # noqa: E402

MESSAGES = [{"role": "user", "content": "Write one sentence about the sea."}]  # the chat template on both doors


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(extra: list[str], workdir: str, http_port: int) -> tuple[subprocess.Popen, str]:
    """`specserve serve` with the HTTP door; returns the process and the gRPC address once /health is 200."""
    port_file = os.path.join(workdir, "port")
    log = open(os.path.join(workdir, "serve.log"), "w+")
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", "0",
                             "--port-file", port_file, "--http-port", str(http_port), "--log-level", "warning",
                             *extra], stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            log.seek(0)
            sys.exit(f"serve did not start:\n{log.read()}")
        try:
            if os.path.exists(port_file) and httpx.get(f"http://127.0.0.1:{http_port}/health").status_code == 200:
                return proc, f"127.0.0.1:{open(port_file).read().strip()}"
        except httpx.TransportError:
            pass
        time.sleep(0.2)


async def http_load(url: str, n: int, concurrency: int, max_tokens: int) -> tuple[list[float], int, int, float]:
    """n POSTs of /v1/chat/completions by `concurrency` workers: (latencies s, errors, completion tokens, wall s)."""
    body = {"model": "default", "messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0}
    latencies, errors, tokens, left = [], 0, 0, iter(range(n))

    async def worker(client: httpx.AsyncClient):
        nonlocal errors, tokens
        for _ in left:
            t0 = time.perf_counter()
            try:
                r = await client.post(url, json=body)
                ok = r.status_code == 200
                tokens += r.json()["usage"]["completion_tokens"] if ok else 0
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - t0)
            errors += not ok

    t0 = time.perf_counter()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return latencies, errors, tokens, time.perf_counter() - t0


async def grpc_load(address: str, n: int, concurrency: int, max_tokens: int) -> tuple[list[float], int, int, float]:
    """The same load as http_load, over gRPC from Python (grpc.aio): the HTTP door's control with the same
    client language, so the difference from ghz shows what the load generator costs."""
    import grpc

    from service.pb.specserve.v1 import specserve_pb2 as pb
    from service.pb.specserve.v1 import specserve_pb2_grpc as pb_grpc

    messages = pb.ChatMessages(messages=[pb.ChatMessage(**m) for m in MESSAGES])
    req = pb.GenerateRequest(pair="default", messages=messages, max_tokens=max_tokens,
                             sampling=pb.SamplingParams(temperature=0))
    latencies, errors, tokens, left = [], 0, 0, iter(range(n))

    async def worker(stub):
        nonlocal errors, tokens
        for _ in left:
            t0 = time.perf_counter()
            try:
                n_tokens = (await stub.Generate(req, timeout=300)).usage.completion_tokens
                tokens += n_tokens  # after the await: `tokens += await ...` would read tokens before it
            except grpc.RpcError:
                errors += 1
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.GenerationServiceStub(ch)
        await asyncio.gather(*(worker(stub) for _ in range(concurrency)))
    return latencies, errors, tokens, time.perf_counter() - t0


def ghz_load(ghz: str, address: str, n: int, concurrency: int, max_tokens: int, out: str,
             tokens_each: int) -> tuple[list[float], int, int, float]:
    """n Generate calls with ghz: (latencies s of every call, errors, completion tokens, wall s). ghz does not
    report tokens: the prompt is the same and greedy, so every call generates `tokens_each`."""
    data = {"pair": "default", "messages": {"messages": MESSAGES}, "max_tokens": max_tokens,
            "sampling": {"temperature": 0}}
    subprocess.run([ghz, "--insecure", "--call", "specserve.v1.GenerationService/Generate", "-d", json.dumps(data),
                    "-n", str(n), "-c", str(concurrency), "--connections", "2", "--timeout", "300s",
                    "--format", "json", "--output", out, address], check=True, stdout=subprocess.DEVNULL)
    r = json.load(open(out))
    details = r.get("details") or []
    latencies = [d["latency"] / 1e9 for d in details]  # ghz reports nanoseconds
    errors = r["count"] - (r.get("statusCodeDistribution") or {}).get("OK", 0)
    return latencies, errors, (r["count"] - errors) * tokens_each, r["total"] / 1e9


DOORS = {"http": "http (httpx, Python)", "grpc-py": "grpc (grpc.aio, Python)", "grpc-ghz": "grpc (ghz, Go)"}


class Tally:
    """One door's requests over all rounds."""

    def __init__(self):
        self.latencies: list[float] = []
        self.errors = self.tokens = 0
        self.wall = self.client_cpu = self.server_cpu = 0.0

    def add(self, latencies: list[float], errors: int, tokens: int, wall: float, client_cpu: float,
            server_cpu: float) -> None:
        self.latencies += latencies
        self.errors, self.tokens = self.errors + errors, self.tokens + tokens
        self.wall, self.client_cpu, self.server_cpu = (self.wall + wall, self.client_cpu + client_cpu,
                                                       self.server_cpu + server_cpu)

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.wall


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--n", type=int, default=200, help="requests per door (over all rounds)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2, help="HTTP-then-gRPC rounds, n / rounds requests each")
    ap.add_argument("serve_flags", nargs="*", help="extra `specserve serve` flags (after --)")
    args = ap.parse_args()
    ghz = os.environ.get("GHZ") or (str(REPO / ".tools/ghz") if (REPO / ".tools/ghz").exists() else
                                    shutil.which("ghz"))
    if not ghz:
        sys.exit("ghz not found: run make setup (it builds .tools/ghz)")
    extra = args.serve_flags or ["-np", "8", "-c", "4096"]
    per_round = max(1, args.n // args.rounds)
    load = (args.concurrency, args.max_tokens)
    with tempfile.TemporaryDirectory() as workdir:
        http_port = free_port()
        t0 = time.monotonic()
        proc, address = start_server(extra, workdir, http_port)
        url = f"http://127.0.0.1:{http_port}/v1/chat/completions"
        print(f"bench_http: serve {' '.join(extra)} (ready in {time.monotonic() - t0:.1f} s); "
              f"{args.rounds} rounds x {per_round} requests per door, concurrency {args.concurrency}, "
              f"max_tokens {args.max_tokens}, temperature 0", flush=True)
        try:
            _, _, tokens, _ = asyncio.run(http_load(url, args.concurrency, *load))  # warm-up, every door
            tokens_each = tokens // args.concurrency
            ghz_load(ghz, address, args.concurrency, *load, f"{workdir}/warm.json", tokens_each)
            asyncio.run(grpc_load(address, args.concurrency, *load))
            res = {door: Tally() for door in DOORS}
            for r in range(args.rounds):  # interleaved: each round runs every door once
                for door, run in (("http", lambda: asyncio.run(http_load(url, per_round, *load))),
                                  ("grpc-py", lambda: asyncio.run(grpc_load(address, per_round, *load))),
                                  ("grpc-ghz", lambda: ghz_load(ghz, address, per_round, *load,
                                                                f"{workdir}/ghz-{r}.json", tokens_each))):
                    cpu, server_cpu = time.process_time(), cpu_seconds(proc.pid)
                    result = run()
                    res[door].add(*result, time.process_time() - cpu, cpu_seconds(proc.pid) - server_cpu)
                print(f"  round {r + 1}: p50 " + ", ".join(f"{d} {pct(t.latencies, 0.5) * 1e3:.0f} ms"
                                                          for d, t in res.items()), flush=True)
        finally:
            proc.terminate()
            proc.wait(60)
    print(f"{'door (load generator)':<26}{'requests':>9}{'errors':>7}{'p50 ms':>9}{'p99 ms':>9}{'req/s':>8}"
          f"{'tok/s':>8}{'server cpu ms/req':>19}{'client cpu ms/req':>19}")
    for door, t in res.items():
        n = len(t.latencies)
        client = f"{t.client_cpu / n * 1e3:.2f}" if door != "grpc-ghz" else "(ghz: a process)"
        print(f"{DOORS[door]:<26}{n:>9}{t.errors:>7}{pct(t.latencies, 0.5) * 1e3:>9.1f}"
              f"{pct(t.latencies, 0.99) * 1e3:>9.1f}{t.rps:>8.2f}{t.tokens / t.wall:>8.1f}"
              f"{t.server_cpu / n * 1e3:>19.2f}{client:>19}")
    h = res["http"]
    for door in ("grpc-py", "grpc-ghz"):
        g = res[door]
        print(f"http / {door}: p50 x{pct(h.latencies, 0.5) / pct(g.latencies, 0.5):.3f}, "
              f"p99 x{pct(h.latencies, 0.99) / pct(g.latencies, 0.99):.3f}, throughput x{h.rps / g.rps:.3f}, "
              f"server cpu per request x{h.server_cpu / g.server_cpu * len(g.latencies) / len(h.latencies):.3f}")
    print(f"cpu: {machine_line()}")
    errors = sum(t.errors for t in res.values())
    if errors:
        print(f"bench_http: {errors} requests failed", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
