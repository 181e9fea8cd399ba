"""Soak: a bounded gRPC load against a `specserve serve` this script starts, reporting as it goes.

    .venv/bin/python bench/soak.py                       120 s at concurrency 16, the packaged model
    .venv/bin/python bench/soak.py --seconds 60 --concurrency 8 --max-tokens 8 -- --backend numpy

Starts `specserve serve` on a free port of 127.0.0.1 (extra serve flags after `--`), waits
until it is SERVING, then runs `--concurrency` Python gRPC clients that call Generate (and
every fourth call GenerateStream) back to back with a few prompts, each with a deadline.
Every `--every` seconds it prints the calls of that interval by status code, p50/p99
latency of the interval and the server's RSS; at the end the totals, then it SIGTERMs the
server and prints how long the drain took. It stops by itself. Exit status 1 when any call
ended with a status other than OK (RESOURCE_EXHAUSTED included: the load is sized to fit
--queue-max), or when RSS grew by more than --max-rss-growth from the first report to the last.

--hostile adds `--hostile-clients` clients that send, over gRPC and the HTTP door (the server gets
--http-port on a free port), what one client must never hurt the others with: grammars that compile and then
fail at the first token (each exploding regex with a letter of its own), a GBNF too large to
take, 100k-message chats, fields gRPC cannot express, bodies that stall (408) or stop mid-way,
and streams cancelled mid-way. Each answer must be the code its case expects (never INTERNAL),
the well-behaved clients' calls must all be OK, the server log must hold no traceback, and RSS
must end within --max-rss-growth of what it was before the load began.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from a clone: the repository root

import grpc  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from service.pb.specserve.v1 import specserve_pb2 as pb  # noqa: E402
from service.pb.specserve.v1 import specserve_pb2_grpc as pb_grpc  # noqa: E402

PROMPTS = ("Write one sentence about the sea.", "List three colours.", "What is the capital of France?",
           "Tell me a short joke about cats.")


def rss_mib(pid: int) -> float:
    """Resident memory of a process (MiB), from /proc."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def start_server(extra: list[str], workdir: str) -> tuple[subprocess.Popen, str, object]:
    port_file = os.path.join(workdir, "port")
    log = open(os.path.join(workdir, "serve.log"), "w+")
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", "0", "--port-file", port_file,
                             "--log-level", "warning", *extra], stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    deadline = time.monotonic() + 300
    while not os.path.exists(port_file):
        if proc.poll() is not None or time.monotonic() > deadline:
            log.seek(0)
            sys.exit(f"serve did not start:\n{log.read()}")
        time.sleep(0.1)
    address = f"127.0.0.1:{open(port_file).read().strip()}"
    with grpc.insecure_channel(address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        while health.Check(health_pb2.HealthCheckRequest(), timeout=5).status != health_pb2.HealthCheckResponse.SERVING:
            if time.monotonic() > deadline:
                sys.exit("serve never became SERVING")
            time.sleep(0.2)
    return proc, address, log


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for the HTTP door: serve logs only warnings here)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Tally:
    """Finished calls: (status code name, seconds), per reporting interval and in total."""

    def __init__(self):
        self._lock = threading.Lock()
        self.interval: list[tuple[str, float]] = []
        self.total: collections.Counter = collections.Counter()
        self.all_latencies: list[float] = []

    def add(self, code: str, seconds: float) -> None:
        with self._lock:
            self.interval.append((code, seconds))
            self.total[code] += 1
            self.all_latencies.append(seconds)

    def take(self) -> list[tuple[str, float]]:
        with self._lock:
            out, self.interval = self.interval, []
            return out


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def client(address: str, stop: threading.Event, tally: Tally, worker: int, max_tokens: int, deadline_s: float):
    with grpc.insecure_channel(address) as ch:
        gen = pb_grpc.GenerationServiceStub(ch)
        n = 0
        while not stop.is_set():
            fields = dict(prompt=PROMPTS[(worker + n) % len(PROMPTS)], max_tokens=max_tokens,
                          sampling=pb.SamplingParams(temperature=0.7, seed=worker * 1000 + n))
            t0 = time.monotonic()
            try:
                if n % 4 == 3:
                    for _ in gen.GenerateStream(pb.GenerateStreamRequest(**fields), timeout=deadline_s):
                        pass
                else:
                    gen.Generate(pb.GenerateRequest(**fields), timeout=deadline_s)
                code = "OK"
            except grpc.RpcError as e:
                code = e.code().name
            tally.add(code, time.monotonic() - t0)
            n += 1


# hostile cases: (name, door, expected codes); a case's answer outside its expected codes is a failure
HOSTILE_CASES = (
    ("regex_explodes", "grpc", {"RESOURCE_EXHAUSTED"}),
    ("schema_recursive_defs", "http", {"RESOURCE_EXHAUSTED"}),
    ("schema_requires_itself", "grpc", {"RESOURCE_EXHAUSTED"}),
    ("gbnf_100k_alternatives", "grpc", {"INVALID_ARGUMENT"}),
    ("messages_100k", "http", {"INVALID_ARGUMENT"}),
    ("top_k_negative", "http", {"INVALID_ARGUMENT"}),
    ("max_tokens_huge", "http", {"INVALID_ARGUMENT"}),
    ("body_stalls", "http", {"DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}),
    ("body_stops_midway", "http", {"CLOSED"}),
    ("stream_cancelled", "grpc", {"CANCELLED"}),
)
SETTLE_S = 7.0  # after the load, before the last RSS: the server gives freed pages back every 5 s
HTTP_CODES = {200: "OK", 400: "INVALID_ARGUMENT", 408: "DEADLINE_EXCEEDED", 413: "RESOURCE_EXHAUSTED",
              429: "RESOURCE_EXHAUSTED", 499: "CANCELLED", 500: "INTERNAL", 503: "UNAVAILABLE"}


def http_call(port: int, body: bytes, stall_after: int | None = None, close_after: int | None = None,
              timeout: float = 60) -> str:
    """POST /v1/chat/completions by hand; the gRPC code name of the answer ("CLOSED": we hung up)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body))
        cut = stall_after if stall_after is not None else close_after
        s.sendall(body if cut is None else body[:cut])
        if close_after is not None:
            return "CLOSED"
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else 0
    return HTTP_CODES.get(status, f"HTTP_{status}")


def hostile_call(case: str, n: int, address: str, http_port: int, gen) -> str:
    """One hostile request of `case` (the n-th: each exploding regex has a letter of its own)."""
    chat = {"model": "default", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16}
    try:
        if case == "regex_explodes":
            letter = "abcdefghijklmnopqrstuvwxyz"[n % 26]
            gen.Generate(pb.GenerateRequest(prompt="Hi", max_tokens=8, response_format=pb.ResponseFormat(
                regex=f"^({letter}{{1000}}){{1000}}$")), timeout=60)
        elif case == "schema_requires_itself":
            schema = {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}
            gen.Generate(pb.GenerateRequest(prompt="Hi", max_tokens=8, response_format=pb.ResponseFormat(
                json_schema=json.dumps(schema))), timeout=60)
        elif case == "gbnf_100k_alternatives":
            gen.Generate(pb.GenerateRequest(prompt="Hi", max_tokens=8, response_format=pb.ResponseFormat(
                gbnf="root ::= " + " | ".join(f'"w{i}"' for i in range(100_000)))), timeout=60)
        elif case == "stream_cancelled":
            stream = gen.GenerateStream(pb.GenerateStreamRequest(prompt="Count to one hundred.", max_tokens=64),
                                        timeout=60)
            next(stream, None)
            stream.cancel()
            return "CANCELLED"
        elif case == "schema_recursive_defs":
            body = dict(chat, response_format={"type": "json_object", "schema": {"$ref": "#/$defs/a", "$defs": {
                "a": {"type": "object", "properties": {"x": {"$ref": "#/$defs/a"}}, "required": ["x"]}}}})
            return http_call(http_port, json.dumps(body).encode())
        elif case == "messages_100k":
            body = dict(chat, messages=[{"role": "user", "content": "hi"}] * 100_000)
            return http_call(http_port, json.dumps(body).encode())
        elif case == "top_k_negative":
            return http_call(http_port, json.dumps(dict(chat, top_k=-1)).encode())
        elif case == "max_tokens_huge":
            return http_call(http_port, json.dumps(dict(chat, max_tokens=10 ** 30)).encode())
        elif case == "body_stalls":
            return http_call(http_port, json.dumps(chat).encode(), stall_after=20)
        elif case == "body_stops_midway":
            return http_call(http_port, json.dumps(chat).encode(), close_after=20)
        return "OK"
    except grpc.RpcError as e:
        return e.code().name
    except OSError as e:
        return f"SOCKET_{type(e).__name__}"


def hostile_client(address: str, http_port: int, stop: threading.Event, tally: Tally, worker: int,
                   cases: tuple = HOSTILE_CASES) -> None:
    with grpc.insecure_channel(address) as ch:
        gen = pb_grpc.GenerationServiceStub(ch)
        n = worker
        while not stop.is_set():
            case, _, expected = cases[n % len(cases)]
            t0 = time.monotonic()
            code = hostile_call(case, n // len(cases), address, http_port, gen)
            tally.add(f"{case}:{code}" + ("" if code in expected else ":UNEXPECTED"), time.monotonic() - t0)
            n += 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--every", type=float, default=10.0, help="seconds between reports")
    ap.add_argument("--deadline", type=float, default=60.0, help="per-call deadline (s)")
    ap.add_argument("--max-rss-growth", type=float, default=None,
                    help="MiB allowed from first to last report [100; --hostile: from before the load, 150]")
    ap.add_argument("--hostile", action="store_true", help="add hostile clients over gRPC and HTTP (see above)")
    ap.add_argument("--hostile-clients", type=int, default=2)
    ap.add_argument("--hostile-cases", default="", help="comma-separated case names (default: all)")
    ap.add_argument("serve_flags", nargs="*", help="extra `specserve serve` flags (after --)")
    args = ap.parse_args()
    extra = args.serve_flags or ["--threads", "1", "-np", "4", "-c", "2048"]
    if args.max_rss_growth is None:
        args.max_rss_growth = 150.0 if args.hostile else 100.0
    with tempfile.TemporaryDirectory() as workdir:
        t_start = time.monotonic()
        http_port = free_port() if args.hostile else 0
        proc, address, log = start_server(extra + (["--http-port", str(http_port)] if args.hostile else []), workdir)
        rss_before = rss_mib(proc.pid)
        print(f"soak: {address} (serve {' '.join(extra)}; started in {time.monotonic() - t_start:.1f} s), "
              f"{args.concurrency} clients for {args.seconds:.0f} s, max_tokens {args.max_tokens}", flush=True)
        stop, tally = threading.Event(), Tally()
        threads = [threading.Thread(target=client, args=(address, stop, tally, i, args.max_tokens, args.deadline),
                                    daemon=True) for i in range(args.concurrency)]
        hostile = Tally()
        wanted = set(filter(None, args.hostile_cases.split(",")))
        cases = tuple(c for c in HOSTILE_CASES if not wanted or c[0] in wanted)
        threads += [threading.Thread(target=hostile_client, args=(address, http_port, stop, hostile, i, cases),
                                     daemon=True) for i in range(args.hostile_clients if args.hostile else 0)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        rss_seen: list[float] = []
        while (elapsed := time.monotonic() - t0) < args.seconds:
            time.sleep(min(args.every, args.seconds - elapsed))
            calls = tally.take()
            codes = collections.Counter(c for c, _ in calls)
            lat = [s for _, s in calls]
            rss_seen.append(rss_mib(proc.pid))
            print(f"[{time.monotonic() - t0:6.1f} s] calls {len(calls):4d} "
                  f"{dict(sorted(codes.items()))}  p50 {pct(lat, 0.5) * 1000:7.0f} ms  "
                  f"p99 {pct(lat, 0.99) * 1000:7.0f} ms  server RSS {rss_seen[-1]:.0f} MiB"
                  + (f"  hostile {len(hostile.take())}" if args.hostile else ""), flush=True)
        stop.set()
        for t in threads:
            t.join(args.deadline + 5)
        spent = time.monotonic() - t0
        total = sum(tally.total.values())
        print(f"total: {total} calls in {spent:.0f} s ({total / spent:.1f}/s) {dict(sorted(tally.total.items()))}; "
              f"p50 {pct(tally.all_latencies, 0.5) * 1000:.0f} ms, p99 {pct(tally.all_latencies, 0.99) * 1000:.0f} ms; "
              f"RSS first {rss_seen[0]:.0f} MiB, last {rss_seen[-1]:.0f} MiB, max {max(rss_seen):.0f} MiB", flush=True)
        if args.hostile:
            print(f"hostile: {dict(sorted(hostile.total.items()))}", flush=True)
        if args.hostile:
            time.sleep(SETTLE_S)  # idle now: what the server still holds once freed pages went back
        t_term = time.monotonic()
        rss_end = rss_mib(proc.pid)
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        print(f"SIGTERM: serve exited {rc} after {time.monotonic() - t_term:.1f} s", flush=True)
        log.seek(0)
        tracebacks = log.read().count("Traceback")
        log.close()
    failed = total - tally.total["OK"]
    unexpected = sum(n for k, n in hostile.total.items() if k.endswith(":UNEXPECTED"))
    grew = (rss_end - rss_before) if args.hostile else rss_seen[-1] - rss_seen[0]
    if args.hostile:
        print(f"RSS before the load {rss_before:.0f} MiB, at its end {rss_end:.0f} MiB ({grew:+.0f} MiB); "
              f"tracebacks in the server log: {tracebacks}", flush=True)
    if failed or unexpected or tracebacks or grew > args.max_rss_growth or rc != 0:
        print(f"soak: FAILED ({failed} calls not OK, {unexpected} hostile answers unexpected, {tracebacks} "
              f"tracebacks, RSS grew {grew:.0f} MiB, exit status {rc})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
