"""TLS and mTLS on the check listener, through the real server (`python -m extauthz serve`).

Every certificate is generated here: a CA, a server certificate for 127.0.0.1 and localhost, a
client certificate from that CA, one from another CA, and one that has expired. A client with
the right certificate checks and asks gRPC health; one without a certificate, with another CA's
or with an expired one never gets past the handshake (UNAVAILABLE, and no check reaches the
server). Certificates replaced on disk are served to the next new connection without a restart,
and a broken replacement keeps the old one serving; what a client is served is read with
``ssl`` (the peer certificate's serial number), through a fresh connection each time.

    pki = Authority("extauthz test CA")
    server_pair = pki.issue("extauthz", server=True).write(tmp_path, "server")
    channel = tls_channel(port, pki, client=pki.issue("envoy", client=True))
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import ipaddress
import json
import os
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extauthz._pb.envoy.service.auth.v3 import external_auth_pb2_grpc as ext_grpc
from extauthz.config import ConfigError, TlsFiles, parse_config
from extauthz.logs import JsonLogger
from extauthz.tls import CertificateFiles, load_material, warn_if_tls_changed
from tests.check_requests import check_request
from tests.conftest import claims, self_signed
from tests.integration.serverproc import ExtauthzProcess, free_port, run_extauthz
from tests.policies import orders
from tests.waiting import wait_until

ORDER = "/orders/1"

# -- certificates --------------------------------------------------------------------------------


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass
class Issued:
    """A certificate and its key; ``write`` puts them in ``<name>.crt`` and ``<name>.key``."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return _pem_key(self.key)

    @property
    def serial(self) -> int:
        return self.certificate.serial_number

    def write(self, directory: Path, name: str) -> tuple[Path, Path]:
        directory.mkdir(parents=True, exist_ok=True)
        cert, key = directory / f"{name}.crt", directory / f"{name}.key"
        replace_file(cert, self.cert_pem)
        replace_file(key, self.key_pem)
        return cert, key


def replace_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` the way Kubernetes and cert-manager do: a new file renamed
    over the old one, so a reader sees the old or the new content, never half of it."""
    staged = path.with_name(f".{path.name}.new")
    staged.write_bytes(data)
    os.replace(staged, path)


class Authority:
    """A CA that issues server and client certificates (P-256 keys, SHA-256 signatures)."""

    def __init__(self, name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.certificate = self_signed(
            self.key,
            name,
            (x509.BasicConstraints(ca=True, path_length=0), True),
            (_ca_key_usage(), True),
        )

    @property
    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def write(self, directory: Path, name: str = "ca") -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{name}.crt"
        replace_file(path, self.cert_pem)
        return path

    def issue(
        self,
        common_name: str,
        *,
        server: bool = False,
        client: bool = False,
        dns: tuple[str, ...] = ("localhost",),
        expired: bool = False,
    ) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        if expired:
            not_before, not_after = now - datetime.timedelta(days=2), now - datetime.timedelta(days=1)
        else:
            not_before, not_after = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=1)
        usages = [ExtendedKeyUsageOID.SERVER_AUTH] if server else []
        usages += [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        )
        if server:
            names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns]
            names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return Issued(builder.sign(self.key, hashes.SHA256()), key)


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip


@dataclass
class Pki:
    """The test's certificates, written under ``directory``."""

    directory: Path
    ca: Authority
    other_ca: Authority
    server: Issued
    client: Issued
    foreign_client: Issued  # issued by other_ca
    expired_client: Issued

    @property
    def cert_file(self) -> Path:
        return self.directory / "tls.crt"

    @property
    def key_file(self) -> Path:
        return self.directory / "tls.key"

    @property
    def ca_file(self) -> Path:
        return self.directory / "ca.crt"

    def tls(self, *, mtls: bool = True) -> dict[str, str]:
        """``server.tls`` for these files."""
        settings = {"certFile": str(self.cert_file), "keyFile": str(self.key_file)}
        if mtls:
            settings["clientCaFile"] = str(self.ca_file)
        return settings

    def serve(self, issued: Issued) -> None:
        """Replace the listener's certificate and key on disk (certificate first, like a
        rotation whose reader may look in between)."""
        replace_file(self.cert_file, issued.cert_pem)
        replace_file(self.key_file, issued.key_pem)


def make_pki(directory: Path) -> Pki:
    ca, other_ca = Authority("extauthz test CA"), Authority("another CA")
    pki = Pki(
        directory=directory,
        ca=ca,
        other_ca=other_ca,
        server=ca.issue("extauthz", server=True),
        client=ca.issue("envoy", client=True),
        foreign_client=other_ca.issue("envoy", client=True),
        expired_client=ca.issue("envoy", client=True, expired=True),
    )
    ca.write(directory)
    pki.serve(pki.server)
    return pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


# -- clients -------------------------------------------------------------------------------------


def tls_channel(port: int, ca: bytes, client: Issued | None = None) -> grpc.Channel:
    """A gRPC channel of its own (its own connection, not one shared with another channel of
    this process) to 127.0.0.1:``port`` that trusts ``ca`` and shows ``client``'s certificate."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca,
        private_key=client.key_pem if client else None,
        certificate_chain=client.cert_pem if client else None,
    )
    return grpc.secure_channel(
        f"127.0.0.1:{port}", credentials, options=[("grpc.use_local_subchannel_pool", 1)]
    )


def check(channel: grpc.Channel, token: str | None, path: str = ORDER) -> Any:
    stub = ext_grpc.AuthorizationStub(channel)  # type: ignore[no-untyped-call]
    return stub.Check(check_request(path, token=token), timeout=10)


def health(channel: grpc.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return int(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status)


def served_certificate(port: int, ca: bytes, client: Issued | None, workdir: Path) -> x509.Certificate:
    """The certificate the listener presents to a new connection, as ``ssl`` sees it (verified
    against ``ca`` for the name localhost)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=ca.decode())
    context.set_alpn_protocols(["h2"])  # gRPC's, RFC 7540 §3.3
    if client is not None:
        cert, key = client.write(workdir, f"ssl-client-{threading.get_ident()}")
        context.load_cert_chain(cert, key)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


# -- the server ----------------------------------------------------------------------------------


@pytest.fixture
def policy(rsa_key: Any) -> dict[str, Any]:
    static = {
        "type": "STATIC_KEYS",
        "keys": [rsa_key.public_jwk],
        "additionalValidationPolicy": {"issuers": ["https://idp.example.com"]},
    }
    return {"deployments": [orders(static)]}


def tls_config(policy: dict[str, Any], tls: dict[str, str]) -> dict[str, Any]:
    return {"server": {"tls": tls}, **policy}


@pytest.fixture
def mtls_server(pki: Pki, policy: dict[str, Any], tmp_path: Path) -> Iterator[ExtauthzProcess]:
    with ExtauthzProcess(tls_config(policy, pki.tls()), tmp_path / "server") as running:
        yield running


def test_a_client_with_the_right_certificate_checks_and_asks_health(
    mtls_server: ExtauthzProcess, pki: Pki, rsa_key: Any
) -> None:
    with tls_channel(mtls_server.port, pki.ca.cert_pem, pki.client) as channel:
        allowed = check(channel, rsa_key.sign(claims()))
        assert allowed.status.code == 0 and allowed.HasField("ok_response")
        denied = check(channel, None)
        assert denied.status.code == 16 and denied.denied_response.status.code == 401
        assert health(channel) == health_pb2.HealthCheckResponse.SERVING
        assert health(channel, "envoy.service.auth.v3.Authorization") == health_pb2.HealthCheckResponse.SERVING
    [loaded] = mtls_server.events("server.tlsLoaded")
    assert loaded["serialNumber"] == format(pki.server.serial, "X")
    assert loaded["clientCaFile"] == str(pki.ca_file) and loaded["certFile"] == str(pki.cert_file)
    assert "client certificates required" in loaded["message"]
    assert pki.server.key_pem.decode() not in mtls_server.text()


@pytest.mark.parametrize(
    "client",
    [None, "foreign_client", "expired_client"],
    ids=["no-client-certificate", "another-ca", "expired"],
)
def test_the_handshake_fails_without_a_valid_client_certificate(
    mtls_server: ExtauthzProcess, pki: Pki, rsa_key: Any, client: str | None, tmp_path: Path
) -> None:
    issued: Issued | None = getattr(pki, client) if client else None
    with tls_channel(mtls_server.port, pki.ca.cert_pem, issued) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            check(channel, rsa_key.sign(claims()))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError) as refused_health:
            health(channel)
        assert refused_health.value.code() == grpc.StatusCode.UNAVAILABLE
    # Below gRPC: with TLS 1.3 the client's side of the handshake completes before the server
    # has checked the client's certificate (RFC 8446 §4.4.2); the server then closes the
    # connection without a byte of HTTP/2, where the right certificate gets its SETTINGS frame.
    assert http2_answer(mtls_server.port, pki.ca.cert_pem, issued, tmp_path) == b""
    assert http2_answer(mtls_server.port, pki.ca.cert_pem, pki.client, tmp_path) != b""
    # No check reached the server: a check through the right certificate is its first access line.
    with tls_channel(mtls_server.port, pki.ca.cert_pem, pki.client) as channel:
        assert check(channel, rsa_key.sign(claims())).status.code == 0
    assert len(wait_until(lambda: mtls_server.events("access"), timeout=10, what="an access line")) == 1


def http2_answer(port: int, ca: bytes, client: Issued | None, workdir: Path) -> bytes:
    """What the server sends after the client's HTTP/2 connection preface (RFC 9113 §3.4): its
    SETTINGS frame, or nothing when it closes the connection (or the handshake fails)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=ca.decode())
    context.set_alpn_protocols(["h2"])
    if client is not None:
        cert, key = client.write(workdir, "preface-client")
        context.load_cert_chain(cert, key)
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            return tls.recv(9)  # a frame header
    except (ssl.SSLError, ConnectionError):
        return b""


def test_tls_without_client_ca_asks_for_no_client_certificate(
    pki: Pki, policy: dict[str, Any], rsa_key: Any, tmp_path: Path
) -> None:
    with ExtauthzProcess(tls_config(policy, pki.tls(mtls=False)), tmp_path / "server") as server:
        with tls_channel(server.port, pki.ca.cert_pem) as channel:
            assert check(channel, rsa_key.sign(claims())).status.code == 0
        # Plain gRPC to a TLS listener: the server reads no HTTP/2 preface, nothing is checked.
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as plain:
            with pytest.raises(grpc.RpcError) as refused:
                check(plain, rsa_key.sign(claims()))
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        [loaded] = server.events("server.tlsLoaded")
        assert "client certificates not asked for" in loaded["message"]
        assert "clientCaFile" not in loaded


# -- rotation ------------------------------------------------------------------------------------


@pytest.fixture
def rotating(
    pki: Pki, policy: dict[str, Any], tmp_path: Path
) -> Iterator[tuple[ExtauthzProcess, Pki]]:
    """A server whose certificate files are its own, to be replaced by the test."""
    own = dataclasses.replace(pki, directory=tmp_path / "tls")
    pki.ca.write(own.directory)
    own.serve(own.server)
    with ExtauthzProcess(tls_config(policy, own.tls()), tmp_path / "server") as running:
        yield running, own


def test_a_replaced_certificate_is_served_to_the_next_connection(
    rotating: tuple[ExtauthzProcess, Pki], rsa_key: Any, tmp_path: Path
) -> None:
    server, pki = rotating
    ca = pki.ca.cert_pem
    assert served_certificate(server.port, ca, pki.client, tmp_path).serial_number == pki.server.serial
    long_lived = tls_channel(server.port, ca, pki.client)  # Envoy's connection, kept open
    assert check(long_lived, rsa_key.sign(claims())).status.code == 0

    renewed = pki.ca.issue("extauthz", server=True)
    pki.serve(renewed)
    # The very next connection: gRPC asks for the files before each handshake.
    assert served_certificate(server.port, ca, pki.client, tmp_path).serial_number == renewed.serial
    with tls_channel(server.port, ca, pki.client) as fresh:
        assert check(fresh, rsa_key.sign(claims())).status.code == 0
    # The connection set up before keeps working: a certificate is shown at the handshake only.
    assert check(long_lived, rsa_key.sign(claims())).status.code == 0
    long_lived.close()

    [reloaded] = wait_until(lambda: server.events("server.tlsReloaded"), timeout=10, what="tlsReloaded")
    assert reloaded["serialNumber"] == format(renewed.serial, "X")
    assert format(pki.server.serial, "X") in reloaded["message"]
    assert server.events("server.tlsReloadFailed") == []
    assert renewed.key_pem.decode() not in server.text()


def test_a_broken_replacement_keeps_the_old_certificate(
    rotating: tuple[ExtauthzProcess, Pki], rsa_key: Any, tmp_path: Path
) -> None:
    server, pki = rotating
    ca, old = pki.ca.cert_pem, pki.server.serial

    def served() -> int:
        return served_certificate(server.port, ca, pki.client, tmp_path).serial_number

    # Half a rotation: the new certificate beside the old key.
    renewed = pki.ca.issue("extauthz", server=True)
    replace_file(pki.cert_file, renewed.cert_pem)
    for _ in range(3):  # several new connections, one log line
        assert served() == old
    with tls_channel(server.port, ca, pki.client) as channel:
        assert check(channel, rsa_key.sign(claims())).status.code == 0
    [failed] = wait_until(lambda: server.events("server.tlsReloadFailed"), timeout=10, what="tlsReloadFailed")
    assert failed["level"] == "ERROR"
    assert failed["errors"] == [
        f"server.tls.keyFile: {pki.key_file} is not the key of the first certificate in {pki.cert_file}"
    ]
    assert format(old, "X") in failed["message"]

    # A certificate file cut short while being written, then one that is not PEM at all.
    pki.cert_file.write_bytes(renewed.cert_pem[: len(renewed.cert_pem) // 2])
    assert served() == old
    pki.cert_file.write_bytes(b"not a certificate\n")
    assert served() == old
    pki.key_file.unlink()  # and the key gone
    assert served() == old
    failures = wait_until(
        lambda: found if len(found := server.events("server.tlsReloadFailed")) == 3 else None,
        timeout=10,
        what="three tlsReloadFailed lines",
    )
    assert failures[1]["errors"] == [f"server.tls.certFile: {pki.cert_file} holds no PEM certificate"]
    assert failures[2]["errors"] == [f"server.tls.keyFile: cannot read {pki.key_file}: No such file or directory"]
    assert server.events("server.tlsReloaded") == []

    # The rotation completes: the new pair is served.
    pki.serve(renewed)
    assert served() == renewed.serial
    [reloaded] = wait_until(lambda: server.events("server.tlsReloaded"), timeout=10, what="tlsReloaded")
    assert reloaded["serialNumber"] == format(renewed.serial, "X")
    text = server.text()
    assert renewed.key_pem.decode() not in text and pki.server.key_pem.decode() not in text


def test_a_rotated_client_ca_is_used_for_the_next_connection(
    rotating: tuple[ExtauthzProcess, Pki], rsa_key: Any
) -> None:
    """clientCaFile is one of the files watched: trusting another CA takes effect at once."""
    server, pki = rotating
    ca = pki.ca.cert_pem
    pki.other_ca.write(pki.directory)  # ca.crt now holds the other CA
    with tls_channel(server.port, ca, pki.foreign_client) as channel:
        assert check(channel, rsa_key.sign(claims())).status.code == 0
    with tls_channel(server.port, ca, pki.client) as channel, pytest.raises(grpc.RpcError):
        check(channel, rsa_key.sign(claims()))


# -- refusing to start ---------------------------------------------------------------------------


def serve_to_exit(config_path: Path) -> Any:
    return run_extauthz(
        "serve", "--config", str(config_path),
        "--listen", f"127.0.0.1:{free_port()}", "--admin-listen", f"127.0.0.1:{free_port()}",
        timeout=60,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("breakage", "error"),
    [
        ("missing-key", "server.tls.keyFile: cannot read {key}: No such file or directory"),
        ("other-key", "server.tls.keyFile: {key} is not the key of the first certificate in {cert}"),
        ("not-pem", "server.tls.certFile: {cert} holds no PEM certificate"),
        ("bad-ca", "server.tls.clientCaFile: {ca} holds no PEM certificate"),
        ("expired", "server.tls.certFile: the certificate in {cert} expired at"),
    ],
)
def test_unusable_files_refuse_to_start(
    pki: Pki, policy: dict[str, Any], tmp_path: Path, breakage: str, error: str
) -> None:
    own = dataclasses.replace(pki, directory=tmp_path / "tls")
    pki.ca.write(own.directory)
    own.serve(own.server)
    if breakage == "missing-key":
        own.key_file.unlink()
    elif breakage == "other-key":
        replace_file(own.key_file, pki.client.key_pem)
    elif breakage == "not-pem":
        replace_file(own.cert_file, b"-----BEGIN CERTIFICATE-----\ncut short")
    elif breakage == "bad-ca":
        replace_file(own.ca_file, b"# no certificate here\n")
    else:
        own.serve(pki.ca.issue("extauthz", server=True, expired=True))
    config_path = tmp_path / "extauthz.yaml"
    config_path.write_text(yaml.safe_dump(tls_config(policy, own.tls())))

    result = serve_to_exit(config_path)
    assert result.returncode == 2, result.stdout + result.stderr
    expected = error.format(key=own.key_file, cert=own.cert_file, ca=own.ca_file)
    assert expected in result.stderr
    assert '"event":"server.configInvalid"' in result.stdout and expected in result.stdout
    assert "server.started" not in result.stdout
    assert own.server.key_pem.decode() not in result.stdout + result.stderr


# -- in process: what is re-read, and when -------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def __call__(self, level: str, event: str, fields: dict[str, Any]) -> None:
        self.lines.append((level, event, fields))

    def events(self) -> list[str]:
        return [event for _, event, _ in self.lines]


def test_the_files_are_read_again_only_when_they_change(pki: Pki, tmp_path: Path) -> None:
    own = dataclasses.replace(pki, directory=tmp_path)
    own.serve(own.server)
    recorder = Recorder()
    files = CertificateFiles(TlsFiles(str(own.cert_file), str(own.key_file)), recorder)
    assert not files.require_client_certificate
    assert [files() for _ in range(3)] == [None, None, None]
    own.serve(own.server)  # the same bytes again (new inodes): nothing to serve anew
    assert files() is None and recorder.lines == []

    replace_file(own.cert_file, pki.client.cert_pem)  # mismatched: logged once
    assert [files() for _ in range(3)] == [None, None, None]
    os.utime(own.cert_file, ns=(1, 1))  # touched, the same problem: not logged again
    assert files() is None
    assert recorder.events() == ["server.tlsReloadFailed"]

    renewed = pki.ca.issue("extauthz", server=True)
    own.serve(renewed)
    assert isinstance(files(), grpc.ServerCertificateConfiguration)
    assert files() is None
    assert recorder.events() == ["server.tlsReloadFailed", "server.tlsReloaded"]
    assert files.material.serial_number == format(renewed.serial, "X")

    replace_file(own.cert_file, pki.client.cert_pem)  # the same problem as before, after a success
    assert files() is None
    assert recorder.events()[-1] == "server.tlsReloadFailed" and len(recorder.lines) == 3


def test_load_material_never_quotes_the_key(pki: Pki, tmp_path: Path) -> None:
    own = dataclasses.replace(pki, directory=tmp_path)
    own.serve(own.server)
    # A key with its PEM header but damaged inside.
    damaged = pki.server.key_pem.replace(b"\n", b"\n!", 2)
    replace_file(own.key_file, damaged)
    with pytest.raises(ConfigError) as refused:
        load_material(TlsFiles(str(own.cert_file), str(own.key_file)))
    assert refused.value.errors == [f"server.tls.keyFile: {own.key_file} holds no unencrypted PEM private key"]
    assert damaged.decode()[40:80] not in str(refused.value)


def test_workers_each_serve_tls_on_the_one_port(
    pki: Pki, policy: dict[str, Any], rsa_key: Any, tmp_path: Path
) -> None:
    """`serve --workers 2`: each worker binds the port with the same TLS files (SO_REUSEPORT)."""
    with ExtauthzProcess(tls_config(policy, pki.tls()), tmp_path / "server", workers=2) as server:
        for _ in range(4):  # new connections, spread by the kernel over both workers
            with tls_channel(server.port, pki.ca.cert_pem, pki.client) as channel:
                assert check(channel, rsa_key.sign(claims())).status.code == 0
        assert len(server.events("server.tlsLoaded")) == 2


def test_a_reload_that_changes_server_tls_says_it_waits_for_a_restart(
    pki: Pki, policy: dict[str, Any]
) -> None:
    mtls = parse_config(tls_config(policy, pki.tls()), source="a.yaml")
    tls_only = parse_config(tls_config(policy, pki.tls(mtls=False)), source="a.yaml")
    out = io.StringIO()
    logger = JsonLogger(out)
    warn_if_tls_changed(logger, mtls, mtls)
    assert out.getvalue() == ""
    warn_if_tls_changed(logger, mtls, tls_only)
    [line] = [json.loads(raw) for raw in out.getvalue().splitlines()]
    assert (line["event"], line["level"], line["config"]) == ("config.tlsNeedsRestart", "WARNING", "a.yaml")


def test_the_key_is_not_in_the_material_repr(pki: Pki, tmp_path: Path) -> None:
    own = dataclasses.replace(pki, directory=tmp_path)
    own.serve(own.server)
    material = load_material(TlsFiles(str(own.cert_file), str(own.key_file)))
    assert material.key == own.server.key_pem
    assert "PRIVATE KEY" not in repr(material) and own.server.key_pem.decode() not in repr(material)


def test_workers_refuse_to_start_on_unusable_tls_files_at_once(policy: dict[str, Any], tmp_path: Path) -> None:
    """`serve --workers 2` checks the files before any worker starts: exit 2, the errors named."""
    missing = {"certFile": str(tmp_path / "missing.crt"), "keyFile": str(tmp_path / "missing.key")}
    path = tmp_path / "extauthz.yaml"
    path.write_text(yaml.safe_dump(tls_config(policy, missing)))
    done = run_extauthz("serve", "--config", str(path), "--workers", "2", "--listen", "127.0.0.1:0", timeout=30)
    assert done.returncode == 2 and "server.tls.certFile" in done.stderr
