"""The gRPC client side of the command line: where the server is, the channel (TLS, bearer token),
the stubs, and the protobuf messages every client command builds."""

from __future__ import annotations

import argparse
import os

from service.cli.flags import speculative_changes

DEFAULT_ADDRESS = "127.0.0.1:50051"


def add_client_flags(p: argparse.ArgumentParser) -> None:
    """Where the server is and how to reach it: every client command."""
    p.add_argument("--address", default=os.environ.get("SPECSERVE_ADDRESS", DEFAULT_ADDRESS),
                   help="server HOST:PORT (default $SPECSERVE_ADDRESS or %(default)s)")
    p.add_argument("--timeout", type=float, default=None, help="RPC deadline in seconds")
    t = p.add_argument_group("TLS (a server started with --tls-cert)")
    t.add_argument("--tls-ca", default="", help="PEM CA that signed the server's certificate "
                   "(default $SPECSERVE_TLS_CA); with it the connection uses TLS")
    t.add_argument("--tls-cert", default="", help="PEM client certificate for mutual TLS "
                   "(default $SPECSERVE_TLS_CERT)")
    t.add_argument("--tls-key", default="", help="PEM key of --tls-cert (default $SPECSERVE_TLS_KEY)")
    t.add_argument("--tls-server-name", default="", help="the name to verify in the server's "
                   "certificate when --address differs (default $SPECSERVE_TLS_SERVER_NAME)")


def open_channel(args):
    import grpc

    from service.rpc.tls import channel_credentials, client_setting

    options = [("grpc.max_receive_message_length", 64 << 20)]
    ca, cert, key = (client_setting(getattr(args, f"tls_{n}", ""), n) for n in ("ca", "cert", "key"))
    if ca or cert:
        server_name = client_setting(args.tls_server_name, "server_name")
        if server_name:  # the name the server's certificate carries, when --address is an IP or an alias
            options.append(("grpc.ssl_target_name_override", server_name))
        channel = grpc.secure_channel(args.address, channel_credentials(ca, cert, key), options=options)
    else:
        channel = grpc.insecure_channel(args.address, options=options)
    token = os.environ.get("SPECSERVE_TOKEN", "")
    if token:  # a server started with --auth-token-file
        from service.rpc.auth import BearerToken

        channel = grpc.intercept_channel(channel, BearerToken(token))
    return channel


def stubs(args):
    from service.pb.specserve.v1 import specserve_pb2_grpc as pb_grpc

    ch = open_channel(args)
    return pb_grpc.ModelServiceStub(ch), pb_grpc.GenerationServiceStub(ch)


def pb_module():
    from service.pb.specserve.v1 import specserve_pb2

    return specserve_pb2


def to_json(msg) -> str:
    from google.protobuf import json_format

    return json_format.MessageToJson(msg, preserving_proto_field_name=True, indent=2)


def fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def spec_pb(args, type_flag: str = "spec_type"):
    pb = pb_module()
    from service.rpc.convert import DRAFTER_TO_PB

    cfg = pb.SpeculativeConfig(**speculative_changes(args))
    if getattr(args, type_flag, ""):
        cfg.type = DRAFTER_TO_PB[getattr(args, type_flag)]
    return cfg
