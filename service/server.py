"""The gRPC server: servicers + standard health + reflection + one interceptor, and its lifecycle.

    server = SpecServer(config); port = server.start()   # binds (port 0: any free port), loads the startup pair
    server.wait_ready(timeout)                            # until the startup pair serves
    server.drain_and_stop(grace)                          # SIGTERM: NOT_SERVING, finish in-flight, release

Health (`grpc.health.v1`, service "" and each specserve service): NOT_SERVING until a pair is
ready and while draining. With `http_port` >= 0 the OpenAI-compatible HTTP door (service/http) serves
the same registry on host:http_port, with the same tokens, TLS files, health and drain.
The interceptor gives every RPC a request id (from the `x-request-id` header, else a new one;
sent back as trailing metadata; a header that breaks the rule of metadata.check_request_id is
INVALID_ARGUMENT before the handler runs), maps service.errors to status codes, turns anything
unexpected into INTERNAL with a log line (no traceback to the client), and records the request in
the metrics.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from compute.select import make_backend
from service.errors import InvalidArgument, ResourceExhausted, SpecserveError
from service.factory import PairFactory, PairRequest
from service.logging_setup import new_request_id, request_id_var
from service.memory import Trimmer
from service.metadata import DEFICIT_HEADER, REQUEST_ID_HEADER, check_request_id, trailers, valid_request_id
from service.metrics import Metrics, start_metrics_server
from service.params import ContextParams, SpeculativeConfig
from service.pb.specserve.v1 import specserve_pb2 as pb
from service.pb.specserve.v1 import specserve_pb2_grpc as pb_grpc
from service.registry import DEFAULT_DRAIN_TIMEOUT, DEFAULT_LOAD_TIMEOUT, PairRegistry
from service.requests import DEFAULT_MAX_PROMPT_BYTES, DEFAULT_MAX_TOKENS
from service.servicers import GenerationServicer, ModelServicer

log = logging.getLogger("specserve.server")

SERVICE_NAMES = tuple(pb.DESCRIPTOR.services_by_name[s].full_name for s in ("ModelService", "GenerationService"))
MiB = 1 << 20


@dataclass(frozen=True)
class ServerConfig:
    """Everything `specserve serve` configures."""

    host: str = "127.0.0.1"
    port: int = 50051  # 0: any free port (tests)
    backend: str = "numpy"  # "auto" | "numpy" | "opencl" (the CLI defaults to auto)
    device: str = ""  # OpenCL device selector ("" = the first GPU, else the first device)
    device_memory_bytes: int = 0  # 0: the device's free memory
    threads: int = 0  # CPU threads of the backend (compute.select.make_backend); 0: its default
    row_tile: int = -1  # NumPy matmul rows per BLAS call; -1 = the backend's default
    models_dir: str = ""  # Load and Fit accept only files inside it
    startup: PairRequest | None = None  # loaded at start (None: start empty, pairs come by Load)
    params: ContextParams = field(default_factory=ContextParams)  # defaults for request zeros
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    default_target: str = ""  # the model a PairSpec without target_path means
    max_tokens: int = DEFAULT_MAX_TOKENS
    max_prompt_bytes: int = DEFAULT_MAX_PROMPT_BYTES  # larger prompts are INVALID_ARGUMENT before tokenizing
    queue_max: int = 64
    max_workers: int = 64  # gRPC handler threads; also the most concurrent RPCs (more get RESOURCE_EXHAUSTED)
    max_message_bytes: int = 16 * MiB
    keepalive_time_ms: int = 60_000  # server pings an idle connection this often
    keepalive_timeout_ms: int = 20_000  # and closes it when a ping is not answered in this time
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT  # SIGTERM / Unload: seconds in-flight requests may finish
    metrics_port: int = -1  # -1: no metrics endpoint; 0: any free port
    auth_token_file: str = ""  # "role:token" lines (service.auth); "": no authentication
    tls_cert: str = ""  # PEM certificate (chain) of the server; "": plaintext (service.tls)
    tls_key: str = ""  # PEM private key of tls_cert
    tls_client_ca: str = ""  # PEM CA: require client certificates it signed (mutual TLS); "": none asked
    load_timeout: float = DEFAULT_LOAD_TIMEOUT  # Fit / Load answer DEADLINE_EXCEEDED after this many seconds
    http_port: int = -1  # the OpenAI-compatible HTTP door (service/http) on host:http_port; -1: off; 0: any free port
    http_body_timeout_s: float = 10.0  # an HTTP request body must arrive within this (service/http/bodies.py)


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


class InFlight:
    """How many specserve RPCs are running; the drain waits for these, not for health Watch streams."""

    def __init__(self):
        self._n = 0
        self._idle = threading.Condition()

    def __enter__(self):
        with self._idle:
            self._n += 1

    def __exit__(self, *exc):
        with self._idle:
            self._n -= 1
            if self._n == 0:
                self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Block until none runs (True) or `timeout` seconds passed (False)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._n == 0, timeout)


class ErrorInterceptor(grpc.ServerInterceptor):
    """Request ids, status codes from service.errors, INTERNAL for the unexpected, request metrics and logs."""

    def __init__(self, metrics: Metrics | None, in_flight: InFlight | None = None):
        self.metrics = metrics
        self.in_flight = in_flight or InFlight()

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method
        header_id = dict(details.invocation_metadata or ()).get(REQUEST_ID_HEADER, "")
        quiet = not method.startswith("/specserve.")  # health checks and reflection: debug level
        # The request is decoded inside the wrapper (grpc gets no deserializer): bytes that are not the
        # method's message are INVALID_ARGUMENT with a request id, not grpc's own INTERNAL.
        decode = _decoder(handler.request_deserializer, method)
        if handler.unary_unary:
            behavior = handler.unary_unary
            return grpc.unary_unary_rpc_method_handler(
                self._unary(lambda raw, context: behavior(decode(raw), context), method, header_id, quiet),
                response_serializer=handler.response_serializer)
        if handler.unary_stream:
            stream = handler.unary_stream

            def decoded_stream(raw, context):
                result = stream(decode(raw), context)
                if result is not None:  # None: health Watch answered through a callback
                    yield from result
            return grpc.unary_stream_rpc_method_handler(
                self._stream(decoded_stream, method, header_id, quiet),
                response_serializer=handler.response_serializer)
        return handler  # no client-streaming RPCs here

    def _begin(self, context, header_id: str):
        rid = header_id if valid_request_id(header_id) else new_request_id()  # an invalid one is refused next
        token = request_id_var.set(rid)
        context.set_trailing_metadata(trailers(rid))
        return token

    def _fail(self, exc: BaseException, context, method: str):
        """Abort the RPC with the status `exc` stands for (context.abort raises)."""
        if isinstance(exc, SpecserveError):
            code = getattr(grpc.StatusCode, exc.code, grpc.StatusCode.INTERNAL)
            if isinstance(exc, ResourceExhausted) and exc.deficit_bytes:
                context.set_trailing_metadata(trailers(request_id_var.get(), (DEFICIT_HEADER, str(exc.deficit_bytes))))
            context.abort(code, _bounded_details(str(exc)))
        if _aborted(context):  # the handler aborted itself: keep its status
            raise exc
        log.error("unexpected error in %s", method, exc_info=exc, extra={"kv": {"method": method}})
        context.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {request_id_var.get()}); see server log")

    def _done(self, method: str, context, t0: float, quiet: bool, code: str | None = None) -> None:
        code = code or _final_code(context)
        ms = (time.monotonic() - t0) * 1000
        if self.metrics is not None and not quiet:
            self.metrics.on_request(method, code, ms / 1000)
        level = logging.DEBUG if quiet else logging.INFO if code in ("OK", "CANCELLED") else logging.WARNING
        log.log(level, "rpc", extra={"kv": {"method": method, "code": code, "ms": round(ms, 1)}})

    def _unary(self, behavior, method, header_id, quiet):
        counted = self.in_flight if not quiet else contextlib.nullcontext()

        def wrapper(request, context):
            t0, token = time.monotonic(), self._begin(context, header_id)
            code = None
            try:
                if header_id:
                    check_request_id(header_id, f"the {REQUEST_ID_HEADER} header")
                with counted:
                    return behavior(request, context)
            except BaseException as exc:  # noqa: BLE001 - every failure becomes a status
                code = _code_of(exc, context)
                self._fail(exc, context, method)
            finally:
                self._done(method, context, t0, quiet, code)
                request_id_var.reset(token)
        return wrapper

    def _stream(self, behavior, method, header_id, quiet):
        counted = self.in_flight if not quiet else contextlib.nullcontext()

        def wrapper(request, context):
            t0, token = time.monotonic(), self._begin(context, header_id)
            code = None
            try:
                if header_id:
                    check_request_id(header_id, f"the {REQUEST_ID_HEADER} header")
                with counted:
                    yield from behavior(request, context)
            except GeneratorExit:  # the client went away mid-stream
                code = "CANCELLED"
                raise
            except BaseException as exc:  # noqa: BLE001
                code = _code_of(exc, context)
                self._fail(exc, context, method)
            finally:
                self._done(method, context, t0, quiet, code)
                try:
                    request_id_var.reset(token)
                except ValueError:  # the generator was closed from another context
                    pass
        return wrapper


MAX_DETAILS_CHARS = 1024  # a message quoting a client's 30 kB field must still fit grpc's 16 KiB metadata limit


def _bounded_details(message: str) -> str:
    """Status details short enough for the grpc-message trailer (percent-encoded: up to 12 bytes a char).
    The middle goes: a message starts with what it is about and ends with why."""
    if len(message) <= MAX_DETAILS_CHARS:
        return message
    half = MAX_DETAILS_CHARS // 2
    return f"{message[:half]} ...({len(message) - 2 * half} characters left out)... {message[-half:]}"


def _decoder(deserialize, method: str):
    """raw bytes -> the method's request message; InvalidArgument when they are not one."""
    if deserialize is None:
        return lambda raw: raw

    def decode(raw: bytes):
        try:
            return deserialize(raw)
        except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and whatever a parser raises
            raise InvalidArgument(f"the request is not a valid {method.rsplit('/', 1)[-1]} request message "
                                  f"({type(e).__name__}): send the message the method's .proto declares") from None
    return decode


def _aborted(context) -> bool:
    code = context.code() if hasattr(context, "code") else None
    return code is not None and code != grpc.StatusCode.OK


def _code_of(exc: BaseException, context) -> str:
    if isinstance(exc, SpecserveError):
        return exc.code
    if _aborted(context):
        return context.code().name
    return "INTERNAL"


def _final_code(context) -> str:
    if context.is_active():
        return "OK"
    remaining = context.time_remaining()
    return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"


class _MethodAwarePool:
    """The default descriptor pool, but `FindFileContainingSymbol` also resolves method names.

    grpc-python's reflection asks the pool for "pkg.Service.Method" (ghz and `grpcurl describe`
    do), which upb's pool does not resolve (grpc/grpc#34743); look the service up instead.
    """

    def __init__(self, pool=None):
        from google.protobuf import descriptor_pool

        self._pool = pool or descriptor_pool.Default()

    def __getattr__(self, name):
        return getattr(self._pool, name)

    def FindFileContainingSymbol(self, symbol: str):  # noqa: N802 - the pool's API
        try:
            return self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            service, _, method = symbol.rpartition(".")
            try:
                desc = self._pool.FindServiceByName(service)
            except KeyError:
                raise KeyError(symbol) from None
            if method not in desc.methods_by_name:
                raise
            return desc.file


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
        pb_grpc.add_ModelServiceServicer_to_server(ModelServicer(self.registry, config), self.server)
        pb_grpc.add_GenerationServiceServicer_to_server(
            GenerationServicer(self.registry, config, self.metrics), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server, pool=_MethodAwarePool())
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
        from service.auth import load_token_file

        return load_token_file(config.auth_token_file)

    def _interceptors(self, config: ServerConfig) -> list[grpc.ServerInterceptor]:
        """ErrorInterceptor outermost, so an auth refusal gets a request id, a status and metrics."""
        if self._tokens is None:
            return [ErrorInterceptor(self.metrics, self.in_flight)]
        from service.auth import AuthInterceptor

        return [ErrorInterceptor(self.metrics, self.in_flight), AuthInterceptor(self._tokens)]

    @staticmethod
    def _tls(config: ServerConfig):
        """Server TLS credentials, or None for a plaintext port."""
        if not (config.tls_cert or config.tls_key or config.tls_client_ca):
            return None
        from service.tls import server_credentials

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
        self._trimmer = Trimmer().start()  # freed memory back to the system (service/memory.py)
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
