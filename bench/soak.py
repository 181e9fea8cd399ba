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
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--every", type=float, default=10.0, help="seconds between reports")
    ap.add_argument("--deadline", type=float, default=60.0, help="per-call deadline (s)")
    ap.add_argument("--max-rss-growth", type=float, default=100.0, help="MiB allowed from first to last report")
    ap.add_argument("serve_flags", nargs="*", help="extra `specserve serve` flags (after --)")
    args = ap.parse_args()
    extra = args.serve_flags or ["--threads", "1", "-np", "4", "-c", "2048"]
    with tempfile.TemporaryDirectory() as workdir:
        t_start = time.monotonic()
        proc, address, log = start_server(extra, workdir)
        print(f"soak: {address} (serve {' '.join(extra)}; started in {time.monotonic() - t_start:.1f} s), "
              f"{args.concurrency} clients for {args.seconds:.0f} s, max_tokens {args.max_tokens}", flush=True)
        stop, tally = threading.Event(), Tally()
        threads = [threading.Thread(target=client, args=(address, stop, tally, i, args.max_tokens, args.deadline),
                                    daemon=True) for i in range(args.concurrency)]
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
                  f"p99 {pct(lat, 0.99) * 1000:7.0f} ms  server RSS {rss_seen[-1]:.0f} MiB", flush=True)
        stop.set()
        for t in threads:
            t.join(args.deadline + 5)
        spent = time.monotonic() - t0
        total = sum(tally.total.values())
        print(f"total: {total} calls in {spent:.0f} s ({total / spent:.1f}/s) {dict(sorted(tally.total.items()))}; "
              f"p50 {pct(tally.all_latencies, 0.5) * 1000:.0f} ms, p99 {pct(tally.all_latencies, 0.99) * 1000:.0f} ms; "
              f"RSS first {rss_seen[0]:.0f} MiB, last {rss_seen[-1]:.0f} MiB, max {max(rss_seen):.0f} MiB", flush=True)
        t_term = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        print(f"SIGTERM: serve exited {rc} after {time.monotonic() - t_term:.1f} s", flush=True)
        log.close()
    failed = total - tally.total["OK"]
    grew = rss_seen[-1] - rss_seen[0]
    if failed or grew > args.max_rss_growth or rc != 0:
        print(f"soak: FAILED ({failed} calls not OK, RSS grew {grew:.0f} MiB, exit status {rc})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
