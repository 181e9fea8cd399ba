"""The gRPC server: servicers + standard health + reflection + one interceptor, and its lifecycle.

    server = SpecServer(config); port = server.start()   # binds (port 0: any free port), loads the startup pair
    server.wait_ready(timeout)                            # until the startup pair serves
    server.drain_and_stop(grace)                          # SIGTERM: NOT_SERVING, finish in-flight, release

Health (`grpc.health.v1`, service "" and each specserve service): NOT_SERVING until a pair is
ready and while draining. With `http_port` >= 0 the OpenAI-compatible HTTP door (service/http) serves
the same registry on host:http_port, with the same tokens, TLS files, health and drain.
The gRPC services and their interceptor are service/rpc's; what both doors share (request ids,
calls in flight, metrics, auth roles) is service/edge's. This module assembles them into one
process and runs its life: bind, load the startup pair, health, drain, stop.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2

from compute.select import make_backend
from service.common.errors import SpecserveError
from service.common.memory import Trimmer
from service.config.settings import ServerConfig
from service.edge.calls import InFlight
from service.edge.metrics import Metrics, start_metrics_server
from service.fit.factory import PairFactory
from service.pairs.registry import PairRegistry
from service.rpc.interceptor import ErrorInterceptor
from service.rpc.services import SERVICE_NAMES, add_services

log = logging.getLogger("specserve.server")


def grpc_options(cfg: ServerConfig) -> list[tuple[str, int]]:
    """Explicit message-size and keepalive settings (both directions the same size)."""
    return [
        ("grpc.max_send_message_length", cfg.max_message_bytes),
        ("grpc.max_receive_message_length", cfg.max_message_bytes),
        ("grpc.keepalive_time_ms", cfg.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", cfg.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),  # clients may ping every 10 s
        ("grpc.so_reuseport", 0),  # a port in use is an error, not silently shared
    ]


class SpecServer:
    """One specserve gRPC server: its backend, factory, registry, metrics and grpc.Server."""

    def __init__(self, config: ServerConfig, backend=None):
        self.config = config
        self._draining = False
        self._credentials = self._tls(config)  # before anything starts: a bad file is a SystemExit
        self._tokens = self._token_table(config)  # {token: role} of --auth-token-file, for both doors; None: off
        self.metrics = Metrics()
        self.in_flight = InFlight()
        self.backend = backend or make_backend(config.backend, config.device, config.threads, config.row_tile)
        log.info("backend", extra={"kv": {"backend": self.backend.name, "device": repr(self.backend)}})
        self.factory = PairFactory(self.backend, config.models_dir or None, config.device_memory_bytes)
        self.health = health.HealthServicer(experimental_non_blocking=True)
        self.registry = PairRegistry(self.factory, self.metrics, config.queue_max, on_change=self._update_health,
                                     load_timeout=config.load_timeout)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=config.max_workers,
                                                             thread_name_prefix="rpc"),
                                  interceptors=self._interceptors(config), options=grpc_options(config),
                                  maximum_concurrent_rpcs=config.max_workers)
        add_services(self.server, self.registry, config, self.metrics, self.health)
        self.port = 0
        self.metrics_port = 0
        self.http_port = 0
        self.http = None  # service.http.server.HttpServer while --http-port serves
        self._metrics_http = None
        self._trimmer: Trimmer | None = None
        self._startup_error: BaseException | None = None
        self._startup_done = threading.Event()
        self._stopped = threading.Event()
        self._update_health()

    @staticmethod
    def _token_table(config: ServerConfig) -> dict[str, str] | None:
        if not config.auth_token_file:
            return None
        from service.edge.auth import load_token_file

        return load_token_file(config.auth_token_file)

    def _interceptors(self, config: ServerConfig) -> list[grpc.ServerInterceptor]:
        """ErrorInterceptor outermost, so an auth refusal gets a request id, a status and metrics."""
        if self._tokens is None:
            return [ErrorInterceptor(self.metrics, self.in_flight)]
        from service.rpc.auth import AuthInterceptor

        return [ErrorInterceptor(self.metrics, self.in_flight), AuthInterceptor(self._tokens)]

    @staticmethod
    def _tls(config: ServerConfig):
        """Server TLS credentials, or None for a plaintext port."""
        if not (config.tls_cert or config.tls_key or config.tls_client_ca):
            return None
        from service.rpc.tls import server_credentials

        return server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)

    # ---- health ----
    def serving(self) -> bool:
        """What health reports (gRPC, and HTTP /health): a pair is ready and the server is not draining."""
        return not self._draining and self.registry.any_ready()

    def _update_health(self) -> None:
        """SERVING while a pair is ready and the server is not draining; NOT_SERVING otherwise."""
        if self._draining:
            return  # enter_graceful_shutdown() has set NOT_SERVING for good
        serving = self.serving()
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *SERVICE_NAMES):
            self.health.set(name, status)

    # ---- lifecycle ----
    def start(self) -> int:
        """Bind, start serving RPCs, start loading the startup pair in the background; returns the port."""
        address = f"{self.config.host}:{self.config.port}"
        if ":" in self.config.host and not self.config.host.startswith("["):
            address = f"[{self.config.host}]:{self.config.port}"
        if self._credentials is None:
            self.port = self.server.add_insecure_port(address)
        else:
            self.port = self.server.add_secure_port(address, self._credentials)
        if self.port == 0:
            raise SystemExit(f"cannot bind {address}")
        self.server.start()
        self._trimmer = Trimmer().start()  # freed memory back to the system (service/common/memory.py)
        if self.config.metrics_port >= 0:
            self._metrics_http, self.metrics_port = start_metrics_server(self.config.metrics_port, self.metrics,
                                                                         addr=self.config.host)
        if self.config.http_port >= 0:
            self._start_http()
        log.info("listening", extra={"kv": {"address": f"{self.config.host}:{self.port}",
                                            "backend": self.backend.name, "models_dir": self.factory.models_dir,
                                            "metrics_port": self.metrics_port or None, "pid": os.getpid(),
                                            "http_port": self.http_port or None,
                                            "tls": "mutual" if self.config.tls_client_ca else
                                            "on" if self._credentials is not None else "off"}})
        if self.config.startup is not None:
            threading.Thread(target=self._load_startup, name="startup-load", daemon=True).start()
        else:
            self._startup_done.set()
        return self.port

    def _start_http(self) -> None:
        """The OpenAI-compatible door on host:http_port: the same registry, tokens, TLS files and bounds."""
        from service.http.app import OpenAIDoor
        from service.http.server import HttpServer, TlsFiles

        c = self.config
        # workers: tokenizing + submitting (short), and one engine-stream pump per generation (<= max_workers)
        self._http_pool = futures.ThreadPoolExecutor(max_workers=c.max_workers + 4, thread_name_prefix="http")
        door = OpenAIDoor(self.registry, c, self.metrics, self.in_flight, self.serving, self._http_pool,
                          self._tokens)
        self.http_door = door
        tls = TlsFiles(c.tls_cert, c.tls_key, c.tls_client_ca) if self._credentials is not None else None
        try:
            self.http = HttpServer(door.app, c.host, c.http_port, tls)
            self.http_port = self.http.start()
        except BaseException:
            self.server.stop(0)
            raise

    def _load_startup(self) -> None:
        req = self.config.startup
        try:
            self.registry.load(req)
        except BaseException as e:  # noqa: BLE001 - reported by wait_ready and the log
            self._startup_error = e
            log.error("loading the startup pair failed: %s", e, exc_info=not isinstance(e, SpecserveError),
                      extra={"kv": {"pair": req.name}})
        finally:
            self._startup_done.set()

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until the startup pair is loaded; raise its error if the load failed."""
        if not self._startup_done.wait(timeout):
            raise TimeoutError(f"the startup pair did not load within {timeout} s")
        if self._startup_error is not None:
            raise self._startup_error

    def drain_and_stop(self, grace: float | None = None) -> None:
        """Graceful stop: NOT_SERVING, refuse new work, let in-flight RPCs finish (up to `grace` s), release."""
        grace = self.config.drain_timeout if grace is None else grace
        if self._draining:
            self._stopped.wait()
            return
        self._draining = True
        log.info("draining", extra={"kv": {"grace_s": grace}})
        self.health.enter_graceful_shutdown()
        self.registry.begin_drain()
        # In-flight specserve RPCs may finish within `grace`; health Watch streams and reflection never
        # end by themselves, so they must not hold the drain: once the specserve RPCs are done, stop.
        idle = self.in_flight.wait_idle(grace)
        log.info("drained", extra={"kv": {"in_flight_done": idle}})
        self.server.stop(0).wait()
        if self.http is not None:
            self.http.stop()
            self._http_pool.shutdown(wait=False, cancel_futures=True)
        self.registry.shutdown(drain_timeout=0)
        if self._trimmer is not None:
            self._trimmer.stop()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        log.info("stopped")
        self._stopped.set()

    def stop(self) -> None:
        """Immediate stop (tests): cancel everything in flight, release all pairs."""
        self.drain_and_stop(grace=0)

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)
