"""Start-to-SERVING time of `specserve serve` with the packaged model: cold and warm kernel caches.

    python bench/bench_startup.py [--reps 2] [-- extra serve flags]

Cold: a fresh, empty cache directory (XDG_CACHE_HOME and POCL_CACHE_DIR): every device probe
and the pair's warm-up build their OpenCL programs from source. Warm: the same directory
again, so pyopencl's binary cache (keyed by device, driver and source) serves the programs.
Each start is timed from the process start to the first grpc.health.v1 SERVING answer; the
log's own figures (probe, load, warm-up seconds) are printed beside it.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from a clone: the repository root

from bench import common  # noqa: E402

REPO = common.REPO


def serving(address: str) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(address) as ch:
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
            return r.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def start_once(cache: str, flags: list[str]) -> tuple[float, str]:
    """Seconds from spawn to SERVING, and the server's log."""
    env = dict(os.environ, XDG_CACHE_HOME=cache, POCL_CACHE_DIR=os.path.join(cache, "pocl"),
               PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    with tempfile.TemporaryDirectory() as tmp:
        port_file = Path(tmp, "port")
        log = open(Path(tmp, "log"), "w+")
        t0 = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", "0", "--port-file",
                                 str(port_file), *flags], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            while not (port_file.exists() and serving(f"127.0.0.1:{port_file.read_text().strip()}")):
                if proc.poll() is not None:
                    log.seek(0)
                    sys.exit(f"serve exited {proc.returncode}:\n{log.read()}")
                time.sleep(0.05)
            seconds = time.monotonic() - t0
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        log.seek(0)
        return seconds, log.read()


def log_figures(text: str) -> str:
    picks = []
    for pat, label in ((r"OpenCL device chosen: (.*?);", "device"), (r"load_s=([\d.]+)", "load_s"),
                       (r"warmup_s=([\d.]+)", "warmup_s")):
        m = re.search(pat, text)
        if m:
            picks.append(f"{label} {m.group(1)}")
    return "; ".join(picks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=2, help="cold/warm pairs (each with a fresh cache)")
    ap.add_argument("flags", nargs="*", help="extra `specserve serve` flags (after --)")
    args = ap.parse_args()
    print(f"machine   {common.machine_line()}")
    cold, warm = [], []
    for rep in range(args.reps):
        with tempfile.TemporaryDirectory(prefix="specserve-cache-") as cache:
            c, text_c = start_once(cache, args.flags)
            w, text_w = start_once(cache, args.flags)
        cold.append(c)
        warm.append(w)
        print(f"rep {rep}: cold {c:6.2f} s ({log_figures(text_c)})")
        print(f"       warm {w:6.2f} s ({log_figures(text_w)})")
    print(f"start to SERVING, median of {args.reps}: cold {common.median(cold):.2f} s, "
          f"warm {common.median(warm):.2f} s")


if __name__ == "__main__":
    main()
