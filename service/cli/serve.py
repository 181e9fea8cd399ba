"""`specserve serve`: the server's flags, mapped onto ServerConfig by field name, and its process life."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import threading

from service.cli.flags import (
    add_compute_flags,
    add_model_flags,
    add_speculative_flags,
    context_params,
    find_packaged_model,
    list_devices,
    parse_bytes,
    speculative_config,
)
from service.config.settings import DEFAULT_SLOTS

log = logging.getLogger("specserve.cli")


# ServerConfig fields `serve` computes from several flags (the model decides the folder and the
# startup pair); every other field is the flag of the same dest, and keepalives have no flag.
SERVE_COMPUTED = ("models_dir", "startup", "params", "speculative", "default_target")
SERVE_UNFLAGGED = ("keepalive_time_ms", "keepalive_timeout_ms", "http_body_timeout_s")


def serve_config(args):
    """ServerConfig from `specserve serve` flags: each flag's dest is the field it sets."""
    from service.config.settings import PairRequest, ServerConfig

    model = args.model or find_packaged_model()
    speculative = speculative_config(args)
    params = context_params(args, n_parallel=args.parallel)
    startup = None
    if not args.no_load:
        startup = PairRequest(name=args.name, target_path=os.path.abspath(model),
                              draft_path=os.path.abspath(args.model_draft) if args.model_draft else "",
                              params=params, speculative=speculative, budget_bytes=0)
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServerConfig)
             if f.name not in SERVE_COMPUTED + SERVE_UNFLAGGED}
    # Request zeros mean the server's flags, but a client's PairSpec may name another model:
    # its n_ctx default then comes from that model (fill_defaults), so only non-zero flags carry over.
    return ServerConfig(**flags, models_dir=args.models_dir or os.path.dirname(os.path.abspath(model)),
                        startup=startup, params=params, speculative=speculative,
                        default_target=os.path.abspath(model))


def cmd_serve(args) -> int:
    from service.common import logging_setup, memory

    memory.cap_arenas()  # before any of the server's threads mallocs (service/common/memory.py)
    logging_setup.configure(args.log_level, args.log_format)
    if args.list_devices:
        return list_devices(args.threads)
    from service.server import SpecServer

    server = SpecServer(serve_config(args))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    port = server.start()
    if args.port_file:
        tmp = args.port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{port}\n")
        os.replace(tmp, args.port_file)
    threading.Thread(target=_exit_on_startup_failure, args=(server, stop), daemon=True).start()
    stop.wait()
    failed = server._startup_done.is_set() and server._startup_error is not None
    code = 1 if failed else 0
    log.info("shutting down", extra={"kv": {"reason": "startup load failed" if failed else "signal"}})
    _exit_later(server.config.drain_timeout + EXIT_MARGIN_S, code)
    server.drain_and_stop()
    return code


EXIT_MARGIN_S = 4.0  # after the drain, seconds the process may take to exit before it is ended


def _exit_later(seconds: float, code: int) -> None:
    """End the process after `seconds` whatever its threads do (a loader stuck in a read cannot be
    interrupted): SIGTERM always ends `serve` within the drain timeout plus EXIT_MARGIN_S."""

    def end() -> None:
        log.error("still running %.0f s after the drain began: exiting now", seconds)
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)

    timer = threading.Timer(seconds, end)
    timer.daemon = True
    timer.start()


def _exit_on_startup_failure(server, stop: threading.Event) -> None:
    try:
        server.wait_ready()
    except BaseException:  # noqa: BLE001 - logged by the server
        stop.set()


def add_server_flags(p: argparse.ArgumentParser) -> None:
    """`serve`'s own flags; their defaults are ServerConfig's."""
    from service.config.settings import PairRequest
    from service.config.settings import ServerConfig as C

    g = p.add_argument_group("server")
    g.add_argument("--host", default=C.host, help="address to bind (default %(default)s)")
    g.add_argument("--port", type=int, default=C.port, help="port (0 = any free port; default %(default)s)")
    g.add_argument("--port-file", default="", help="write the bound port to this file once listening")
    g.add_argument("--models-dir", default=C.models_dir,
                   help="Load and Fit accept only model files inside it (default: the folder of -m, "
                        "else of the packaged model)")
    g.add_argument("--name", default=PairRequest.name, help="name of the pair loaded at start (default %(default)s)")
    g.add_argument("--no-load", action="store_true", help="start with no pair loaded (load one with Load)")
    g.add_argument("-n", "--n-predict", dest="max_tokens", type=int, default=C.max_tokens,
                   help="max_tokens of a request that sets none (default %(default)s)")
    g.add_argument("--queue-max", type=int, default=C.queue_max,
                   help="requests waiting for a slot, per pair (default %(default)s)")
    g.add_argument("--max-workers", type=int, default=C.max_workers,
                   help="concurrent RPCs (more get RESOURCE_EXHAUSTED)")
    g.add_argument("--max-message-size", dest="max_message_bytes", type=parse_bytes, default=C.max_message_bytes,
                   help="largest gRPC message")
    g.add_argument("--max-prompt-bytes", type=parse_bytes, default=C.max_prompt_bytes,
                   help="largest prompt, refused (INVALID_ARGUMENT) before tokenizing: text as UTF-8, messages "
                        "and token ids as sent (default 1M: ~250k tokens of English, 32k at 32 bytes a token)")
    g.add_argument("--drain-timeout", type=float, default=C.drain_timeout,
                   help="SIGTERM: seconds in-flight requests may finish (default %(default)s)")
    g.add_argument("--metrics-port", type=int, default=C.metrics_port, help="serve Prometheus /metrics on this port")
    g.add_argument("--http-port", type=int, default=C.http_port,
                   help="also serve the OpenAI-compatible HTTP API (/v1/chat/completions, ...) on this port, "
                        "same host, tokens and TLS (0 = any free port; default %(default)s = off)")
    g.add_argument("--auth-token-file", default=C.auth_token_file,
                   help="require 'authorization: Bearer <token>': one role:token a line, role generate "
                        "(Generate, Tokenize, Detokenize, ListPairs, GetSpeculativeConfig) or admin (all); "
                        "health and reflection stay open")
    g.add_argument("--tls-cert", default=C.tls_cert,
                   help="PEM certificate (chain): serve TLS on --port, health included")
    g.add_argument("--tls-key", default=C.tls_key, help="PEM private key of --tls-cert")
    g.add_argument("--tls-client-ca", default=C.tls_client_ca,
                   help="PEM CA: require a client certificate it signed on every RPC (mutual TLS)")
    g.add_argument("--load-timeout", type=float, default=C.load_timeout,
                   help="seconds a Fit or Load may run before its client gets DEADLINE_EXCEEDED (a Load that "
                        "finishes later is released); other pairs are never blocked (default %(default)s)")
    g.add_argument("--log-level", default=C.log_level, choices=("debug", "info", "warning", "error"))
    g.add_argument("--log-format", default=C.log_format, choices=("text", "json"), help="logfmt lines or JSON lines")


def register(command) -> None:
    """serve: the gRPC server (and the HTTP door with --http-port)."""
    s = command("serve", "run the gRPC server", cmd_serve, client=False)
    add_model_flags(s, slots_default=DEFAULT_SLOTS)
    add_speculative_flags(s, "drafter (default: draft with -md, else ngram)")
    add_server_flags(s)
    add_compute_flags(s)
