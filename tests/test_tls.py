"""TLS over real gRPC (--tls-cert/--tls-key, --tls-client-ca): a CA and certificates made here with
`cryptography`; a client trusting the CA generates, a plaintext client or one trusting another CA
does not get in, mutual TLS refuses a client without a certificate, health answers over the
same TLS port, and the client commands speak TLS from flags or $SPECSERVE_TLS_*."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service import cli
from service.pb.specserve.v1 import specserve_pb2 as pb
from service.pb.specserve.v1 import specserve_pb2_grpc as pb_grpc
from service.server import SpecServer
from tests.conftest import tiny_config

GREEDY = dict(max_tokens=4, sampling=pb.SamplingParams(temperature=0))
SERVING = health_pb2.HealthCheckResponse.SERVING


@dataclass
class Pki:
    """PEM files: a CA, a server certificate for 127.0.0.1/localhost, a client certificate, another CA."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key, issuer_name: x509.Name, issuer_key, ca: bool, sans=()) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer_name)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _write(d: Path, name: str, cert=None, key=None) -> Path:
    if key is not None:
        (d / f"{name}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
    if cert is not None:
        (d / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return d / f"{name}.pem"


def make_pki(d: Path) -> Pki:
    ca_key, other_key, srv_key, cli_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(4))
    ca = _cert("specserve test CA", ca_key, _name("specserve test CA"), ca_key, ca=True)
    other = _cert("another CA", other_key, _name("another CA"), other_key, ca=True)
    srv = _cert("localhost", srv_key, ca.subject, ca_key, ca=False,
                sans=(x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))))
    client = _cert("a client", cli_key, ca.subject, ca_key, ca=False)
    _write(d, "server", srv, srv_key)
    _write(d, "client", client, cli_key)
    return Pki(ca=_write(d, "ca", ca), server_cert=d / "server.pem", server_key=d / "server.key",
               client_cert=d / "client.pem", client_key=d / "client.key", other_ca=_write(d, "other-ca", other))


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _serve(tiny_models_dir, pki: Pki, mutual: bool) -> tuple[SpecServer, str]:
    cfg = replace(tiny_config(tiny_models_dir, n_parallel=2, n_ctx=512), host="127.0.0.1", port=0,
                  tls_cert=str(pki.server_cert), tls_key=str(pki.server_key),
                  tls_client_ca=str(pki.ca) if mutual else "")
    server = SpecServer(cfg)
    port = server.start()
    server.wait_ready(120)
    return server, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def tls_server(tiny_models_dir, pki):
    server, address = _serve(tiny_models_dir, pki, mutual=False)
    yield address
    server.stop()


@pytest.fixture(scope="module")
def mtls_server(tiny_models_dir, pki):
    server, address = _serve(tiny_models_dir, pki, mutual=True)
    yield address
    server.stop()


def _secure(address: str, ca: Path, cert: Path | None = None, key: Path | None = None) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(ca.read_bytes(), key.read_bytes() if key else None,
                                         cert.read_bytes() if cert else None)
    return grpc.secure_channel(address, creds)


def _generate(channel: grpc.Channel) -> pb.GenerateResponse:
    return pb_grpc.GenerationServiceStub(channel).Generate(pb.GenerateRequest(prompt="the cat", **GREEDY),
                                                           timeout=30)


def _health(channel: grpc.Channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status


def _refused(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code()


def test_a_client_trusting_the_ca_generates_and_checks_health(tls_server, pki):
    with _secure(tls_server, pki.ca) as ch:
        assert _generate(ch).usage.completion_tokens > 0
        assert _health(ch) == SERVING


def test_a_plaintext_client_or_one_trusting_another_ca_gets_nothing(tls_server, pki):
    with grpc.insecure_channel(tls_server) as ch:
        assert _refused(lambda: _generate(ch)) == grpc.StatusCode.UNAVAILABLE
        assert _refused(lambda: _health(ch)) == grpc.StatusCode.UNAVAILABLE
    with _secure(tls_server, pki.other_ca) as ch:
        assert _refused(lambda: _generate(ch)) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_refuses_a_client_without_a_certificate(mtls_server, pki):
    with _secure(mtls_server, pki.ca) as ch:  # trusts the server, presents nothing
        assert _refused(lambda: _generate(ch)) == grpc.StatusCode.UNAVAILABLE
    with _secure(mtls_server, pki.other_ca, pki.client_cert, pki.client_key) as ch:
        assert _refused(lambda: _generate(ch)) == grpc.StatusCode.UNAVAILABLE
    with _secure(mtls_server, pki.ca, pki.client_cert, pki.client_key) as ch:
        assert _generate(ch).usage.completion_tokens > 0
        assert _health(ch) == SERVING  # probes use the same port, with a certificate


def test_client_commands_speak_tls_from_flags_or_environment(tls_server, mtls_server, pki, capsys, monkeypatch):
    assert cli.main(["health", "--address", tls_server, "--tls-ca", str(pki.ca)]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"
    assert cli.main(["health", "--address", tls_server]) == 1  # plaintext to a TLS port
    capsys.readouterr()
    monkeypatch.setenv("SPECSERVE_TLS_CA", str(pki.ca))
    assert cli.main(["generate", "the cat", "-n", "4", "--temp", "0", "--address", tls_server]) == 0
    assert capsys.readouterr().out.strip()
    assert cli.main(["health", "--address", mtls_server]) == 1  # no client certificate
    capsys.readouterr()
    assert cli.main(["health", "--address", mtls_server, "--tls-cert", str(pki.client_cert),
                     "--tls-key", str(pki.client_key)]) == 0
    monkeypatch.setenv("SPECSERVE_TLS_CERT", str(pki.client_cert))
    monkeypatch.setenv("SPECSERVE_TLS_KEY", str(pki.client_key))
    assert cli.main(["generate", "the cat", "-n", "4", "--temp", "0", "--address", mtls_server]) == 0


def test_unusable_tls_files_stop_the_server_before_it_binds(tiny_models_dir, pki, tmp_path):
    base = tiny_config(tiny_models_dir, startup=False)
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    for changes, needle in ((dict(tls_cert=str(pki.server_cert)), "go together"),
                            (dict(tls_client_ca=str(pki.ca)), "needs --tls-cert"),
                            (dict(tls_cert=str(tmp_path / "absent.pem"), tls_key=str(pki.server_key)), "absent.pem"),
                            (dict(tls_cert=str(not_pem), tls_key=str(pki.server_key)), "not a PEM file")):
        with pytest.raises(SystemExit, match=needle):
            SpecServer(replace(base, port=0, **changes))
