"""TLS for the server (`--tls-cert`, `--tls-key`, `--tls-client-ca`) and the client commands (`--tls-ca`, ...).

PEM files in, grpc credentials out. With `--tls-client-ca` the server requires a client
certificate signed by that CA (mutual TLS) on every RPC of the port, health included: a probe
then needs a certificate too (`specserve health --tls-ca ... --tls-cert ... --tls-key ...`).
A file that cannot be read, or a certificate without its key, is a SystemExit naming the flag.
"""

from __future__ import annotations

import os

import grpc

CLIENT_ENV = {"ca": "SPECSERVE_TLS_CA", "cert": "SPECSERVE_TLS_CERT", "key": "SPECSERVE_TLS_KEY",
              "server_name": "SPECSERVE_TLS_SERVER_NAME"}


def read_pem(path: str, flag: str) -> bytes:
    """The bytes of a PEM file; SystemExit naming `flag` when it cannot be read or holds no PEM block."""
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 20)  # certificates and keys are a few KiB; a chain of many is well under 1 MiB
    except OSError as e:
        raise SystemExit(f"{flag} {path}: {e.strerror}") from None
    if b"-----BEGIN " not in data:
        raise SystemExit(f"{flag} {path}: not a PEM file (no -----BEGIN line)")
    return data


def server_credentials(cert: str, key: str, client_ca: str = "") -> grpc.ServerCredentials:
    """TLS credentials of the server; with `client_ca`, client certificates are required and verified."""
    if bool(cert) != bool(key):
        raise SystemExit("--tls-cert and --tls-key go together: give both or neither")
    if client_ca and not cert:
        raise SystemExit("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)")
    pair = (read_pem(key, "--tls-key"), read_pem(cert, "--tls-cert"))
    root = read_pem(client_ca, "--tls-client-ca") if client_ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=root, require_client_auth=root is not None)


def channel_credentials(ca: str, cert: str = "", key: str = "") -> grpc.ChannelCredentials:
    """TLS credentials of a client: trust `ca` ("" = the system roots); `cert`/`key` for mutual TLS."""
    if bool(cert) != bool(key):
        raise SystemExit("--tls-cert and --tls-key go together: give both or neither")
    return grpc.ssl_channel_credentials(
        root_certificates=read_pem(ca, "--tls-ca") if ca else None,
        private_key=read_pem(key, "--tls-key") if key else None,
        certificate_chain=read_pem(cert, "--tls-cert") if cert else None)


def client_setting(value: str, name: str) -> str:
    """A client TLS setting: the flag when given, else its environment variable (CLIENT_ENV)."""
    return value or os.environ.get(CLIENT_ENV[name], "")
