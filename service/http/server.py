"""uvicorn serving the OpenAI door on its own thread and event loop, beside the gRPC server.

    http = HttpServer(door.app, host, port, tls=TlsFiles(cert, key, client_ca)); port = http.start()
    http.stop()

The socket is bound here, in the caller's thread, so a port in use is a SystemExit at start (as the
gRPC port's) and port 0 gives the bound port at once. TLS uses the gRPC port's files
(--tls-cert, --tls-key; with --tls-client-ca a client certificate is required, /health included).
uvicorn configures no logging (specserve's handlers stay) and writes no access log (the app logs
each request with its request id).
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass

import uvicorn

log = logging.getLogger("specserve.http")

START_TIMEOUT_S = 30.0
STOP_GRACE_S = 2.0  # connections still open when the server stops (the drain came first) get this long
BACKLOG = 2048


@dataclass(frozen=True)
class TlsFiles:
    """PEM paths of --tls-cert, --tls-key and --tls-client-ca ("" = no client certificate asked)."""

    cert: str
    key: str
    client_ca: str = ""


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free port); SystemExit when it cannot be bound."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # not SO_REUSEPORT: a port in use fails
            sock.bind(address)
            sock.listen(BACKLOG)
        except BaseException:
            sock.close()
            raise
    except OSError as e:
        raise SystemExit(f"cannot bind {host}:{port} (--http-port): {e.strerror or e}") from None
    return sock


class HttpServer:
    """One uvicorn server of `app` on a bound socket, run by a daemon thread with its own event loop."""

    def __init__(self, app, host: str, port: int, tls: TlsFiles | None = None, keepalive_s: int = 5):
        self.host, self.tls = host, tls
        kw = {}
        if tls is not None:
            kw = dict(ssl_certfile=tls.cert, ssl_keyfile=tls.key, ssl_ca_certs=tls.client_ca or None,
                      ssl_cert_reqs=ssl.CERT_REQUIRED if tls.client_ca else ssl.CERT_NONE)
        self.config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off", server_header=False,
                                     timeout_keep_alive=keepalive_s, timeout_graceful_shutdown=STOP_GRACE_S,
                                     backlog=BACKLOG, **kw)
        try:
            self.config.load()  # the TLS context: a key that does not match its certificate fails here
        except (ssl.SSLError, OSError) as e:
            raise SystemExit(f"--tls-cert / --tls-key / --tls-client-ca for the HTTP port: {e}") from None
        self.server = uvicorn.Server(self.config)
        self._sock = bind(host, port)
        self.port = self._sock.getsockname()[1]
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self) -> int:
        """Serve on the bound socket; returns the port once uvicorn accepts connections."""
        self._thread = threading.Thread(target=self._run, name="http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self._sock.close()
                raise SystemExit(f"the HTTP server did not start: {self._error or 'timed out'}")
            time.sleep(0.01)
        return self.port

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self._sock])  # its loop: uvloop when installed, else asyncio
        except BaseException as e:  # noqa: BLE001 - reported by start() or the log
            self._error = e
            log.error("the HTTP server stopped: %s", e, exc_info=e)

    def stop(self) -> None:
        """Stop accepting, close connections (open ones get STOP_GRACE_S), end the thread."""
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=STOP_GRACE_S + 5)
        self._sock.close()
